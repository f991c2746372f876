// PhaseTimer: where a GPU step's time goes, measured with CUDA events on one
// stream. Lap(phase) charges the stream time since the previous Start/Lap to
// `phase` (and optionally its FLOPs, for TFLOP/s), so consecutive Laps tile
// the timeline: host-side gaps that leave the GPU idle land in the phase
// whose work was enqueued after them. Disabled (the default), every call is
// a no-op and nothing is recorded; enabling costs one event record per Lap
// (~2 us of host time) and no synchronization until Take().
//
// GpuTransformer enables its timer when the environment variable
// GROVE_GPU_PROFILE is set to 1 (or through SetEnabled); gpu_step_bench
// prints the table.
//
// This header needs no CUDA (the stream and events are held as void*).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/result.h"

namespace grove::model {

struct PhaseTime {
  std::string phase;
  double ms = 0;     // summed over laps
  double flops = 0;  // summed over laps (0: not a matrix product)
  int64_t laps = 0;
};

class PhaseTimer {
 public:
  explicit PhaseTimer(void* stream) : stream_(stream) {}
  ~PhaseTimer();
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

  void SetEnabled(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }

  // A new origin: time before it is charged to no phase.
  void Start();
  // The stream time since the previous Start/Lap belongs to `phase`.
  void Lap(const char* phase, double flops = 0);
  // Waits for the recorded events and returns the totals since the last
  // Take, phases in order of first appearance; then starts afresh. Call it
  // every few steps: past 65536 events without one, laps are dropped.
  Result<std::vector<PhaseTime>> Take();

 private:
  static constexpr size_t kMaxEvents = size_t(1) << 16;  // ~50 steps of gpu-ref
  void* NextEvent();
  void* stream_;
  bool enabled_ = false;
  std::vector<void*> pool_;  // cudaEvent_t, reused across Takes
  size_t used_ = 0;
  // One entry per recorded event: the phase it closes (-1: an origin).
  std::vector<int> closes_;
  std::vector<double> flops_;
  std::vector<std::string> names_;
};

}  // namespace grove::model
