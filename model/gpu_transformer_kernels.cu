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

// Block (q, split) of 8 warps: sequence q's split-th share of rows, a warp
// a row in turn; lane l sums experts l, l + 32, ... in row order, the warps'
// sums are added in warp order. Counts: shared-memory integer atomics
// (exact, order-free).
constexpr int kBalanceWarps = 8;
constexpr int kBalanceMaxExperts = 256;
__global__ void __launch_bounds__(kBalanceWarps * 32)
    BalancePartialKernel(const float* scores, const uint16_t* ids, const int32_t* cu_seqlens, int experts, int top_k,
                         float* part_prob, int32_t* part_count) {
  __shared__ float warp_sum[kBalanceWarps][kBalanceMaxExperts];
  __shared__ int hist[kBalanceMaxExperts];
  const int q = blockIdx.x, split = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int r0 = cu_seqlens[q], r1 = cu_seqlens[q + 1], len = r1 - r0;
  const int share = (len + gridDim.y - 1) / gridDim.y;
  const int begin = r0 + share * split, end = min(r1, begin + share);
  constexpr int kSlots = kBalanceMaxExperts / 32;
  float acc[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) acc[i] = 0.f;
  for (int t = begin + warp; t < end; t += kBalanceWarps) {
    const float* s = scores + int64_t(t) * experts;
    float v[kSlots], z = 0.f;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      v[i] = i * 32 + lane < experts ? s[i * 32 + lane] : 0.f;
      z += v[i];
    }
    for (int d = 16; d > 0; d /= 2) z += __shfl_xor_sync(0xffffffffu, z, d);
    const float w = 1.f / (z * float(len));
#pragma unroll
    for (int i = 0; i < kSlots; ++i) acc[i] += v[i] * w;
    if (lane < top_k) {
      const int e = ids[int64_t(t) * top_k + lane];
      if (e < experts) atomicAdd(&hist[e], 1);
    }
  }
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
    if (i * 32 + lane < experts) warp_sum[warp][i * 32 + lane] = acc[i];
  __syncthreads();
  const int64_t out = (int64_t(q) * gridDim.y + split) * experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    float sum = 0.f;
    for (int w = 0; w < kBalanceWarps; ++w) sum += warp_sum[w][e];
    part_prob[out + e] = sum;
    part_count[out + e] = hist[e];
  }
}

// The splits' shares in split order.
__global__ void BalanceFinalKernel(const float* part_prob, const int32_t* part_count, int experts, float* prob_mean,
                                   int32_t* count) {
  const int q = blockIdx.x;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    float p = 0.f;
    int32_t c = 0;
    for (int k = 0; k < kBalanceSplits; ++k) {
      p += part_prob[(int64_t(q) * kBalanceSplits + k) * experts + e];
      c += part_count[(int64_t(q) * kBalanceSplits + k) * experts + e];
    }
    prob_mean[int64_t(q) * experts + e] = p;
    count[int64_t(q) * experts + e] = c;
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

size_t BalanceStatsWorkspaceBytes(int seqs, int experts) {
  return size_t(seqs) * kBalanceSplits * experts * (sizeof(float) + sizeof(int32_t));
}

void BalanceStats(const float* scores, const uint16_t* ids, const int32_t* cu_seqlens, int seqs, int experts,
                  int top_k, void* workspace, float* prob_mean, int32_t* count, cudaStream_t stream) {
  if (seqs <= 0 || experts <= 0) return;
  auto* part_prob = static_cast<float*>(workspace);
  auto* part_count = reinterpret_cast<int32_t*>(part_prob + size_t(seqs) * kBalanceSplits * experts);
  BalancePartialKernel<<<dim3(seqs, kBalanceSplits), kBalanceWarps * 32, 0, stream>>>(
      scores, ids, cu_seqlens, experts, top_k, part_prob, part_count);
  BalanceFinalKernel<<<seqs, 256, 0, stream>>>(part_prob, part_count, experts, prob_mean, count);
}

}  // namespace grove::model::gpu
