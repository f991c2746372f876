#include "kernels/paged_kv.h"

#include "kernels/launch.cuh"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/softmax_merge.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// Rotary embedding of one pair (a = x[j], b = x[j + half]) with each product
// rounded before the difference/sum, as model/layers.h's RopeRow computes it
// on the host (no fma contraction). AppendKernel and the split pass's fused
// append both use it, so they write the same bits.
__device__ __forceinline__ void RopePair(float a, float b, float cs, float sn, float& y0, float& y1) {
  y0 = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn));
  y1 = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs));
}

// One block per row. Work items: rope pairs of the q heads and the k heads
// ((heads + kv_heads) * half), then the v elements (kv_heads * head_dim).
__global__ void AppendKernel(PagedKvCache c, PagedRows rows, int heads, const float* qkv, int64_t ld,
                             const float* rope_cos, const float* rope_sin, __nv_bfloat16* q_out) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
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
      float y0, y1;
      RopePair(x[j], x[j + half], cs, sn, y0, y1);
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

// The online-softmax states of a block's warps after AttendKeys.
template <int HD>
struct WarpStates {
  float m[kAttnWarps][kPagedMaxGroup], l[kAttnWarps][kPagedMaxGroup];
  float acc[kAttnWarps][kPagedMaxGroup][HD];
};

// The block's kAttnWarps warps attend keys lo..hi (inclusive) of slot
// through kv head kh for the G query heads at qr (each key is read once for
// all of them). Lane l holds dims [l * E, l * E + E) of every vector
// (E = HD / 32); warp w takes keys lo + w, lo + w + kAttnWarps, ... with its
// own online softmax and leaves its state in st. Ends with __syncthreads.
template <int HD>
__device__ void AttendKeys(const PagedKvCache& c, int slot, int kh, int G, const __nv_bfloat16* qr, int lo, int hi,
                           float scale, WarpStates<HD>& st) {
  constexpr int E = HD / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float qv[kPagedMaxGroup][E], acc[kPagedMaxGroup][E], m[kPagedMaxGroup], l[kPagedMaxGroup];
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
  for (int j = lo + warp; j <= hi; j += kAttnWarps) {
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
#pragma unroll
  for (int g = 0; g < kPagedMaxGroup; ++g) {
    if (g >= G) break;
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

// One block of kAttnWarps warps per (row, kv head): all keys 0..pos, the
// warps' states merged and normalized.
template <int HD>
__global__ void __launch_bounds__(kAttnWarps * 32)
    AttentionKernel(PagedKvCache c, PagedRows rows, int heads, const __nv_bfloat16* q, __nv_bfloat16* out,
                    float scale) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  const int r = blockIdx.x, kh = blockIdx.y;
  const int G = heads / c.kv_heads;
  const int slot = rows.slot[r], p = rows.pos[r];
  __nv_bfloat16* o = out + int64_t(r) * heads * HD + int64_t(kh) * G * HD;
  if (!RowValid(c, slot, p)) {
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) o[i] = __float2bfloat16(0.f);
    return;
  }
  __shared__ WarpStates<HD> st;
  AttendKeys<HD>(c, slot, kh, G, q + int64_t(r) * heads * HD + int64_t(kh) * G * HD, 0, p, scale, st);
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD;
    float M, num, den;
    MergeSoftmaxStates(kAttnWarps, &st.m[0][g], &st.l[0][g], &st.acc[0][g][d], kPagedMaxGroup, kPagedMaxGroup * HD, &M,
                &num, &den);
    o[i] = __float2bfloat16(den > 0.f ? num / den : 0.f);
  }
}

// Split workspace: three fp32 arrays indexed by state (row * heads + head) *
// chunks + chunk: m, l (one float per state) and acc (HD floats per state).
struct SplitWorkspace {
  float *m, *l, *acc;
};

inline SplitWorkspace SplitLayout(void* ws, int64_t states) {
  float* f = static_cast<float*>(ws);
  return {f, f + states, f + 2 * states};
}

// Grid (rows * kv_heads, chunks): chunk c of (row, kv head) attends keys
// [c * T, min((c + 1) * T - 1, pos)] and writes its merged, unnormalized
// state per query head. Chunks past pos (and invalid rows) write nothing:
// the combine reads only chunks 0..pos / T of a valid row.
// With an append (app.qkv non-null): the rows' q, k, v are still fp32 in
// app.qkv; each block ropes its G query heads into shared memory, and the
// block whose chunk holds the row's position first appends k, v of its kv
// head (the position only it reads) -- AppendKernel's arithmetic (RopePair,
// bf16 rounding), so the same bits as appending first.
template <int HD>
__global__ void __launch_bounds__(kAttnWarps * 32)
    SplitAttentionKernel(PagedKvCache c, PagedRows rows, int heads, const __nv_bfloat16* q, float scale,
                         int chunks, SplitWorkspace ws, PagedFusedAppend app) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  constexpr int T = kPagedSplitChunkTokens;
  const int r = blockIdx.x / c.kv_heads, kh = blockIdx.x % c.kv_heads, chunk = blockIdx.y;
  const int G = heads / c.kv_heads;
  const int slot = rows.slot[r], p = rows.pos[r];
  const int lo = chunk * T;
  if (!RowValid(c, slot, p) || lo > p) return;
  const int hi = min(lo + T - 1, p);
  __shared__ WarpStates<HD> st;
  __shared__ __nv_bfloat16 q_s[kPagedMaxGroup * HD];
  const __nv_bfloat16* qr = q_s;
  if (app.qkv == nullptr) {
    qr = q + int64_t(r) * heads * HD + int64_t(kh) * G * HD;
  } else {
    constexpr int half = HD / 2;
    const float* row = app.qkv + int64_t(r) * app.ld;
    const float* cs = app.rope_cos + int64_t(p) * half;
    const float* sn = app.rope_sin + int64_t(p) * half;
    for (int i = threadIdx.x; i < G * half; i += blockDim.x) {
      const int g = i / half, j = i % half;
      const float* x = row + int64_t(kh * G + g) * HD;
      float y0, y1;
      RopePair(x[j], x[j + half], cs[j], sn[j], y0, y1);
      q_s[g * HD + j] = __float2bfloat16(y0);
      q_s[g * HD + j + half] = __float2bfloat16(y1);
    }
    if (p / T == chunk) {
      const int64_t off = CacheOffset(c, slot, p, kh);
      for (int i = threadIdx.x; off >= 0 && i < half + HD; i += blockDim.x) {
        if (i < half) {
          const float* x = row + int64_t(heads + kh) * HD;
          float y0, y1;
          RopePair(x[i], x[i + half], cs[i], sn[i], y0, y1);
          c.k[off + i] = __float2bfloat16(y0);
          c.k[off + i + half] = __float2bfloat16(y1);
        } else {
          const int d = i - half;
          c.v[off + d] = __float2bfloat16(row[int64_t(heads + c.kv_heads + kh) * HD + d]);
        }
      }
    }
    __syncthreads();  // q_s and this block's k, v stores visible to its warps
  }
  AttendKeys<HD>(c, slot, kh, G, qr, lo, hi, scale, st);
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD;
    float M, num, den;
    MergeSoftmaxStates(kAttnWarps, &st.m[0][g], &st.l[0][g], &st.acc[0][g][d], kPagedMaxGroup, kPagedMaxGroup * HD, &M,
                &num, &den);
    const int64_t state = (int64_t(r) * heads + kh * G + g) * chunks + chunk;
    ws.acc[state * HD + d] = num;
    if (d == 0) {
      ws.m[state] = M;
      ws.l[state] = den;
    }
  }
}

// One block of HD threads per (row, query head): merges the row's chunks
// 0..min(pos / T, chunks - 1) in chunk order and normalizes.
template <int HD>
__global__ void __launch_bounds__(HD)
    SplitCombineKernel(PagedKvCache c, PagedRows rows, int heads, __nv_bfloat16* out, int chunks, SplitWorkspace ws) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int slot = rows.slot[r], p = rows.pos[r];
  __nv_bfloat16* o = out + (int64_t(r) * heads + h) * HD;
  if (!RowValid(c, slot, p)) {
    o[d] = __float2bfloat16(0.f);
    return;
  }
  const int n = min(p / kPagedSplitChunkTokens + 1, chunks);
  const int64_t first = (int64_t(r) * heads + h) * chunks;
  float M, num, den;
  MergeSoftmaxStates(n, ws.m + first, ws.l + first, ws.acc + first * HD + d, 1, HD, &M, &num, &den);
  o[d] = __float2bfloat16(den > 0.f ? num / den : 0.f);
}

Status CheckCache(const PagedKvCache& c, int heads, const char* who) {
  const std::string w = who;
  if (c.head_dim != 32 && c.head_dim != 64 && c.head_dim != 128)
    return Status::InvalidArgument(w + ": head_dim must be 32, 64 or 128");
  if (c.kv_heads < 1 || heads < 1 || heads % c.kv_heads != 0 || heads / c.kv_heads > kPagedMaxGroup)
    return Status::InvalidArgument(w + ": heads must be a multiple of kv_heads, at most " +
                                   std::to_string(kPagedMaxGroup) + " per kv head");
  if (c.page_tokens < 1 || c.max_pages_per_seq < 1 || c.num_pages < 1)
    return Status::InvalidArgument(w + ": page_tokens, max_pages_per_seq and num_pages must be >= 1");
  if (!c.k || !c.v || !c.page_table) return Status::InvalidArgument(w + ": null cache pointer");
  return Status::OK();
}

// The fp32 q | k | v input of an append (PagedKvAppend, or the split pass's
// fused append).
Status CheckAppendInput(const PagedKvCache& c, int heads, const float* qkv, int64_t ld, const float* rope_cos,
                        const float* rope_sin, const char* who) {
  const std::string w = who;
  if (ld < int64_t(heads + 2 * c.kv_heads) * c.head_dim)
    return Status::InvalidArgument(w + ": ld smaller than the q, k, v columns");
  if (!qkv || !rope_cos || !rope_sin) return Status::InvalidArgument(w + ": null pointer");
  return Status::OK();
}

Status LaunchStatus(const char* who, cudaError_t launch = cudaSuccess) {
  const cudaError_t err = launch != cudaSuccess ? launch : cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string(who) + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

// The split-KV pass and its combine (HD threads per (row, head)).
template <int HD>
Status LaunchSplit(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                   __nv_bfloat16* out, float scale, int chunks, const SplitWorkspace& ws, dim3 grid, dim3 combine_grid,
                   const PagedFusedAppend& app, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(LaunchStatus("PagedAttentionSplit",
                                     LaunchKernel(SplitAttentionKernel<HD>, grid, dim3(kAttnWarps * 32), 0, stream,
                                                  cache, rows, heads, q, scale, chunks, ws, app)));
  return LaunchStatus("PagedAttentionSplit combine", LaunchKernel(SplitCombineKernel<HD>, combine_grid, dim3(HD), 0,
                                                                  stream, cache, rows, heads, out, chunks, ws));
}

}  // namespace

Status PagedKvAppend(const PagedKvCache& cache, const PagedRows& rows, int heads, const float* qkv, int64_t ld,
                     const float* rope_cos, const float* rope_sin, __nv_bfloat16* q_out, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedKvAppend"));
  if (rows.rows < 0) return Status::InvalidArgument("PagedKvAppend: rows < 0");
  if (rows.rows == 0) return Status::OK();
  GROVE_RETURN_IF_ERROR(CheckAppendInput(cache, heads, qkv, ld, rope_cos, rope_sin, "PagedKvAppend"));
  if (!q_out || !rows.slot || !rows.pos) return Status::InvalidArgument("PagedKvAppend: null pointer");
  return LaunchStatus("PagedKvAppend", LaunchKernel(AppendKernel, dim3(rows.rows), dim3(kAppendThreads), 0, stream,
                                                    cache, rows, heads, qkv, ld, rope_cos, rope_sin, q_out));
}

Status PagedAttention(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                      __nv_bfloat16* out, float scale, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedAttention"));
  if (rows.rows < 0) return Status::InvalidArgument("PagedAttention: rows < 0");
  if (rows.rows == 0) return Status::OK();
  if (!q || !out || !rows.slot || !rows.pos) return Status::InvalidArgument("PagedAttention: null pointer");
  if (scale == 0.f) scale = float(1.0 / std::sqrt(double(cache.head_dim)));
  const dim3 grid(rows.rows, cache.kv_heads);
  auto kernel = cache.head_dim == 32 ? AttentionKernel<32> : cache.head_dim == 64 ? AttentionKernel<64> : AttentionKernel<128>;
  return LaunchStatus("PagedAttention",
                      LaunchKernel(kernel, grid, dim3(kAttnWarps * 32), 0, stream, cache, rows, heads, q, out, scale));
}

int PagedAttentionSplitChunks(const PagedKvCache& cache, int max_pos) {
  const int64_t cap = int64_t(cache.page_tokens) * cache.max_pages_per_seq;
  const int64_t bound = max_pos > 0 ? std::min<int64_t>(max_pos, cap) : cap;
  return int(std::max<int64_t>(1, (bound + kPagedSplitChunkTokens - 1) / kPagedSplitChunkTokens));
}

size_t PagedAttentionSplitWorkspaceBytes(const PagedKvCache& cache, int rows, int heads, int max_pos) {
  if (rows <= 0 || heads <= 0) return 0;
  return size_t(rows) * size_t(heads) * size_t(PagedAttentionSplitChunks(cache, max_pos)) *
         size_t(cache.head_dim + 2) * sizeof(float);
}

Status PagedAttentionSplit(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                           __nv_bfloat16* out, float scale, int max_pos, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream, const PagedFusedAppend* append) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedAttentionSplit"));
  if (rows.rows < 0) return Status::InvalidArgument("PagedAttentionSplit: rows < 0");
  if (max_pos < 0) return Status::InvalidArgument("PagedAttentionSplit: max_pos < 0");
  if (rows.rows == 0) return Status::OK();
  PagedFusedAppend app;
  if (append != nullptr) {
    GROVE_RETURN_IF_ERROR(CheckAppendInput(cache, heads, append->qkv, append->ld, append->rope_cos,
                                           append->rope_sin, "PagedAttentionSplit (fused append)"));
    app = *append;
  } else if (!q) {
    return Status::InvalidArgument("PagedAttentionSplit: null q");
  }
  if (!out || !rows.slot || !rows.pos || !workspace)
    return Status::InvalidArgument("PagedAttentionSplit: null pointer");
  if (reinterpret_cast<uintptr_t>(workspace) % alignof(float) != 0)
    return Status::InvalidArgument("PagedAttentionSplit: workspace not 4-byte aligned");
  const size_t need = PagedAttentionSplitWorkspaceBytes(cache, rows.rows, heads, max_pos);
  if (workspace_bytes < need)
    return Status::InvalidArgument("PagedAttentionSplit: workspace of " + std::to_string(workspace_bytes) +
                                   " bytes, needs " + std::to_string(need));
  const int chunks = PagedAttentionSplitChunks(cache, max_pos);
  if (chunks > 65535) return Status::InvalidArgument("PagedAttentionSplit: more than 65535 chunks");
  if (int64_t(rows.rows) * cache.kv_heads > 0x7fffffff)
    return Status::InvalidArgument("PagedAttentionSplit: rows * kv_heads too large");
  if (scale == 0.f) scale = float(1.0 / std::sqrt(double(cache.head_dim)));
  const SplitWorkspace ws = SplitLayout(workspace, int64_t(rows.rows) * heads * chunks);
  const dim3 grid(rows.rows * cache.kv_heads, chunks), combine_grid(rows.rows, heads);
  switch (cache.head_dim) {
    case 32: return LaunchSplit<32>(cache, rows, heads, q, out, scale, chunks, ws, grid, combine_grid, app, stream);
    case 64: return LaunchSplit<64>(cache, rows, heads, q, out, scale, chunks, ws, grid, combine_grid, app, stream);
    default: return LaunchSplit<128>(cache, rows, heads, q, out, scale, chunks, ws, grid, combine_grid, app, stream);
  }
}

}  // namespace grove::kernels
