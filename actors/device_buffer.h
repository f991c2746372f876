// DeviceBuffer: device memory reused from one use to the next (the
// transports' staging of weight versions, actors/nccl_weights.h and
// actors/cuda_ipc.h; the learner's GRPO loss buffers, learner/gpu_step.h):
// grown on demand (freed and allocated anew when a larger size is asked,
// contents not kept), on the one device its first Reserve names. Needs a
// CUDA build (grove_device_buffer); no CUDA types in here.
#pragma once

#include <cstddef>
#include <string>

#include "base/result.h"

namespace grove::actors {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // At least `bytes` on `device` (and the current device is `device`
  // afterwards). InvalidArgument for a device other than the first;
  // ResourceExhausted, naming `what`, when the allocation fails (the buffer
  // is empty then); Internal for other CUDA errors.
  Result<void*> Reserve(size_t bytes, int device, const std::string& what);
  // Frees the allocation (the next Reserve allocates anew, on the same device).
  void Release();
  void* data() const { return ptr_; }
  size_t capacity() const { return capacity_; }
  int device() const { return device_; }

 private:
  void* ptr_ = nullptr;
  size_t capacity_ = 0;
  int device_ = -1;
};

}  // namespace grove::actors
