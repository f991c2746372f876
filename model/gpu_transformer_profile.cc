#include "model/gpu_transformer_profile.h"

#include <cuda_runtime.h>

namespace grove::model {

PhaseTimer::~PhaseTimer() {
  for (void* e : pool_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
}

void* PhaseTimer::NextEvent() {
  if (used_ >= kMaxEvents) return nullptr;  // nobody Takes: stop recording rather than grow
  if (used_ == pool_.size()) {
    cudaEvent_t e = nullptr;
    if (cudaEventCreate(&e) != cudaSuccess) return nullptr;
    pool_.push_back(e);
  }
  return pool_[used_++];
}

void PhaseTimer::Start() {
  if (!enabled_) return;
  void* e = NextEvent();
  if (!e) return;
  cudaEventRecord(static_cast<cudaEvent_t>(e), static_cast<cudaStream_t>(stream_));
  closes_.push_back(-1);
  flops_.push_back(0);
}

void PhaseTimer::Lap(const char* phase, double flops) {
  if (!enabled_ || closes_.empty()) return;  // no origin yet: nothing to charge
  void* e = NextEvent();
  if (!e) return;
  cudaEventRecord(static_cast<cudaEvent_t>(e), static_cast<cudaStream_t>(stream_));
  int id = -1;
  for (size_t i = 0; i < names_.size(); ++i)
    if (names_[i] == phase) id = int(i);
  if (id < 0) {
    id = int(names_.size());
    names_.push_back(phase);
  }
  closes_.push_back(id);
  flops_.push_back(flops);
}

Result<std::vector<PhaseTime>> PhaseTimer::Take() {
  std::vector<PhaseTime> out(names_.size());
  for (size_t i = 0; i < names_.size(); ++i) out[i].phase = names_[i];
  if (used_ > 0) {
    const cudaError_t err = cudaEventSynchronize(static_cast<cudaEvent_t>(pool_[used_ - 1]));
    if (err != cudaSuccess) return Status::Internal(std::string("PhaseTimer: ") + cudaGetErrorString(err));
  }
  for (size_t i = 1; i < closes_.size(); ++i) {
    if (closes_[i] < 0) continue;
    float ms = 0;
    if (cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(pool_[i - 1]), static_cast<cudaEvent_t>(pool_[i])) !=
        cudaSuccess)
      return Status::Internal("PhaseTimer: event timing failed");
    PhaseTime& p = out[closes_[i]];
    p.ms += ms;
    p.flops += flops_[i];
    ++p.laps;
  }
  used_ = 0;
  closes_.clear();
  flops_.clear();
  names_.clear();
  return out;
}

}  // namespace grove::model
