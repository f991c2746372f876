// Device pieces of the paged-KV attention (kernels/paged_kv.cu), shared with
// the persistent batch-1 decode step (kernels/decode_step.cu) so both run the
// same arithmetic: cache addressing, the rotary pair, the warps' online
// softmax over a key range, and one split-KV chunk of one (row, kv head).
// Device code: include only from .cu files.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/paged_kv.h"
#include "kernels/softmax_merge.h"

namespace grove::kernels::paged_device {

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

// Rotary embedding of one pair (a = x[j], b = x[j + half]) with each product
// rounded before the difference/sum, as model/layers.h's RopeRow computes it
// on the host (no fma contraction). AppendKernel and the split pass's fused
// append both use it, so they write the same bits.
__device__ __forceinline__ void RopePair(float a, float b, float cs, float sn, float& y0, float& y1) {
  y0 = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn));
  y1 = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs));
}

// The online-softmax states of a block's warps after AttendKeys, for up to
// kG query heads per kv head.
template <int HD, int kG = kPagedMaxGroup>
struct WarpStates {
  float m[kAttnWarps][kG], l[kAttnWarps][kG];
  float acc[kAttnWarps][kG][HD];
};

// The block's kAttnWarps warps attend keys lo..hi (inclusive) of slot
// through kv head kh for the G query heads at qr (each key is read once for
// all of them). Warps past kAttnWarps (a wider block) only join the
// closing barrier. Lane l holds dims [l * E, l * E + E) of every vector
// (E = HD / 32); warp w takes keys lo + w, lo + w + kAttnWarps, ... with its
// own online softmax and leaves its state in st. Ends with __syncthreads.
// kG >= G sizes the per-head registers (kG = 4 for G <= 4 halves them: more
// blocks an SM); each head's arithmetic is the same for any kG.
template <int HD, int kG = kPagedMaxGroup>
__device__ void AttendKeys(const PagedKvCache& c, int slot, int kh, int G, const __nv_bfloat16* qr, int lo, int hi,
                           float scale, WarpStates<HD, kG>& st) {
  constexpr int E = HD / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float qv[kG][E], acc[kG][E], m[kG], l[kG];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      qv[g][e] = g < G ? __bfloat162float(qr[g * HD + lane * E + e]) : 0.f;
      acc[g][e] = 0.f;
    }
  }
  // Key j's k and v (this lane's E dims) and whether its page exists. The
  // loop keeps kKeysAhead of the warp's keys in flight (the page-table read
  // and the k / v reads of a key are a dependent pair of memory round
  // trips; the math per key is a few instructions), in the same key order.
  auto load_key = [&](int j, float(&kv)[E], float(&vv)[E]) {
    const int64_t off = CacheOffset(c, slot, j, kh);
    if (off < 0) return false;  // a missing page: contract broken, key skipped rather than read out of bounds
#pragma unroll
    for (int e = 0; e < E; ++e) {
      kv[e] = __bfloat162float(c.k[off + lane * E + e]);
      vv[e] = __bfloat162float(c.v[off + lane * E + e]);
    }
    return true;
  };
  constexpr int kKeysAhead = 4;
  float kb[kKeysAhead][E], vb[kKeysAhead][E];
  bool have[kKeysAhead];
  const int first = lo + warp;
#pragma unroll
  for (int i = 0; i < kKeysAhead; ++i) {
    const int j = first + i * kAttnWarps;
    have[i] = warp < kAttnWarps && j <= hi && load_key(j, kb[i], vb[i]);
  }
  for (int base = first; warp < kAttnWarps && base <= hi; base += kKeysAhead * kAttnWarps) {
#pragma unroll
    for (int i = 0; i < kKeysAhead; ++i) {
      const int j = base + i * kAttnWarps;
      if (j > hi) break;
      float kv[E], vv[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        kv[e] = kb[i][e];
        vv[e] = vb[i][e];
      }
      const bool valid = have[i];
      const int ahead = j + kKeysAhead * kAttnWarps;
      have[i] = ahead <= hi && load_key(ahead, kb[i], vb[i]);
      if (!valid) continue;
#pragma unroll
      for (int g = 0; g < kG; ++g) {
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
  }
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    if (g >= G || warp >= kAttnWarps) break;
    if (lane == 0) {
      st.m[warp][g] = m[g];
      st.l[warp][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) st.acc[warp][g][lane * E + e] = acc[g][e];
  }
  __syncthreads();
}

__device__ inline bool RowValid(const PagedKvCache& c, int slot, int p) {
  return slot >= 0 && p >= 0 && p < c.page_tokens * c.max_pages_per_seq;
}

// Split workspace: three fp32 arrays indexed by state (row * heads + head) *
// chunks + chunk: m, l (one float per state) and acc (HD floats per state).
struct SplitWorkspace {
  float *m, *l, *acc;
};

__host__ __device__ inline SplitWorkspace SplitLayout(void* ws, int64_t states) {
  float* f = static_cast<float*>(ws);
  return {f, f + states, f + 2 * states};
}

// The fused append's arithmetic (PagedFusedAppend), shared by the split
// pass's two chunk kernels so both write PagedKvAppend's bits. A block's
// threads split the work; each value goes to a sink the caller gives.
//
// The G query heads of kv head kh of row r at position p, roped and rounded
// to bf16 as PagedKvAppend writes q: q_sink(g, j, y) for head g, dim j.
// Heads g in [G, padded) get zeros (for callers that size by kG).
template <int HD, typename QSink>
__device__ void FusedRopeQueryHeads(const PagedFusedAppend& app, int r, int p, int kh, int G, int padded,
                                    QSink q_sink) {
  constexpr int half = HD / 2;
  const float* row = app.qkv + int64_t(r) * app.ld;
  const float* cs = app.rope_cos + int64_t(p) * half;
  const float* sn = app.rope_sin + int64_t(p) * half;
  for (int i = threadIdx.x; i < padded * half; i += blockDim.x) {
    const int g = i / half, j = i % half;
    float y0 = 0.f, y1 = 0.f;
    if (g < G) {
      const float* x = row + int64_t(kh * G + g) * HD;
      RopePair(x[j], x[j + half], cs[j], sn[j], y0, y1);
    }
    q_sink(g, j, __float2bfloat16(y0));
    q_sink(g, j + half, __float2bfloat16(y1));
  }
}

// The row's own k (roped) and v of kv head kh, written to the cache at
// element offset off (>= 0: CacheOffset of (slot, p, kh)) and handed to
// k_sink(d, b) / v_sink(d, b) as well.
template <int HD, typename KSink, typename VSink>
__device__ void FusedAppendOwnKeyValue(const PagedFusedAppend& app, const PagedKvCache& c, int heads, int r, int p,
                                       int kh, int64_t off, KSink k_sink, VSink v_sink) {
  constexpr int half = HD / 2;
  const float* row = app.qkv + int64_t(r) * app.ld;
  const float* cs = app.rope_cos + int64_t(p) * half;
  const float* sn = app.rope_sin + int64_t(p) * half;
  for (int i = threadIdx.x; i < half + HD; i += blockDim.x) {
    if (i < half) {
      const float* x = row + int64_t(heads + kh) * HD;
      float y0, y1;
      RopePair(x[i], x[i + half], cs[i], sn[i], y0, y1);
      const __nv_bfloat16 b0 = __float2bfloat16(y0), b1 = __float2bfloat16(y1);
      c.k[off + i] = b0;
      c.k[off + i + half] = b1;
      k_sink(i, b0);
      k_sink(i + half, b1);
    } else {
      const int d = i - half;
      const __nv_bfloat16 b = __float2bfloat16(row[int64_t(heads + c.kv_heads + kh) * HD + d]);
      c.v[off + d] = b;
      v_sink(d, b);
    }
  }
}

// One split-KV chunk: chunk `chunk` of (row r, kv head kh) attends keys
// [chunk * T, min((chunk + 1) * T - 1, pos)] (T = chunk_tokens) and writes its merged,
// unnormalized state per query head into ws. Chunks past pos (and invalid
// rows) write nothing. With an append (app.qkv non-null): the row's q, k, v
// are still fp32 in app.qkv; the block ropes its G query heads into shared
// memory, and the block whose chunk holds the row's position first appends
// k, v of its kv head (the position only it reads) -- AppendKernel's
// arithmetic (RopePair, bf16 rounding), so the same bits as appending first.
// Called by the whole block (kAttnWarps warps or more); a caller that runs
// it again must __syncthreads() between calls (shared state is reused).
template <int HD, int kG = kPagedMaxGroup>
__device__ void SplitAttendChunk(const PagedKvCache& c, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                                 float scale, int chunk_tokens, int chunks, const SplitWorkspace& ws,
                                 const PagedFusedAppend& app, int r, int kh, int chunk) {
  const int T = chunk_tokens;
  const int G = heads / c.kv_heads;
  const int slot = rows.slot[r], p = rows.pos[r];
  const int lo = chunk * T;
  if (!RowValid(c, slot, p) || lo > p) return;
  const int hi = min(lo + T - 1, p);
  __shared__ WarpStates<HD, kG> st;
  __shared__ __nv_bfloat16 q_s[kG * HD];
  const __nv_bfloat16* qr = q_s;
  if (app.qkv == nullptr) {
    qr = q + int64_t(r) * heads * HD + int64_t(kh) * G * HD;
  } else {
    FusedRopeQueryHeads<HD>(app, r, p, kh, G, G, [&](int g, int d, __nv_bfloat16 b) { q_s[g * HD + d] = b; });
    if (p / T == chunk) {
      const int64_t off = CacheOffset(c, slot, p, kh);
      const auto none = [](int, __nv_bfloat16) {};
      if (off >= 0) FusedAppendOwnKeyValue<HD>(app, c, heads, r, p, kh, off, none, none);
    }
    __syncthreads();  // q_s and this block's k, v stores visible to its warps
  }
  AttendKeys<HD, kG>(c, slot, kh, G, qr, lo, hi, scale, st);
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD;
    float M, num, den;
    MergeSoftmaxStates(kAttnWarps, &st.m[0][g], &st.l[0][g], &st.acc[0][g][d], kG, kG * HD, &M, &num, &den);
    const int64_t state = (int64_t(r) * heads + kh * G + g) * chunks + chunk;
    ws.acc[state * HD + d] = num;
    if (d == 0) {
      ws.m[state] = M;
      ws.l[state] = den;
    }
  }
}

}  // namespace grove::kernels::paged_device
