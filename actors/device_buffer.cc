#include "actors/device_buffer.h"

#include "actors/cuda_status.h"

namespace grove::actors {

DeviceBuffer::~DeviceBuffer() { Release(); }

void DeviceBuffer::Release() {
  if (ptr_ == nullptr) return;
  cudaSetDevice(device_);
  cudaFree(ptr_);
  ptr_ = nullptr;
  capacity_ = 0;
}

Result<void*> DeviceBuffer::Reserve(size_t bytes, int device, const std::string& what) {
  if (device_ >= 0 && device != device_)
    return Status::InvalidArgument(what + " lives on device " + std::to_string(device_) + ", not " +
                                   std::to_string(device));
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device), "cudaSetDevice"));
  device_ = device;
  if (capacity_ >= bytes && ptr_ != nullptr) return ptr_;
  Release();
  if (cudaMalloc(&ptr_, bytes) != cudaSuccess) {
    cudaGetLastError();
    ptr_ = nullptr;
    return Status::ResourceExhausted("cannot allocate " + std::to_string(bytes) + " bytes of " + what +
                                     " on device " + std::to_string(device));
  }
  capacity_ = bytes;
  return ptr_;
}

}  // namespace grove::actors
