#include "model/gpu_transformer_kernels.h"

#include <cuda_runtime.h>

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
__device__ inline void Load8(const bf16* p, float* f) {
  const Bf16x8 x = *reinterpret_cast<const Bf16x8*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = __bfloat162float(x.v[i]);
}
__device__ inline void Store8(bf16* p, const float* f) {
  Bf16x8 x;
#pragma unroll
  for (int i = 0; i < 8; ++i) x.v[i] = __float2bfloat16(f[i]);
  *reinterpret_cast<Bf16x8*>(p) = x;
}

__global__ void CastKernel(const float* src, bf16* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16(src[i]);
}
__global__ void AddBf16Kernel(const bf16* src, float* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] += __bfloat162float(src[i]);
}

// 32x32 tiles through shared memory; blockIdx.z = expert.
__global__ void PackTransposeKernel(const bf16* src, int64_t stride, int n, int k, bf16* dst) {
  __shared__ bf16 tile[32][33];
  const int e = blockIdx.z;
  const bf16* s = src + e * stride;
  bf16* d = dst + int64_t(e) * n * k;
  const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int r = r0 + i, c = c0 + threadIdx.x;
    if (r < n && c < k) tile[i][threadIdx.x] = s[int64_t(r) * k + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int c = c0 + i, r = r0 + threadIdx.x;  // out row c (of k), column r (of n)
    if (r < n && c < k) d[int64_t(c) * n + r] = tile[threadIdx.x][i];
  }
}

__global__ void EmbeddingGatherKernel(const int32_t* tokens, const bf16* table, bf16* out, int rows, int h) {
  const int64_t total = int64_t(rows) * (h / 8);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / (h / 8), c = (i % (h / 8)) * 8;
    *reinterpret_cast<Bf16x8*>(out + r * h + c) =
        *reinterpret_cast<const Bf16x8*>(table + int64_t(tokens[r]) * h + c);
  }
}
__global__ void EmbeddingScatterKernel(const int32_t* tokens, const float* d, float* dtable, int rows, int h) {
  const int64_t total = int64_t(rows) * h;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / h, c = i % h;
    atomicAdd(dtable + int64_t(tokens[r]) * h + c, d[i]);
  }
}

__global__ void RopeKernel(bf16* x, const int32_t* pos, const float* cos_t, const float* sin_t, int rows,
                           int heads, int head_dim, bool inverse) {
  const int half = head_dim / 2;
  const int64_t total = int64_t(rows) * heads * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int j = int(i % half);
    const int64_t rh = i / half;  // row * heads + head
    const int64_t r = rh / heads;
    const int64_t p = pos[r];
    const float c = cos_t[p * half + j], s = inverse ? -sin_t[p * half + j] : sin_t[p * half + j];
    bf16* v = x + rh * head_dim;
    const float a = __bfloat162float(v[j]), b = __bfloat162float(v[j + half]);
    v[j] = __float2bfloat16(a * c - b * s);
    v[j + half] = __float2bfloat16(a * s + b * c);
  }
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

// One block per expert: count, then (after the scan) stable ranks.
__global__ void MoeCountKernel(const uint16_t* ids, int n, int32_t* counts) {
  const int e = blockIdx.x;
  int c = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) c += ids[i] == e;
  __shared__ int warp_sum[32];
  for (int d = 16; d > 0; d /= 2) c += __shfl_xor_sync(0xffffffffu, c, d);
  if (threadIdx.x % 32 == 0) warp_sum[threadIdx.x / 32] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int w = 0; w < int(blockDim.x / 32); ++w) s += warp_sum[w];
    counts[e] = s;
  }
}
__global__ void MoeScanKernel(const int32_t* counts, int experts, int32_t* offsets) {
  if (threadIdx.x == 0) {
    int s = 0;
    for (int e = 0; e < experts; ++e) {
      offsets[e] = s;
      s += counts[e];
    }
    offsets[experts] = s;
  }
}
__global__ void MoeRankKernel(const uint16_t* ids, int n, const int32_t* offsets, int32_t* pos, int32_t* src) {
  const int e = blockIdx.x;
  __shared__ int warp_sum[32];
  __shared__ int base;
  if (threadIdx.x == 0) base = offsets[e];
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int i0 = 0; i0 < n; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    const bool mine = i < n && ids[i] == e;
    const unsigned mask = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_sum[warp] = __popc(mask);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? warp_sum[w] : 0;
      total += warp_sum[w];
    }
    if (mine) {
      const int p = base + before + __popc(mask & ((1u << lane) - 1u));
      pos[i] = p;
      src[p] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0) base += total;
    __syncthreads();
  }
}

__global__ void MoeGatherKernel(const bf16* x, const int32_t* src, bf16* xe, int pairs, int top_k, int h) {
  const int64_t total = int64_t(pairs) * (h / 8);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i / (h / 8), c = (i % (h / 8)) * 8;
    *reinterpret_cast<Bf16x8*>(xe + p * h + c) =
        *reinterpret_cast<const Bf16x8*>(x + int64_t(src[p] / top_k) * h + c);
  }
}

// One thread per 8 columns of one row.
__global__ void MoeCombineKernel(bf16* x, const float* shared, const bf16* y, const float* gates,
                                 const int32_t* pos, int rows, int top_k, int h) {
  const int64_t total = int64_t(rows) * (h / 8);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / (h / 8), c = (i % (h / 8)) * 8;
    float acc[8], v[8];
    Load8(x + t * h + c, acc);
    if (shared)
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] += shared[t * h + c + q];
    for (int j = 0; j < top_k; ++j) {
      const float g = gates[t * top_k + j];
      Load8(y + int64_t(pos[t * top_k + j]) * h + c, v);
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] += g * v[q];
    }
    Store8(x + t * h + c, acc);
  }
}

// One warp per grouped row p.
__global__ void MoeCombineBackwardKernel(const bf16* dout, const bf16* y, const float* gates, const int32_t* pos,
                                         bf16* dy, float* dgate, int rows, int top_k, int h) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t pairs = int64_t(rows) * top_k;
  for (int64_t i = blockIdx.x * int64_t(warps) + threadIdx.x / 32; i < pairs; i += int64_t(gridDim.x) * warps) {
    const int64_t t = i / top_k, p = pos[i];
    const float g = gates[i];
    float dot = 0.f, d[8], v[8];
    for (int c = lane * 8; c < h; c += 256) {
      Load8(dout + t * h + c, d);
      Load8(y + p * h + c, v);
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        dot += d[q] * v[q];
        d[q] *= g;
      }
      Store8(dy + p * h + c, d);
    }
    for (int s = 16; s > 0; s /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, s);
    if (lane == 0) dgate[i] = dot;
  }
}

__global__ void MoeScatterBackwardKernel(const float* a, const float* b, const int32_t* pos, float* dx, int rows,
                                         int top_k, int h) {
  const int64_t total = int64_t(rows) * h;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / h, c = i % h;
    float s = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const int64_t p = pos[t * top_k + j];
      s += a[p * h + c] + b[p * h + c];
    }
    dx[i] += s;
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

// One warp per row; experts <= 256 (8 per lane).
__global__ void RouterBackwardKernel(RouterBackwardArgs a) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  constexpr int kPer = 8;
  for (int64_t t = blockIdx.x * int64_t(warps) + threadIdx.x / 32; t < a.rows; t += int64_t(gridDim.x) * warps) {
    const float* sc = a.scores + t * a.experts;
    float s[kPer], dl[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = i * 32 + lane;
      s[i] = e < a.experts ? sc[e] : 0.f;
      dl[i] = 0.f;
    }
    // d/ds from the gates.
    const uint16_t* id = a.ids + t * a.top_k;
    const float* dg = a.dgate + t * a.top_k;
    const float* g = a.gates + t * a.top_k;
    float z = 0.f, dot = 0.f;
    if (a.norm_topk)
      for (int j = 0; j < a.top_k; ++j) {
        z += sc[id[j]];
        dot += dg[j] * g[j] / a.route_scale;
      }
    for (int j = 0; j < a.top_k; ++j) {
      const int e = id[j];
      const float v = a.norm_topk ? a.route_scale * (dg[j] - dot) / z : a.route_scale * dg[j];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (i * 32 + lane == e) dl[i] += v;
    }
    if (a.alpha > 0.f) {  // balance loss through s / sum s
      const int q = a.seq[t];
      const float len = float(a.seq_len[q]);
      const float coef = a.alpha * float(a.experts) / (float(a.top_k) * len) / len;
      float zz = 0.f, dd = 0.f, fc[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int e = i * 32 + lane;
        fc[i] = e < a.experts ? coef * float(a.count[int64_t(q) * a.experts + e]) : 0.f;
        zz += s[i];
      }
      for (int d = 16; d > 0; d /= 2) zz += __shfl_xor_sync(0xffffffffu, zz, d);
#pragma unroll
      for (int i = 0; i < kPer; ++i) dd += fc[i] * s[i] / zz;
      for (int d = 16; d > 0; d /= 2) dd += __shfl_xor_sync(0xffffffffu, dd, d);
#pragma unroll
      for (int i = 0; i < kPer; ++i) dl[i] += (fc[i] - dd) / zz;
    }
    if (a.sigmoid) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) dl[i] *= s[i] * (1.f - s[i]);
    } else {
      float dd = 0.f;
#pragma unroll
      for (int i = 0; i < kPer; ++i) dd += dl[i] * s[i];
      for (int d = 16; d > 0; d /= 2) dd += __shfl_xor_sync(0xffffffffu, dd, d);
#pragma unroll
      for (int i = 0; i < kPer; ++i) dl[i] = s[i] * (dl[i] - dd);
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = i * 32 + lane;
      if (e < a.experts) a.dlogits[t * a.experts + e] = __float2bfloat16(dl[i]);
    }
  }
}

// One block per row.
__device__ inline float BlockReduce(float v, bool is_max, float* smem) {
  for (int d = 16; d > 0; d /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, d);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = is_max ? -INFINITY : 0.f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) v = is_max ? fmaxf(v, smem[w]) : v + smem[w];
  return v;
}
__global__ void LogProbForwardKernel(const float* logits, const int32_t* target, float* lse, float* logp,
                                     int vocab) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const float* z = logits + r * vocab;
  float mx = -INFINITY;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) mx = fmaxf(mx, z[v]);
  mx = BlockReduce(mx, true, smem);
  float s = 0.f;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) s += expf(z[v] - mx);
  s = BlockReduce(s, false, smem);
  if (threadIdx.x == 0) {
    const float l = mx + logf(s);
    lse[r] = l;
    logp[r] = z[target[r]] - l;
  }
}
__global__ void LogProbBackwardKernel(const float* logits, const int32_t* target, const float* lse, const float* g,
                                      bf16* dz, int vocab) {
  const int64_t r = blockIdx.x;
  const float* z = logits + r * vocab;
  const float l = lse[r], gr = g[r];
  const int tg = target[r];
  for (int v = threadIdx.x; v < vocab; v += blockDim.x)
    dz[r * vocab + v] = __float2bfloat16(gr * ((v == tg ? 1.f : 0.f) - expf(z[v] - l)));
}

}  // namespace

void CastToBf16(const float* src, bf16* dst, int64_t n, cudaStream_t stream) {
  if (n > 0) CastKernel<<<Blocks(n), kThreads, 0, stream>>>(src, dst, n);
}
void AddBf16Into(const bf16* src, float* dst, int64_t n, cudaStream_t stream) {
  if (n > 0) AddBf16Kernel<<<Blocks(n), kThreads, 0, stream>>>(src, dst, n);
}

void PackExperts(const bf16* src, int64_t expert_stride, int experts, int n, int k, bool transpose, bf16* dst,
                 cudaStream_t stream) {
  if (experts == 0) return;
  if (!transpose) {
    cudaMemcpy2DAsync(dst, size_t(n) * k * sizeof(bf16), src, size_t(expert_stride) * sizeof(bf16),
                      size_t(n) * k * sizeof(bf16), experts, cudaMemcpyDeviceToDevice, stream);
    return;
  }
  dim3 grid((k + 31) / 32, (n + 31) / 32, experts);
  PackTransposeKernel<<<grid, dim3(32, 8), 0, stream>>>(src, expert_stride, n, k, dst);
}

void EmbeddingGather(const int32_t* tokens, const bf16* table, bf16* out, int rows, int h, cudaStream_t stream) {
  if (rows > 0) EmbeddingGatherKernel<<<Blocks(int64_t(rows) * h / 8), kThreads, 0, stream>>>(tokens, table, out, rows, h);
}
void EmbeddingScatterAdd(const int32_t* tokens, const float* d, float* dtable, int rows, int h,
                         cudaStream_t stream) {
  if (rows > 0) EmbeddingScatterKernel<<<Blocks(int64_t(rows) * h), kThreads, 0, stream>>>(tokens, d, dtable, rows, h);
}

void Rope(bf16* x, const int32_t* pos, const float* cos_t, const float* sin_t, int rows, int heads, int head_dim,
          bool inverse, cudaStream_t stream) {
  const int64_t n = int64_t(rows) * heads * (head_dim / 2);
  if (n > 0) RopeKernel<<<Blocks(n), kThreads, 0, stream>>>(x, pos, cos_t, sin_t, rows, heads, head_dim, inverse);
}

void GatherRows(const bf16* src, const int32_t* index, bf16* dst, int rows, int h, cudaStream_t stream) {
  if (rows > 0) GatherRowsKernel<<<Blocks(int64_t(rows) * h / 8), kThreads, 0, stream>>>(src, index, dst, rows, h);
}
void ScatterRows(const float* src, const int32_t* index, float* dst, int rows, int h, cudaStream_t stream) {
  if (rows > 0) ScatterRowsKernel<<<Blocks(int64_t(rows) * h), kThreads, 0, stream>>>(src, index, dst, rows, h);
}

void MoeGroup(const uint16_t* ids, int rows, int top_k, int experts, int32_t* counts, int32_t* offsets,
              int32_t* pos, int32_t* src, cudaStream_t stream) {
  const int n = rows * top_k;
  MoeCountKernel<<<experts, 1024, 0, stream>>>(ids, n, counts);
  MoeScanKernel<<<1, 32, 0, stream>>>(counts, experts, offsets);
  if (n > 0) MoeRankKernel<<<experts, 1024, 0, stream>>>(ids, n, offsets, pos, src);
}
void MoeGather(const bf16* x, const int32_t* src, bf16* xe, int rows, int top_k, int h, cudaStream_t stream) {
  const int64_t pairs = int64_t(rows) * top_k;
  if (pairs > 0) MoeGatherKernel<<<Blocks(pairs * h / 8), kThreads, 0, stream>>>(x, src, xe, int(pairs), top_k, h);
}
void MoeCombine(bf16* x, const float* shared, const bf16* y, const float* gates, const int32_t* pos, int rows,
                int top_k, int h, cudaStream_t stream) {
  if (rows > 0)
    MoeCombineKernel<<<Blocks(int64_t(rows) * h / 8), kThreads, 0, stream>>>(x, shared, y, gates, pos, rows, top_k, h);
}
void MoeCombineBackward(const bf16* dout, const bf16* y, const float* gates, const int32_t* pos, bf16* dy,
                        float* dgate, int rows, int top_k, int h, cudaStream_t stream) {
  const int64_t pairs = int64_t(rows) * top_k;
  if (pairs > 0)
    MoeCombineBackwardKernel<<<Blocks(pairs, kThreads / 32), kThreads, 0, stream>>>(dout, y, gates, pos, dy, dgate,
                                                                                     rows, top_k, h);
}
void MoeScatterBackward(const float* a, const float* b, const int32_t* pos, float* dx, int rows, int top_k, int h,
                        cudaStream_t stream) {
  if (rows > 0) MoeScatterBackwardKernel<<<Blocks(int64_t(rows) * h), kThreads, 0, stream>>>(a, b, pos, dx, rows, top_k, h);
}

void BalanceStats(const float* scores, const uint16_t* ids, const int32_t* seq, const int32_t* seq_len, int rows,
                  int seqs, int experts, int top_k, float* prob_mean, int32_t* count, cudaStream_t stream) {
  cudaMemsetAsync(prob_mean, 0, sizeof(float) * seqs * experts, stream);
  cudaMemsetAsync(count, 0, sizeof(int32_t) * seqs * experts, stream);
  if (rows > 0)
    BalanceStatsKernel<<<Blocks(rows, kThreads / 32), kThreads, 0, stream>>>(scores, ids, seq, seq_len, rows, experts,
                                                                             top_k, prob_mean, count);
}

void RouterBackward(const RouterBackwardArgs& a, cudaStream_t stream) {
  if (a.rows > 0) RouterBackwardKernel<<<Blocks(a.rows, kThreads / 32), kThreads, 0, stream>>>(a);
}

void LogProbForward(const float* logits, const int32_t* target, float* lse, float* logp, int rows, int vocab,
                    cudaStream_t stream) {
  if (rows > 0) LogProbForwardKernel<<<rows, 512, 0, stream>>>(logits, target, lse, logp, vocab);
}
void LogProbBackward(const float* logits, const int32_t* target, const float* lse, const float* g, bf16* dz,
                     int rows, int vocab, cudaStream_t stream) {
  if (rows > 0) LogProbBackwardKernel<<<rows, 512, 0, stream>>>(logits, target, lse, g, dz, vocab);
}

}  // namespace grove::model::gpu
