// Token embedding lookup and its gradient, as model/transformer.cc does it:
//   out[t, :] = table[ids[t], :]            (forward)
//   dtable[ids[t], :] += dout[t, :]         (backward, accumulated)
// Activations and the table copy bf16, the gradient fp32 (master copy).
// Device pointers, 16-byte aligned; hidden a multiple of 8. Work is enqueued
// on `stream`, no host sync.
//
// Out-of-range ids cannot be reported without a sync, so: a row whose id is
// outside [0, vocab) reads as zeros in the forward and contributes nothing in
// the backward.
//
// The backward is deterministic: token indices are stably sorted by id (a
// radix sort), and each distinct id's row of dtable is written by one thread
// block that adds that id's rows of dout in token order in fp32 and then adds
// the sum to dtable once. Repeated runs give identical bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

Status EmbeddingForward(const int32_t* ids, const __nv_bfloat16* table, __nv_bfloat16* out, int tokens,
                        int vocab, int hidden, cudaStream_t stream);

// Bytes of scratch EmbeddingBackward needs for these sizes.
size_t EmbeddingBackwardWorkspaceBytes(int tokens, int vocab);

// dtable [vocab, hidden] fp32 is accumulated (+=), not overwritten.
Status EmbeddingBackward(const int32_t* ids, const __nv_bfloat16* dout, float* dtable, void* workspace,
                         size_t workspace_bytes, int tokens, int vocab, int hidden, cudaStream_t stream);

}  // namespace grove::kernels
