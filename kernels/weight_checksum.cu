#include "kernels/weight_checksum.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

namespace grove::kernels {
namespace {

constexpr int kThreads = 256;

// Grid-stride over the 8-byte words (plus the zero-padded tail word), one
// warp-reduced partial per warp added atomically (a sum mod 2^64 is the
// same in any order).
__global__ void WeightSumKernel(const uint64_t* words, size_t full_words, uint32_t tail, bool has_tail,
                                unsigned long long* out) {
  uint64_t acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < full_words; i += stride)
    acc += WeightSumTerm(words[i], i);
  if (has_tail && blockIdx.x == 0 && threadIdx.x == 0)
    acc += WeightSumTerm(uint64_t(tail), full_words);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) atomicAdd(out, static_cast<unsigned long long>(acc));
}

}  // namespace

Result<uint64_t> WeightSumDevice(const void* data, size_t bytes, uint64_t* scratch, void* stream_ptr) {
  if (bytes % 4 != 0) return Status::InvalidArgument("WeightSumDevice: " + std::to_string(bytes) + " bytes, not whole floats");
  if (bytes > 0 && (data == nullptr || reinterpret_cast<uintptr_t>(data) % 8 != 0))
    return Status::InvalidArgument("WeightSumDevice: data must be 8-byte aligned device memory");
  if (scratch == nullptr) return Status::InvalidArgument("WeightSumDevice: no scratch");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  auto cuda = [](cudaError_t e, const char* what) {
    return e == cudaSuccess ? Status::OK()
                            : Status::Internal(std::string("WeightSumDevice: ") + what + ": " + cudaGetErrorString(e));
  };
  GROVE_RETURN_IF_ERROR(cuda(cudaMemsetAsync(scratch, 0, sizeof(uint64_t), stream), "memset"));
  const size_t full = bytes / 8;
  uint32_t tail = 0;
  const bool has_tail = bytes % 8 != 0;
  if (has_tail) {
    // The last 4 bytes: one small copy (a pageable destination: synchronous).
    GROVE_RETURN_IF_ERROR(cuda(cudaMemcpyAsync(&tail, static_cast<const char*>(data) + 8 * full, 4,
                                               cudaMemcpyDeviceToHost, stream), "tail copy"));
    GROVE_RETURN_IF_ERROR(cuda(cudaStreamSynchronize(stream), "tail sync"));
  }
  if (full > 0 || has_tail) {
    const size_t want = (full + kThreads * 8 - 1) / (kThreads * 8);  // ~8 words per thread at least
    const int blocks = int(std::max<size_t>(1, std::min<size_t>(want, 132 * 16)));
    WeightSumKernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint64_t*>(data), full, tail, has_tail,
                                                     reinterpret_cast<unsigned long long*>(scratch));
    GROVE_RETURN_IF_ERROR(cuda(cudaGetLastError(), "launch"));
  }
  uint64_t sum = 0;
  GROVE_RETURN_IF_ERROR(cuda(cudaMemcpyAsync(&sum, scratch, sizeof(sum), cudaMemcpyDeviceToHost, stream), "result copy"));
  GROVE_RETURN_IF_ERROR(cuda(cudaStreamSynchronize(stream), "sync"));
  return WeightSumFinish(sum, bytes);
}

}  // namespace grove::kernels
