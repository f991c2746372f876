#include "learner/ipc_weight_export.h"

#include <cuda_runtime_api.h>
#include <glog/logging.h>

#include "actors/cuda_ipc.h"
#include "actors/cuda_status.h"

namespace grove::learner {

Result<std::unique_ptr<DeviceWeightExport>> IpcWeightExport::Create(int device) {
  std::unique_ptr<IpcWeightExport> e(new IpcWeightExport(device));
  GROVE_ASSIGN_OR_RETURN(e->uuid_, actors::CudaDeviceUuid(device));
  return std::unique_ptr<DeviceWeightExport>(std::move(e));
}

IpcWeightExport::~IpcWeightExport() {
  for (Slot& s : slots_) {
    if (s.data == nullptr) continue;
    if (cudaSetDevice(device_) != cudaSuccess || cudaFree(s.data) != cudaSuccess)
      LOG(WARNING) << "weights: freeing an IPC buffer failed: " << cudaGetErrorString(cudaGetLastError());
  }
}

Status IpcWeightExport::Publish(const actors::WeightSnapshot& snapshot) {
  const size_t bytes = snapshot.flat.size() * sizeof(float);
  if (bytes == 0) return Status::InvalidArgument("weights: an empty version cannot be exported");
  std::lock_guard<std::mutex> lock(mu_);
  const int target = newest_ < 0 ? 0 : 1 - newest_;
  Slot& s = slots_[target];
  GROVE_RETURN_IF_ERROR(actors::CudaStatus(cudaSetDevice(device_), "cudaSetDevice", StatusCode::kUnavailable));
  if (s.capacity < bytes) {
    if (s.data != nullptr) cudaFree(s.data);
    s = Slot{};
    GROVE_RETURN_IF_ERROR(actors::CudaStatus(cudaMalloc(&s.data, bytes), "cudaMalloc of the IPC weight buffer",
                                             StatusCode::kUnavailable));
    s.capacity = bytes;
  }
  // Marked unreadable while it is overwritten.
  s.version = -1;
  GROVE_RETURN_IF_ERROR(actors::CudaStatus(cudaMemcpy(s.data, snapshot.flat.data(), bytes, cudaMemcpyHostToDevice),
                                           "copy of the weights to the IPC buffer", StatusCode::kUnavailable));
  s.bytes = bytes;
  s.version = snapshot.version;
  newest_ = target;
  return Status::OK();
}

bool IpcWeightExport::FillAnnounce(const actors::WeightSnapshot& snapshot, wire::WeightAnnounce::Builder out) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Slot& s : slots_) {
    if (s.version != snapshot.version || s.data == nullptr) continue;
    Status st = actors::FillIpcWeightAnnounce(snapshot, s.data, s.bytes, device_, out);
    if (st.ok()) return true;
    LOG_EVERY_N(WARNING, 20) << "weights: IPC announce of version " << snapshot.version << ": " << st;
    return false;
  }
  return false;
}

}  // namespace grove::learner
