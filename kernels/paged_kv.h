// A key/value cache in fixed-size pages for the rollout engine, and the
// attention of query rows over it (decode and prefill alike).
//
// Storage, per layer: k and v pages bf16 [num_pages, page_tokens, kv_heads,
// head_dim]. A sequence lives in a slot; page_table int32 [slots,
// max_pages_per_seq] (device) maps its token position p to page
// page_table[slot, p / page_tokens], row p % page_tokens of that page.
// Pages are handed out by the caller (the engine's free list); these kernels
// only read the table.
//
// A batch of "rows": row r is one token of sequence slot[r] at position
// pos[r] (int32 device arrays). A row with slot < 0 is padding (a CUDA
// graph's fixed batch size): skipped by the append, zeros from attention.
//
// PagedKvAppend: from the fused projection output qkv fp32 [rows, ld] (q at
// column 0, k at heads*head_dim, v at (heads+kv_heads)*head_dim), applies
// rotary embedding to q and k exactly as model/layers.h's RopeRow does (fp32
// arithmetic with the caller's fp32 cos/sin tables [max_pos, head_dim/2],
// i.e. layers::RopeTables, covering every position a row may carry), writes
// q as bf16 [rows, heads*head_dim] and k, v as bf16 into the rows' cache
// positions. A position without a page in the table is not written.
//
// PagedAttention: row r, query head h attends keys 0..pos[r] of its slot
// through kv head h / (heads / kv_heads): S = scale * q.k, softmax in fp32
// (online, exp of differences to the running max), out = P V in fp32,
// written bf16 [rows, heads*head_dim]. The rows of one prefill may all be
// appended first and attended in one launch: each row sees only keys <= its
// position. Contract the kernel cannot check without a host sync: every
// position 0..pos[r] of the row's slot was appended (this or an earlier
// launch) and its pages are in the table.
//
// PagedAttentionSplit (flash-decoding): the same result, the keys of each
// (row, kv head) split into chunks of T = PagedAttentionSplitChunkTokens(rows,
// kv_heads, max_pos) positions, chunk c covering [c * T, (c + 1) * T), one block per
// (row, kv head, chunk), so a small batch still fills the GPU (the chunk
// kernels: below). Each chunk leaves a partial softmax state
// (max, sum, unnormalized out) per query head in fp32 in the workspace; a
// combine kernel merges a row's chunks 0..pos / T in chunk order (the same
// bits every run). The chunk count is fixed by max_pos (a bound on every
// row's pos + 1, known when a graph is captured; 0 = the cache's capacity),
// so nothing depends on host-known lengths: chunks past a row's pos exit at
// once. A row with pos >= max_pos only sees keys below max_pos (contract).
// Differs from PagedAttention only in fp32 summation order.
//
// head_dim 32, 64 or 128; heads / kv_heads <= kPagedMaxGroup. Graph-capturable
// (no host sync, no allocation). Host header, no device code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

inline constexpr int kPagedMaxGroup = 8;
// Chunk lengths of the split pass. Its chunks run the tiled kernel (a
// chunk's K and V copied into shared memory, a thread per key for q.k) at
// kPagedSplitChunkTokens keys, or at kPagedSplitChunkTokensFew for a launch
// bounded by kPagedSplitShortContext positions with at most
// kPagedSplitFewPairs (row, kv head) pairs (there 64-key chunks leave too
// few blocks). With at most kPagedWalkFewPairs pairs and short contexts
// they run the warp walk at kPagedWalkChunkTokensFew keys instead: at batch
// 1 a chunk holds a handful of keys, and the walk's shorter chain of
// dependent steps wins (the tiled kernel's copy, q.k, softmax and P V
// phases follow one another). Chosen by kernel_bench --paged and
// decode_bench --variants on an H100 (docs/kernels.md "The tiled chunk
// kernel").
inline constexpr int kPagedSplitChunkTokens = 64;
inline constexpr int kPagedSplitChunkTokensFew = 32;
inline constexpr int kPagedSplitFewPairs = 16;
inline constexpr int kPagedSplitShortContext = 256;
inline constexpr int kPagedWalkChunkTokens = 64;
inline constexpr int kPagedWalkChunkTokensFew = 16;
inline constexpr int kPagedWalkFewPairs = 4;

// The chunk length PagedAttentionSplit uses for a launch of `rows` rows
// bounded by max_pos (0: the cache's capacity); 16 means the warp walk.
inline int PagedAttentionSplitChunkTokens(int rows, int kv_heads, int max_pos = 0) {
  const bool short_context = max_pos > 0 && max_pos <= kPagedSplitShortContext;
  const int64_t pairs = int64_t(rows) * kv_heads;
  if (short_context && pairs <= kPagedWalkFewPairs) return kPagedWalkChunkTokensFew;
  return short_context && pairs <= kPagedSplitFewPairs ? kPagedSplitChunkTokensFew : kPagedSplitChunkTokens;
}

struct PagedKvCache {
  __nv_bfloat16* k = nullptr;  // one layer: [num_pages, page_tokens, kv_heads, head_dim]
  __nv_bfloat16* v = nullptr;
  const int32_t* page_table = nullptr;  // [slots, max_pages_per_seq]
  int num_pages = 0;
  int page_tokens = 0;
  int max_pages_per_seq = 0;
  int kv_heads = 0;
  int head_dim = 0;
};

struct PagedRows {
  const int32_t* slot = nullptr;  // [rows]; < 0: padding row
  const int32_t* pos = nullptr;   // [rows]; 0 <= pos < page_tokens * max_pages_per_seq
  int rows = 0;
};

Status PagedKvAppend(const PagedKvCache& cache, const PagedRows& rows, int heads, const float* qkv, int64_t ld,
                     const float* rope_cos, const float* rope_sin, __nv_bfloat16* q_out, cudaStream_t stream);

// scale 0 means 1 / sqrt(head_dim).
Status PagedAttention(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                      __nv_bfloat16* out, float scale, cudaStream_t stream);

// Chunks per (row, kv head) of PagedAttentionSplit for max_pos (0: the
// cache's capacity, page_tokens * max_pages_per_seq).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int PagedAttentionSplitChunks(const PagedKvCache& cache, int max_pos,
                                     int chunk_tokens = kPagedSplitChunkTokens) {
  const int64_t cap = int64_t(cache.page_tokens) * cache.max_pages_per_seq;
  const int64_t bound = max_pos > 0 && max_pos < cap ? max_pos : cap;
  const int64_t n = (bound + chunk_tokens - 1) / chunk_tokens;
  return int(n < 1 ? 1 : n);
}

// Workspace bytes PagedAttentionSplit needs for any launch of at most rows
// rows (fp32 partials: rows * heads * chunks * (head_dim + 2), chunks at
// each row count's chunk length), also enough for PagedAttentionSplitWalk.
size_t PagedAttentionSplitWorkspaceBytes(const PagedKvCache& cache, int rows, int heads, int max_pos);

// PagedKvAppend folded into the split pass (PagedAttentionSplit's
// `append`): the rows' fp32 q | k | v (qkv, row stride ld, PagedKvAppend's
// input) are roped by the pass itself -- each block its query heads into
// shared memory, the block whose chunk holds the row's position the k, v of
// its kv head into the cache before it attends -- so no append launch and
// no bf16 q buffer (q may be null). The same arithmetic (paged_kv.cu's
// RopePair), so the same bits as PagedKvAppend then the split pass. Decode
// rows only (one row per slot per launch: a row must not attend another
// row's new key). Launched with programmatic dependent launch, the pass
// reads the page table, the rows' slots and positions and every cached key
// but the rows' own before its griddepcontrol.wait (so those reads overlap
// the kernel ahead): with an append, no kernel that may still be running
// in the stream may write any of them -- true of a decode step, whose
// inputs are host copies made before its first kernel and whose only cache
// writes are each layer's pass at the rows' own positions.
struct PagedFusedAppend {
  const float* qkv = nullptr;
  int64_t ld = 0;
  const float* rope_cos = nullptr;
  const float* rope_sin = nullptr;
};

// scale 0 means 1 / sqrt(head_dim). workspace: device memory of at least
// PagedAttentionSplitWorkspaceBytes(cache, rows.rows, heads, max_pos) bytes,
// 4-byte aligned, not used by anything else until the launch completes.
Status PagedAttentionSplit(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                           __nv_bfloat16* out, float scale, int max_pos, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream, const PagedFusedAppend* append = nullptr);

// PagedAttentionSplit through the chunk kernel it had before the tiled one
// (each of 4 warps walks its keys, a key's dims across the lanes; 16-key
// chunks for few pairs or short contexts, else 64): the opt-out of
// GpuGeneratorOptions::split_kv_tiled, and the arithmetic the persistent
// batch-1 decode step (decode_step.h) shares. The same contract.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int PagedAttentionSplitWalkChunkTokens(int rows, int kv_heads, int max_pos = 0) {
  if (int64_t(rows) * kv_heads <= kPagedWalkFewPairs) return kPagedWalkChunkTokensFew;
  return max_pos > 0 && max_pos <= kPagedSplitShortContext ? kPagedWalkChunkTokensFew : kPagedWalkChunkTokens;
}
Status PagedAttentionSplitWalk(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                               __nv_bfloat16* out, float scale, int max_pos, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream, const PagedFusedAppend* append = nullptr);

}  // namespace grove::kernels
