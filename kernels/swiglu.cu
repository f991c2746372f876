#include "kernels/swiglu.h"

#include <algorithm>
#include <string>

#include "kernels/vector_io.cuh"

namespace grove::kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float Sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

__global__ void SwiGluForwardKernel(const __nv_bfloat16* __restrict__ g,
                                    const __nv_bfloat16* __restrict__ u,
                                    __nv_bfloat16* __restrict__ h, int64_t chunks) {
  for (int64_t c = blockIdx.x * int64_t{kThreads} + threadIdx.x; c < chunks;
       c += int64_t{gridDim.x} * kThreads) {
    float gv[8], uv[8], out[8];
    LoadBf16x8(g + 8 * c, gv);
    LoadBf16x8(u + 8 * c, uv);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = gv[i] * Sigmoid(gv[i]) * uv[i];
    StoreBf16x8(h + 8 * c, out);
  }
}

__global__ void SwiGluBackwardKernel(const __nv_bfloat16* __restrict__ dh,
                                     const __nv_bfloat16* __restrict__ g,
                                     const __nv_bfloat16* __restrict__ u,
                                     __nv_bfloat16* __restrict__ dg,
                                     __nv_bfloat16* __restrict__ du, int64_t chunks) {
  for (int64_t c = blockIdx.x * int64_t{kThreads} + threadIdx.x; c < chunks;
       c += int64_t{gridDim.x} * kThreads) {
    float dhv[8], gv[8], uv[8], dgo[8], duo[8];
    LoadBf16x8(dh + 8 * c, dhv);
    LoadBf16x8(g + 8 * c, gv);
    LoadBf16x8(u + 8 * c, uv);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float s = Sigmoid(gv[i]);
      const float silu = gv[i] * s;
      dgo[i] = dhv[i] * uv[i] * s * (1.f + gv[i] * (1.f - s));
      duo[i] = dhv[i] * silu;
    }
    StoreBf16x8(dg + 8 * c, dgo);
    StoreBf16x8(du + 8 * c, duo);
  }
}

bool Aligned16(const void* p) { return p && reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Status Check(int64_t count) {
  if (count < 0 || count % 8 != 0)
    return Status::InvalidArgument("SwiGLU: count must be a non-negative multiple of 8, got " +
                                   std::to_string(count));
  return Status::OK();
}

int Blocks(int64_t chunks) {
  return static_cast<int>(std::min<int64_t>((chunks + kThreads - 1) / kThreads, 132 * 16));
}

Status LaunchStatus(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

Status SwiGluForward(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* h,
                     int64_t count, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(Check(count));
  if (count == 0) return Status::OK();
  if (!Aligned16(g) || !Aligned16(u) || !Aligned16(h))
    return Status::InvalidArgument("SwiGLU: pointers must be non-null and 16-byte aligned");
  SwiGluForwardKernel<<<Blocks(count / 8), kThreads, 0, stream>>>(g, u, h, count / 8);
  return LaunchStatus("SwiGLU forward launch");
}

Status SwiGluBackward(const __nv_bfloat16* dh, const __nv_bfloat16* g, const __nv_bfloat16* u,
                      __nv_bfloat16* dg, __nv_bfloat16* du, int64_t count, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(Check(count));
  if (count == 0) return Status::OK();
  if (!Aligned16(dh) || !Aligned16(g) || !Aligned16(u) || !Aligned16(dg) || !Aligned16(du))
    return Status::InvalidArgument("SwiGLU: pointers must be non-null and 16-byte aligned");
  SwiGluBackwardKernel<<<Blocks(count / 8), kThreads, 0, stream>>>(dh, g, u, dg, du, count / 8);
  return LaunchStatus("SwiGLU backward launch");
}

}  // namespace grove::kernels
