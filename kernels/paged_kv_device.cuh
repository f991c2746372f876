// Device pieces of the paged KV cache shared by paged_kv.cu's kernels and
// the linears that fold a neighbour of attention into themselves
// (quant_linear.cu: the RoPE + append after the QKV GEMV, the split-KV
// combine while staging the wo GEMV's input). One definition each, so a
// fused path computes the same fp32 operations in the same order as the
// standalone kernel: the same bits.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/paged_kv.h"
#include "kernels/softmax_merge.h"

namespace grove::kernels::paged {

// Element offset of (page row of position p, kv head kh, dim 0) in one
// layer's k or v pages; -1 when the position has no valid page.
__device__ __forceinline__ int64_t CacheOffset(const PagedKvCache& c, int slot, int p, int kh) {
  const int page_index = p / c.page_tokens;
  if (p < 0 || page_index >= c.max_pages_per_seq) return -1;
  const int page = c.page_table[int64_t(slot) * c.max_pages_per_seq + page_index];
  if (page < 0 || page >= c.num_pages) return -1;
  return ((int64_t(page) * c.page_tokens + p % c.page_tokens) * c.kv_heads + kh) * c.head_dim;
}

__device__ __forceinline__ bool RowValid(int capacity, int slot, int p) { return slot >= 0 && p >= 0 && p < capacity; }

// Rotary embedding of one pair (a = x[j], b = x[j + half]) with each product
// rounded before the difference/sum, as model/layers.h's RopeRow computes it
// on the host (no fma contraction, whichever kernel inlines it).
__device__ __forceinline__ void RopePair(float a, float b, float cs, float sn, float& y0, float& y1) {
  y0 = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn));
  y1 = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs));
}

// The append of one row (PagedKvAppend's per-row work): the block's threads
// (tid = first, first + stride, ...) take the rope pairs of the q heads and
// the k heads ((heads + kv_heads) * half), then the v elements (kv_heads *
// head_dim). row: the row's fp32 q | k | v columns, read through L2
// (ld.cg), so a caller may read values other SMs of its own grid wrote
// after a fence. q_row: the row's bf16 q out. slot < 0: padding (q from
// cos = sin = 0, nothing appended).
__device__ __forceinline__ void AppendRow(const PagedKvCache& c, int heads, int slot, int p, const float* row,
                                          const float* rope_cos, const float* rope_sin, __nv_bfloat16* q_row,
                                          int first, int stride) {
  const int hd = c.head_dim, half = hd / 2;
  const int pairs = (heads + c.kv_heads) * half;
  const int vcount = c.kv_heads * hd;
  for (int i = first; i < pairs + vcount; i += stride) {
    if (i < pairs) {
      const int head = i / half, j = i % half;  // head < heads: q, else k head (head - heads)
      const float* x = row + int64_t(head) * hd;  // q heads then k heads are contiguous in qkv
      float cs = 0.f, sn = 0.f;
      if (slot >= 0) {
        cs = rope_cos[int64_t(p) * half + j];
        sn = rope_sin[int64_t(p) * half + j];
      }
      float y0, y1;
      RopePair(__ldcg(x + j), __ldcg(x + j + half), cs, sn, y0, y1);
      if (head < heads) {
        q_row[head * hd + j] = __float2bfloat16(y0);
        q_row[head * hd + j + half] = __float2bfloat16(y1);
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
      if (off >= 0) c.v[off + d] = __float2bfloat16(__ldcg(row + int64_t(heads + c.kv_heads) * hd + e));
    }
  }
}

// Split workspace: three fp32 arrays indexed by state (row * heads + head) *
// chunks + chunk: m, l (one float per state) and acc (head_dim floats per
// state).
struct SplitWorkspace {
  float *m, *l, *acc;
};

__host__ __device__ inline SplitWorkspace SplitLayout(void* ws, int64_t states) {
  float* f = static_cast<float*>(ws);
  return {f, f + states, f + 2 * states};
}

// The combined attention output of (row r, query head h, dim d) from the
// chunks' partial states: chunks 0..min(pos / T, chunks - 1) merged in chunk
// order and normalized, bf16; 0 for an invalid row. What SplitCombineKernel
// writes, and what the wo GEMV stages in its place.
__device__ __forceinline__ __nv_bfloat16 SplitCombined(const SplitWorkspace& ws, int heads, int head_dim, int chunks,
                                                       int capacity, int r, int slot, int p, int h, int d) {
  if (!RowValid(capacity, slot, p)) return __float2bfloat16(0.f);
  const int n = min(p / kPagedSplitChunkTokens + 1, chunks);
  const int64_t first = (int64_t(r) * heads + h) * chunks;
  float M, num, den;
  MergeSoftmaxStates(n, ws.m + first, ws.l + first, ws.acc + first * head_dim + d, 1, head_dim, &M, &num, &den);
  return __float2bfloat16(den > 0.f ? num / den : 0.f);
}

}  // namespace grove::kernels::paged
