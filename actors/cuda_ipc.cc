#include "actors/cuda_ipc.h"

#include <cstring>

#include <cuda_runtime_api.h>

#include "actors/cuda_status.h"

namespace grove::actors {
namespace {

Status CudaOk(cudaError_t e, const char* what) { return CudaStatus(e, what, StatusCode::kUnavailable); }

}  // namespace

Result<std::string> ExportCudaIpcHandle(const void* device_ptr, int device) {
  if (device_ptr == nullptr) return Status::InvalidArgument("IPC export of a null buffer");
  GROVE_RETURN_IF_ERROR(CudaOk(cudaSetDevice(device), "cudaSetDevice"));
  cudaIpcMemHandle_t h;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaIpcGetMemHandle(&h, const_cast<void*>(device_ptr)), "cudaIpcGetMemHandle"));
  return std::string(h.reserved, sizeof(h.reserved));
}

Status CopyFromCudaIpcHandle(const std::string& handle, int device, size_t bytes, void* host_dst) {
  cudaIpcMemHandle_t h;
  if (handle.size() != sizeof(h.reserved)) {
    return Status::InvalidArgument("CUDA IPC handle has " + std::to_string(handle.size()) + " bytes, expected " +
                                   std::to_string(sizeof(h.reserved)));
  }
  std::memcpy(h.reserved, handle.data(), sizeof(h.reserved));
  GROVE_RETURN_IF_ERROR(CudaOk(cudaSetDevice(device), "cudaSetDevice"));
  void* src = nullptr;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaIpcOpenMemHandle(&src, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle"));
  Status copied = CudaOk(cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost), "copy from IPC buffer");
  Status closed = CudaOk(cudaIpcCloseMemHandle(src), "cudaIpcCloseMemHandle");
  return copied.ok() ? closed : copied;
}

Status FillIpcWeightAnnounce(const WeightSnapshot& snap, const void* device_flat, size_t bytes,
                             int device, wire::WeightAnnounce::Builder out) {
  if (bytes == 0 || bytes % sizeof(float) != 0) {
    return Status::InvalidArgument("IPC weights must be a non-empty multiple of 4 bytes");
  }
  GROVE_ASSIGN_OR_RETURN(std::string handle, ExportCudaIpcHandle(device_flat, device));
  // The layout comes from FillWeightAnnounce; the size is the device buffer's.
  FillWeightAnnounce(snap, bytes, out);
  out.setTotalBytes(bytes);
  out.setIpcHandle(kj::arrayPtr(reinterpret_cast<const kj::byte*>(handle.data()), handle.size()));
  out.setIpcDevice(device);
  return Status::OK();
}

Result<WeightSnapshot> ReceiveIpcWeights(wire::WeightAnnounce::Reader announce, uint64_t max_bytes, int device) {
  if (!announce.hasIpcHandle()) return Status::InvalidArgument("weight announce carries no IPC handle");
  auto h = announce.getIpcHandle();
  const std::string handle(reinterpret_cast<const char*>(h.begin()), h.size());
  WeightAssembler assembler;
  GROVE_RETURN_IF_ERROR(assembler.Begin(announce, max_bytes));
  GROVE_RETURN_IF_ERROR(assembler.FillAll([&](void* dst, uint64_t bytes) {
    return CopyFromCudaIpcHandle(handle, device >= 0 ? device : announce.getIpcDevice(), bytes, dst);
  }));
  return assembler.Finish();
}

Result<std::string> CudaDeviceUuid(int device) {
  cudaDeviceProp prop;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  return std::string(prop.uuid.bytes, sizeof(prop.uuid.bytes));
}

}  // namespace grove::actors
