// PagedAttentionSplit with its chunk length and chunk kernel named by the
// caller instead of chosen by PagedAttentionSplitChunkTokens: for the bench
// that chose that policy (kernel_bench --paged) and for the tests that hold
// every (kernel, length) pair to the reference whatever the policy picks.
// Host header, no device code.
#pragma once

#include "kernels/paged_kv.h"

namespace grove::kernels {

enum class PagedChunkKernel {
  kWarpWalk,  // each of 4 warps walks its keys, a key's dims across the lanes (any length)
  kTiled,     // the chunk's K and V copied into shared memory, a thread per key for q.k (32, 64 or 128 keys)
};

// The chunk kernel PagedAttentionSplit runs at a chunk length its policy
// (PagedAttentionSplitChunkTokens) picks: the tiled one wherever it can.
inline PagedChunkKernel PagedAttentionSplitKernelFor(int chunk_tokens) {
  return chunk_tokens == 32 || chunk_tokens == 64 || chunk_tokens == 128 ? PagedChunkKernel::kTiled
                                                                          : PagedChunkKernel::kWarpWalk;
}

// Workspace bytes of one launch of `rows` rows at this chunk length.
size_t PagedAttentionSplitWorkspaceBytesAt(const PagedKvCache& cache, int rows, int heads, int max_pos,
                                           int chunk_tokens);

// PagedAttentionSplit's contract, at chunk_tokens keys a chunk through `kernel`.
Status PagedAttentionSplitAt(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                             __nv_bfloat16* out, float scale, int max_pos, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream, const PagedFusedAppend* append, int chunk_tokens,
                             PagedChunkKernel kernel);

}  // namespace grove::kernels
