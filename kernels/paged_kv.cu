#include "kernels/paged_kv.h"

#include <cmath>
#include <string>

namespace grove::kernels {
namespace {

constexpr int kAppendThreads = 256;
constexpr int kAttnWarps = 4;

// Element offset of (page row of position p, kv head kh, dim 0) in one
// layer's k or v pages; -1 when the position has no valid page.
__device__ inline int64_t CacheOffset(const PagedKvCache& c, int slot, int p, int kh) {
  const int page_index = p / c.page_tokens;
  if (p < 0 || page_index >= c.max_pages_per_seq) return -1;
  const int page = c.page_table[int64_t(slot) * c.max_pages_per_seq + page_index];
  if (page < 0 || page >= c.num_pages) return -1;
  return ((int64_t(page) * c.page_tokens + p % c.page_tokens) * c.kv_heads + kh) * c.head_dim;
}

// One block per row. Work items: rope pairs of the q heads and the k heads
// ((heads + kv_heads) * half), then the v elements (kv_heads * head_dim).
__global__ void AppendKernel(PagedKvCache c, PagedRows rows, int heads, const float* qkv, int64_t ld,
                             const float* rope_cos, const float* rope_sin, __nv_bfloat16* q_out) {
  const int r = blockIdx.x;
  const int slot = rows.slot[r], p = rows.pos[r];
  const int hd = c.head_dim, half = hd / 2;
  const float* row = qkv + int64_t(r) * ld;
  __nv_bfloat16* qo = q_out + int64_t(r) * heads * hd;
  const int pairs = (heads + c.kv_heads) * half;
  const int vcount = c.kv_heads * hd;
  for (int i = threadIdx.x; i < pairs + vcount; i += blockDim.x) {
    if (i < pairs) {
      const int head = i / half, j = i % half;  // head < heads: q, else k head (head - heads)
      const float* x = row + int64_t(head) * hd;    // q heads then k heads are contiguous in qkv
      float cs = 0.f, sn = 0.f;
      if (slot >= 0) {
        cs = rope_cos[int64_t(p) * half + j];
        sn = rope_sin[int64_t(p) * half + j];
      }
      const float a = x[j], b = x[j + half];
      const float y0 = a * cs - b * sn, y1 = a * sn + b * cs;
      if (head < heads) {
        qo[head * hd + j] = __float2bfloat16(y0);
        qo[head * hd + j + half] = __float2bfloat16(y1);
      } else if (slot >= 0) {
        const int64_t off = CacheOffset(c, slot, p, head - heads);
        if (off >= 0) {
          c.k[off + j] = __float2bfloat16(y0);
          c.k[off + j + half] = __float2bfloat16(y1);
        }
      }
    } else if (slot >= 0) {
      const int e = i - pairs, kh = e / hd, d = e % hd;
      const int64_t off = CacheOffset(c, slot, p, kh);
      if (off >= 0) c.v[off + d] = __float2bfloat16(row[int64_t(heads + c.kv_heads) * hd + e]);
    }
  }
}

// One block of kAttnWarps warps per (row, kv head). The G = heads / kv_heads
// query heads of that kv head are handled together (each key is read once
// for all of them). Lane l holds dims [l * E, l * E + E) of every vector
// (E = HD / 32); warp w takes keys w, w + kAttnWarps, ... with its own online
// softmax; the warps' partial results are merged at the end.
template <int HD>
__global__ void __launch_bounds__(kAttnWarps * 32)
    AttentionKernel(PagedKvCache c, PagedRows rows, int heads, const __nv_bfloat16* q, __nv_bfloat16* out,
                    float scale) {
  constexpr int E = HD / 32;
  const int r = blockIdx.x, kh = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int G = heads / c.kv_heads;
  const int slot = rows.slot[r], p = rows.pos[r];
  __nv_bfloat16* o = out + int64_t(r) * heads * HD + int64_t(kh) * G * HD;
  const bool valid = slot >= 0 && p >= 0 && p < c.page_tokens * c.max_pages_per_seq;
  if (!valid) {
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) o[i] = __float2bfloat16(0.f);
    return;
  }
  float qv[kPagedMaxGroup][E], acc[kPagedMaxGroup][E], m[kPagedMaxGroup], l[kPagedMaxGroup];
  const __nv_bfloat16* qr = q + int64_t(r) * heads * HD + int64_t(kh) * G * HD;
#pragma unroll
  for (int g = 0; g < kPagedMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      qv[g][e] = g < G ? __bfloat162float(qr[g * HD + lane * E + e]) : 0.f;
      acc[g][e] = 0.f;
    }
  }
  for (int j = warp; j <= p; j += kAttnWarps) {
    const int64_t off = CacheOffset(c, slot, j, kh);
    if (off < 0) continue;  // a missing page: contract broken, key skipped rather than read out of bounds
    float kv[E], vv[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      kv[e] = __bfloat162float(c.k[off + lane * E + e]);
      vv[e] = __bfloat162float(c.v[off + lane * E + e]);
    }
#pragma unroll
    for (int g = 0; g < kPagedMaxGroup; ++g) {
      if (g >= G) break;
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) s += qv[g][e] * kv[e];
#pragma unroll
      for (int d = 16; d > 0; d /= 2) s += __shfl_xor_sync(0xffffffffu, s, d);
      s *= scale;
      const float m_new = fmaxf(m[g], s);
      const float corr = expf(m[g] - m_new);  // 0 on the first key (m = -inf)
      const float pj = expf(s - m_new);
      l[g] = l[g] * corr + pj;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] = acc[g][e] * corr + pj * vv[e];
      m[g] = m_new;
    }
  }
  // Merge the warps: out = sum_w acc_w e^(m_w - M) / sum_w l_w e^(m_w - M).
  __shared__ float sm_m[kAttnWarps][kPagedMaxGroup], sm_l[kAttnWarps][kPagedMaxGroup];
  __shared__ float sm_acc[kAttnWarps][kPagedMaxGroup][HD];
#pragma unroll
  for (int g = 0; g < kPagedMaxGroup; ++g) {
    if (g >= G) break;
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_acc[warp][g][lane * E + e] = acc[g][e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD;
    float M = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, sm_m[w][g]);
    float num = 0.f, den = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) {
      if (sm_l[w][g] == 0.f) continue;  // a warp that saw no key
      const float f = expf(sm_m[w][g] - M);
      num += sm_acc[w][g][d] * f;
      den += sm_l[w][g] * f;
    }
    o[i] = __float2bfloat16(den > 0.f ? num / den : 0.f);
  }
}

Status CheckCache(const PagedKvCache& c, int heads, const char* who) {
  const std::string w = who;
  if (c.head_dim != 64 && c.head_dim != 128) return Status::InvalidArgument(w + ": head_dim must be 64 or 128");
  if (c.kv_heads < 1 || heads < 1 || heads % c.kv_heads != 0 || heads / c.kv_heads > kPagedMaxGroup)
    return Status::InvalidArgument(w + ": heads must be a multiple of kv_heads, at most " +
                                   std::to_string(kPagedMaxGroup) + " per kv head");
  if (c.page_tokens < 1 || c.max_pages_per_seq < 1 || c.num_pages < 1)
    return Status::InvalidArgument(w + ": page_tokens, max_pages_per_seq and num_pages must be >= 1");
  if (!c.k || !c.v || !c.page_table) return Status::InvalidArgument(w + ": null cache pointer");
  return Status::OK();
}

Status LaunchStatus(const char* who) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string(who) + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace

Status PagedKvAppend(const PagedKvCache& cache, const PagedRows& rows, int heads, const float* qkv, int64_t ld,
                     const float* rope_cos, const float* rope_sin, __nv_bfloat16* q_out, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedKvAppend"));
  if (rows.rows < 0) return Status::InvalidArgument("PagedKvAppend: rows < 0");
  if (rows.rows == 0) return Status::OK();
  if (ld < int64_t(heads + 2 * cache.kv_heads) * cache.head_dim)
    return Status::InvalidArgument("PagedKvAppend: ld smaller than the q, k, v columns");
  if (!qkv || !rope_cos || !rope_sin || !q_out || !rows.slot || !rows.pos)
    return Status::InvalidArgument("PagedKvAppend: null pointer");
  AppendKernel<<<rows.rows, kAppendThreads, 0, stream>>>(cache, rows, heads, qkv, ld, rope_cos, rope_sin, q_out);
  return LaunchStatus("PagedKvAppend");
}

Status PagedAttention(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                      __nv_bfloat16* out, float scale, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedAttention"));
  if (rows.rows < 0) return Status::InvalidArgument("PagedAttention: rows < 0");
  if (rows.rows == 0) return Status::OK();
  if (!q || !out || !rows.slot || !rows.pos) return Status::InvalidArgument("PagedAttention: null pointer");
  if (scale == 0.f) scale = float(1.0 / std::sqrt(double(cache.head_dim)));
  const dim3 grid(rows.rows, cache.kv_heads);
  if (cache.head_dim == 64)
    AttentionKernel<64><<<grid, kAttnWarps * 32, 0, stream>>>(cache, rows, heads, q, out, scale);
  else
    AttentionKernel<128><<<grid, kAttnWarps * 32, 0, stream>>>(cache, rows, heads, q, out, scale);
  return LaunchStatus("PagedAttention");
}

}  // namespace grove::kernels
