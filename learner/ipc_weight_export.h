// IpcWeightExport: the learner's DeviceWeightExport (weight_publisher.h)
// over CUDA IPC (actors/cuda_ipc.h). Two IPC slots take turns: a new version
// is written into the one not holding the newest, so the newest two stay
// readable, each under its slot's sequence lock (a reader of the older one
// when it is rewritten sees a torn read and fetches the newest). Lazy: no
// copy until the first Export (a worker on this GPU asked). Copies run on
// the export's own stream and are complete when Publish / Export return.
// CUDA builds only; the header needs no CUDA.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "learner/weight_publisher.h"

namespace grove::learner {

class IpcWeightExport : public DeviceWeightExport {
 public:
  static Result<std::unique_ptr<DeviceWeightExport>> Create(int device);
  ~IpcWeightExport() override;

  const std::string& device_uuid() const override { return uuid_; }
  bool wanted() const override { return wanted_.load(); }
  Status Publish(const actors::WeightSnapshot& snapshot, const float* device_flat) override;
  Status Export(const actors::WeightSnapshot& snapshot) override;
  bool FillAnnounce(const actors::WeightSnapshot& snapshot, wire::WeightAnnounce::Builder out) override;

 private:
  struct Slot {
    int64_t version = -1;
    void* data = nullptr;    // header + weights (actors::kIpcSlotHeaderBytes + bytes)
    size_t bytes = 0;        // weights in use
    size_t capacity = 0;     // weight bytes allocated
  };
  explicit IpcWeightExport(int device) : device_(device) {}
  // Writes `snapshot` into the slot not holding the newest (mu_ held).
  Status WriteLocked(const actors::WeightSnapshot& snapshot, const float* device_flat);

  int device_;
  std::string uuid_;
  std::atomic<bool> wanted_{false};
  std::mutex mu_;
  Slot slots_[2];
  int newest_ = -1;             // index into slots_
  uint64_t* scratch_ = nullptr; // device word for the WeightSum
  void* stream_ = nullptr;      // cudaStream_t
  bool device_source_checked_ = false;  // the first device-sourced copy matched the host bytes
  bool device_source_ok_ = true;
};

}  // namespace grove::learner
