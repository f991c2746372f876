#include "kernels/paged_kv.h"

#include "kernels/launch.cuh"
#include "kernels/paged_kv_device.cuh"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/softmax_merge.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace grove::kernels {
namespace {

// Query heads per kv head up to which the attention kernels size their
// per-head registers for 4 instead of kPagedMaxGroup (gpu-ref: 8 / 2 = 4).
constexpr int kSmallGroup = 4;
bool SmallGroup(const PagedKvCache& c, int heads) { return heads / c.kv_heads <= kSmallGroup; }

using namespace paged_device;

constexpr int kAppendThreads = 256;

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

// One block of kAttnWarps warps per (row, kv head): all keys 0..pos, the
// warps' states merged and normalized.
template <int HD, int kG>
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
  __shared__ WarpStates<HD, kG> st;
  AttendKeys<HD, kG>(c, slot, kh, G, q + int64_t(r) * heads * HD + int64_t(kh) * G * HD, 0, p, scale, st);
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD;
    float M, num, den;
    MergeSoftmaxStates(kAttnWarps, &st.m[0][g], &st.l[0][g], &st.acc[0][g][d], kG, kG * HD, &M, &num, &den);
    o[i] = __float2bfloat16(den > 0.f ? num / den : 0.f);
  }
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
template <int HD, int kG>
__global__ void __launch_bounds__(kAttnWarps * 32)
    SplitAttentionKernel(PagedKvCache c, PagedRows rows, int heads, const __nv_bfloat16* q, float scale,
                         int chunk_tokens, int chunks, SplitWorkspace ws, PagedFusedAppend app) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  SplitAttendChunk<HD, kG>(c, rows, heads, q, scale, chunk_tokens, chunks, ws, app, blockIdx.x / c.kv_heads,
                       blockIdx.x % c.kv_heads, blockIdx.y);
}

// One block of HD threads per (row, query head): merges the row's chunks
// 0..min(pos / T, chunks - 1) in chunk order and normalizes.
template <int HD>
__global__ void __launch_bounds__(HD)
    SplitCombineKernel(PagedKvCache c, PagedRows rows, int heads, __nv_bfloat16* out, int chunk_tokens, int chunks,
                       SplitWorkspace ws) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int slot = rows.slot[r], p = rows.pos[r];
  __nv_bfloat16* o = out + (int64_t(r) * heads + h) * HD;
  if (!RowValid(c, slot, p)) {
    o[d] = __float2bfloat16(0.f);
    return;
  }
  const int n = min(p / chunk_tokens + 1, chunks);
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
                   __nv_bfloat16* out, float scale, int chunk_tokens, int chunks, const SplitWorkspace& ws, dim3 grid,
                   dim3 combine_grid, const PagedFusedAppend& app, cudaStream_t stream) {
  auto kernel = SmallGroup(cache, heads) ? SplitAttentionKernel<HD, kSmallGroup>
                                         : SplitAttentionKernel<HD, kPagedMaxGroup>;
  GROVE_RETURN_IF_ERROR(LaunchStatus("PagedAttentionSplit",
                                     LaunchKernel(kernel, grid, dim3(kAttnWarps * 32), 0, stream, cache, rows, heads, q,
                                                  scale, chunk_tokens, chunks, ws, app)));
  return LaunchStatus("PagedAttentionSplit combine",
                      LaunchKernel(SplitCombineKernel<HD>, combine_grid, dim3(HD), 0, stream, cache, rows, heads, out,
                                   chunk_tokens, chunks, ws));
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
  const bool small = SmallGroup(cache, heads);
  auto kernel = cache.head_dim == 32   ? (small ? AttentionKernel<32, kSmallGroup> : AttentionKernel<32, kPagedMaxGroup>)
                : cache.head_dim == 64 ? (small ? AttentionKernel<64, kSmallGroup> : AttentionKernel<64, kPagedMaxGroup>)
                                       : (small ? AttentionKernel<128, kSmallGroup> : AttentionKernel<128, kPagedMaxGroup>);
  return LaunchStatus("PagedAttention",
                      LaunchKernel(kernel, grid, dim3(kAttnWarps * 32), 0, stream, cache, rows, heads, q, out, scale));
}

size_t PagedAttentionSplitWorkspaceBytes(const PagedKvCache& cache, int rows, int heads, int max_pos) {
  if (rows <= 0 || heads <= 0) return 0;
  // The most states of a launch of r <= rows rows: r = rows, or the most
  // rows that still take the short chunks.
  auto states = [&](int r) {
    return size_t(r) * size_t(heads) *
           size_t(PagedAttentionSplitChunks(cache, max_pos, PagedAttentionSplitChunkTokens(r, cache.kv_heads, max_pos)));
  };
  const int few_rows = std::max(1, kPagedSplitFewPairs / std::max(1, cache.kv_heads));
  return std::max(states(rows), states(std::min(rows, few_rows))) * size_t(cache.head_dim + 2) * sizeof(float);
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
  const int chunk_tokens = PagedAttentionSplitChunkTokens(rows.rows, cache.kv_heads, max_pos);
  const int chunks = PagedAttentionSplitChunks(cache, max_pos, chunk_tokens);
  if (chunks > 65535) return Status::InvalidArgument("PagedAttentionSplit: more than 65535 chunks");
  if (int64_t(rows.rows) * cache.kv_heads > 0x7fffffff)
    return Status::InvalidArgument("PagedAttentionSplit: rows * kv_heads too large");
  if (scale == 0.f) scale = float(1.0 / std::sqrt(double(cache.head_dim)));
  const SplitWorkspace ws = SplitLayout(workspace, int64_t(rows.rows) * heads * chunks);
  const dim3 grid(rows.rows * cache.kv_heads, chunks), combine_grid(rows.rows, heads);
  switch (cache.head_dim) {
    case 32:
      return LaunchSplit<32>(cache, rows, heads, q, out, scale, chunk_tokens, chunks, ws, grid, combine_grid, app,
                             stream);
    case 64:
      return LaunchSplit<64>(cache, rows, heads, q, out, scale, chunk_tokens, chunks, ws, grid, combine_grid, app,
                             stream);
    default:
      return LaunchSplit<128>(cache, rows, heads, q, out, scale, chunk_tokens, chunks, ws, grid, combine_grid, app,
                              stream);
  }
}

}  // namespace grove::kernels
