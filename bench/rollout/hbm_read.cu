#include "bench/rollout/hbm_read.h"

#include <cstdint>

namespace grove::bench {
namespace {

__global__ void HbmReadKernel(const uint4* __restrict__ p, size_t count, unsigned* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < count; i += size_t{gridDim.x} * blockDim.x) {
    const uint4 v = __ldcs(p + i);  // streaming: evict first
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B9u) *sink = acc;  // practically never taken; the loads must happen
}

}  // namespace

cudaError_t LaunchHbmRead(const void* buf, size_t bytes, unsigned* sink, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  HbmReadKernel<<<sms * 8, 512, 0, stream>>>(static_cast<const uint4*>(buf), bytes / 16, sink);
  return cudaGetLastError();
}

}  // namespace grove::bench
