#include "model/gpu_transformer_kernels.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace grove::model::gpu {
namespace {

constexpr int kThreads = 256;

inline int Blocks(int64_t n, int per_block = kThreads) {
  int64_t b = (n + per_block - 1) / per_block;
  return int(b < 65535 * 32 ? (b < 1 ? 1 : b) : 65535 * 32);
}

// 8 bf16 <-> 8 floats through one 16-byte access.
struct alignas(16) Bf16x8 {
  bf16 v[8];
};
// The casts move 6 bytes per element and run ~130 times per gpu-ref step:
// eight elements per thread (two float4 and one 16-byte bf16 access) where
// the pointers allow it (`vec` = both 32-byte aligned: n / 8 groups, then a
// scalar tail), one otherwise.
__global__ void CastKernel(const float* src, bf16* dst, int64_t n, bool vec) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t groups = vec ? n / 8 : 0;
  for (int64_t g = i; g < groups; g += step) {
    const float4 a = reinterpret_cast<const float4*>(src)[2 * g], b = reinterpret_cast<const float4*>(src)[2 * g + 1];
    Bf16x8 o;
    o.v[0] = __float2bfloat16(a.x); o.v[1] = __float2bfloat16(a.y);
    o.v[2] = __float2bfloat16(a.z); o.v[3] = __float2bfloat16(a.w);
    o.v[4] = __float2bfloat16(b.x); o.v[5] = __float2bfloat16(b.y);
    o.v[6] = __float2bfloat16(b.z); o.v[7] = __float2bfloat16(b.w);
    reinterpret_cast<Bf16x8*>(dst)[g] = o;
  }
  for (int64_t j = groups * 8 + i; j < n; j += step) dst[j] = __float2bfloat16(src[j]);
}
__global__ void AddBf16Kernel(const bf16* src, float* dst, int64_t n, bool vec) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t groups = vec ? n / 8 : 0;
  for (int64_t g = i; g < groups; g += step) {
    const Bf16x8 x = reinterpret_cast<const Bf16x8*>(src)[g];
    float4 a = reinterpret_cast<float4*>(dst)[2 * g], b = reinterpret_cast<float4*>(dst)[2 * g + 1];
    a.x += __bfloat162float(x.v[0]); a.y += __bfloat162float(x.v[1]);
    a.z += __bfloat162float(x.v[2]); a.w += __bfloat162float(x.v[3]);
    b.x += __bfloat162float(x.v[4]); b.y += __bfloat162float(x.v[5]);
    b.z += __bfloat162float(x.v[6]); b.w += __bfloat162float(x.v[7]);
    reinterpret_cast<float4*>(dst)[2 * g] = a;
    reinterpret_cast<float4*>(dst)[2 * g + 1] = b;
  }
  for (int64_t j = groups * 8 + i; j < n; j += step) dst[j] += __bfloat162float(src[j]);
}
bool Aligned32(const void* a, const void* b) {
  return reinterpret_cast<uintptr_t>(a) % 32 == 0 && reinterpret_cast<uintptr_t>(b) % 32 == 0;
}

__global__ void GatherRowsKernel(const bf16* src, const int32_t* index, bf16* dst, int rows, int h) {
  const int64_t total = int64_t(rows) * (h / 8);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / (h / 8), c = (i % (h / 8)) * 8;
    *reinterpret_cast<Bf16x8*>(dst + r * h + c) = *reinterpret_cast<const Bf16x8*>(src + int64_t(index[r]) * h + c);
  }
}
__global__ void ScatterRowsKernel(const float* src, const int32_t* index, float* dst, int rows, int h) {
  const int64_t total = int64_t(rows) * h;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    dst[int64_t(index[i / h]) * h + i % h] = src[i];
}

// Eight columns per thread: 16-byte loads of a, two float4 updates of dx.
__global__ void MoeScatterBackwardKernel(const bf16* a, const int32_t* pos, float* dx, int rows, int top_k, int h) {
  const int hv = h / 8;
  const int64_t total = int64_t(rows) * hv;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / hv, c = (i % hv) * 8;
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < top_k; ++j) {
      const int64_t p = pos[t * top_k + j];
      const uint4 va = *reinterpret_cast<const uint4*>(a + p * h + c);
      const bf16* ea = reinterpret_cast<const bf16*>(&va);
#pragma unroll
      for (int k = 0; k < 8; ++k) s[k] += __bfloat162float(ea[k]);
    }
    float4* d = reinterpret_cast<float4*>(dx + t * h + c);
    float4 d0 = d[0], d1 = d[1];
    d0.x += s[0]; d0.y += s[1]; d0.z += s[2]; d0.w += s[3];
    d1.x += s[4]; d1.y += s[5]; d1.z += s[6]; d1.w += s[7];
    d[0] = d0;
    d[1] = d1;
  }
}

// One warp per row.
__global__ void BalanceStatsKernel(const float* scores, const uint16_t* ids, const int32_t* seq,
                                   const int32_t* seq_len, int rows, int experts, int top_k, float* prob_mean,
                                   int32_t* count) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  for (int64_t t = blockIdx.x * int64_t(warps) + threadIdx.x / 32; t < rows; t += int64_t(gridDim.x) * warps) {
    const float* s = scores + t * experts;
    float z = 0.f;
    for (int e = lane; e < experts; e += 32) z += s[e];
    for (int d = 16; d > 0; d /= 2) z += __shfl_xor_sync(0xffffffffu, z, d);
    const int q = seq[t];
    const float w = 1.f / (z * float(seq_len[q]));
    for (int e = lane; e < experts; e += 32) atomicAdd(prob_mean + int64_t(q) * experts + e, s[e] * w);
    if (lane < top_k) atomicAdd(count + int64_t(q) * experts + ids[t * top_k + lane], 1);
  }
}

}  // namespace

void CastToBf16(const float* src, bf16* dst, int64_t n, cudaStream_t stream) {
  const bool vec = Aligned32(src, dst);
  if (n > 0) CastKernel<<<Blocks(vec ? (n + 7) / 8 : n), kThreads, 0, stream>>>(src, dst, n, vec);
}
void AddBf16Into(const bf16* src, float* dst, int64_t n, cudaStream_t stream) {
  const bool vec = Aligned32(src, dst);
  if (n > 0) AddBf16Kernel<<<Blocks(vec ? (n + 7) / 8 : n), kThreads, 0, stream>>>(src, dst, n, vec);
}

void GatherRows(const bf16* src, const int32_t* index, bf16* dst, int rows, int h, cudaStream_t stream) {
  if (rows > 0) GatherRowsKernel<<<Blocks(int64_t(rows) * h / 8), kThreads, 0, stream>>>(src, index, dst, rows, h);
}
void ScatterRows(const float* src, const int32_t* index, float* dst, int rows, int h, cudaStream_t stream) {
  if (rows > 0) ScatterRowsKernel<<<Blocks(int64_t(rows) * h), kThreads, 0, stream>>>(src, index, dst, rows, h);
}

void MoeScatterBackward(const bf16* a, const int32_t* pos, float* dx, int rows, int top_k, int h,
                        cudaStream_t stream) {
  if (rows > 0)
    MoeScatterBackwardKernel<<<Blocks(int64_t(rows) * (h / 8)), kThreads, 0, stream>>>(a, pos, dx, rows, top_k, h);
}

void BalanceStats(const float* scores, const uint16_t* ids, const int32_t* seq, const int32_t* seq_len, int rows,
                  int seqs, int experts, int top_k, float* prob_mean, int32_t* count, cudaStream_t stream) {
  cudaMemsetAsync(prob_mean, 0, sizeof(float) * seqs * experts, stream);
  cudaMemsetAsync(count, 0, sizeof(int32_t) * seqs * experts, stream);
  if (rows > 0)
    BalanceStatsKernel<<<Blocks(rows, kThreads / 32), kThreads, 0, stream>>>(scores, ids, seq, seq_len, rows, experts,
                                                                             top_k, prob_mean, count);
}

}  // namespace grove::model::gpu
