#include "learner/ipc_weight_export.h"

#include <cuda_runtime_api.h>
#include <glog/logging.h>

#include "actors/cuda_ipc.h"
#include "actors/cuda_status.h"
#include "kernels/weight_checksum.h"

namespace grove::learner {
namespace {

Status CudaOk(cudaError_t e, const char* what) { return actors::CudaStatus(e, what, StatusCode::kUnavailable); }

}  // namespace

Result<std::unique_ptr<DeviceWeightExport>> IpcWeightExport::Create(int device) {
  std::unique_ptr<IpcWeightExport> e(new IpcWeightExport(device));
  GROVE_ASSIGN_OR_RETURN(e->uuid_, actors::CudaDeviceUuid(device));
  GROVE_RETURN_IF_ERROR(CudaOk(cudaSetDevice(device), "cudaSetDevice"));
  cudaStream_t s;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  e->stream_ = s;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaMalloc(reinterpret_cast<void**>(&e->scratch_), sizeof(uint64_t)), "cudaMalloc"));
  return std::unique_ptr<DeviceWeightExport>(std::move(e));
}

IpcWeightExport::~IpcWeightExport() {
  if (cudaSetDevice(device_) != cudaSuccess) return;
  for (Slot& s : slots_) {
    if (s.data != nullptr && cudaFree(s.data) != cudaSuccess)
      LOG(WARNING) << "weights: freeing an IPC slot failed: " << cudaGetErrorString(cudaGetLastError());
  }
  if (scratch_ != nullptr) cudaFree(scratch_);
  if (stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

Status IpcWeightExport::WriteLocked(const actors::WeightSnapshot& snapshot, const float* device_flat) {
  const size_t bytes = snapshot.flat.size() * sizeof(float);
  if (bytes == 0) return Status::InvalidArgument("weights: an empty version cannot be exported");
  const int target = newest_ < 0 ? 0 : 1 - newest_;
  Slot& s = slots_[target];
  GROVE_RETURN_IF_ERROR(CudaOk(cudaSetDevice(device_), "cudaSetDevice"));
  if (s.capacity < bytes) {
    if (s.data != nullptr) cudaFree(s.data);
    s = Slot{};
    GROVE_RETURN_IF_ERROR(CudaOk(cudaMalloc(&s.data, actors::kIpcSlotHeaderBytes + bytes), "cudaMalloc of an IPC slot"));
    s.capacity = bytes;
  }
  // The GPU learner's masters are the bytes the host snapshot was
  // downloaded from; the first time, that is checked once (a host pass over
  // the snapshot) before the device copy is trusted for good.
  const bool from_device = device_flat != nullptr && device_source_ok_;
  s.version = -1;  // not announced while it is rewritten
  GROVE_RETURN_IF_ERROR(actors::WriteIpcWeightSlot(s.data, from_device ? static_cast<const void*>(device_flat)
                                                                       : static_cast<const void*>(snapshot.flat.data()),
                                                   from_device, bytes, snapshot.version, snapshot.checksum,
                                                   scratch_, stream_));
  if (from_device && !device_source_checked_) {
    device_source_checked_ = true;
    const char* data = static_cast<const char*>(s.data) + actors::kIpcSlotHeaderBytes;
    GROVE_ASSIGN_OR_RETURN(uint64_t dev_sum, kernels::WeightSumDevice(data, bytes, scratch_, stream_));
    if (dev_sum != snapshot.checksum) {  // the snapshot's checksum is the WeightSum of its flat
      LOG(WARNING) << "weights: the learner's device weights differ from the published snapshot of version "
                   << snapshot.version << "; IPC copies come from the host from now on";
      device_source_ok_ = false;
      GROVE_RETURN_IF_ERROR(actors::WriteIpcWeightSlot(s.data, snapshot.flat.data(), false, bytes, snapshot.version,
                                                       snapshot.checksum, scratch_, stream_));
    }
  }
  s.bytes = bytes;
  s.version = snapshot.version;
  newest_ = target;
  return Status::OK();
}

Status IpcWeightExport::Publish(const actors::WeightSnapshot& snapshot, const float* device_flat) {
  if (!wanted_) return Status::OK();
  std::lock_guard<std::mutex> lock(mu_);
  return WriteLocked(snapshot, device_flat);
}

Status IpcWeightExport::Export(const actors::WeightSnapshot& snapshot) {
  wanted_ = true;
  std::lock_guard<std::mutex> lock(mu_);
  for (const Slot& s : slots_)
    if (s.version >= snapshot.version) return Status::OK();  // held, or a newer one is
  return WriteLocked(snapshot, nullptr);
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
