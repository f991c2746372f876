// IpcWeightExport: the learner's DeviceWeightExport (weight_publisher.h)
// over CUDA IPC (actors/cuda_ipc.h). Two device buffers take turns: a new
// version is copied into the one not holding the newest, so the newest two
// stay readable. CUDA builds only; the header needs no CUDA.
#pragma once

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
  Status Publish(const actors::WeightSnapshot& snapshot) override;
  bool FillAnnounce(const actors::WeightSnapshot& snapshot, wire::WeightAnnounce::Builder out) override;

 private:
  struct Slot {
    int64_t version = -1;
    void* data = nullptr;
    size_t bytes = 0;       // in use
    size_t capacity = 0;    // allocated
  };
  explicit IpcWeightExport(int device) : device_(device) {}

  int device_;
  std::string uuid_;
  std::mutex mu_;
  Slot slots_[2];
  int newest_ = -1;  // index into slots_
};

}  // namespace grove::learner
