// One fp32 row's RMSNorm scale, computed by a whole block: the one
// definition shared by the engine's RMSNorm kernel (rollout/gpu_generator_
// kernels.cu) and the GEMV that fuses the norm into its input staging
// (quant_linear.cu), so both give the same bits.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace grove::kernels {

// Threads of the blocks that norm one row each (the engine's RMSNorm kernel
// and MoeDecodeForward's combine with the next norm folded in): the same
// count, so the same order of BlockRowRstd's sums.
inline constexpr int kRmsNormRowThreads = 256;

// rstd = 1 / sqrt(mean(x^2) + eps) over x[0, hidden), summed in a fixed
// order: thread t takes columns t, t + kThreads, ...; then a warp xor-shuffle
// tree; then the warps' sums in warp order. kThreads threads call it
// (blockDim.x == kThreads, a multiple of 32); `part` is kThreads / 32 floats
// of shared memory, free again only after the next __syncthreads().
template <int kThreads>
__device__ __forceinline__ float BlockRowRstd(const float* xr, int hidden, float eps, float* part) {
  float ss = 0.f;
  for (int j = threadIdx.x; j < hidden; j += kThreads) ss += xr[j] * xr[j];
  for (int d = 16; d > 0; d /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, d);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < kThreads / 32; ++i) total += part[i];
  return rsqrtf(total / float(hidden) + eps);
}

// bf16(x[c] * rstd * w[c]) for the 8 columns col..col+7, as 16 bytes: the
// normed row's bf16 values as RmsNormRows writes them.
__device__ __forceinline__ uint4 RmsNormedOctet(const float* x, const float* w, float rstd, int col) {
  alignas(16) __nv_bfloat16 o[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = __float2bfloat16(x[col + e] * rstd * w[col + e]);
  return *reinterpret_cast<const uint4*>(o);
}

}  // namespace grove::kernels
