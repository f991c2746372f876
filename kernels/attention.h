// Causal grouped-query flash attention, forward and backward, over a batch
// of packed sequences of different lengths (cu_seqlens offsets).
//
//   S = scale * Q K^T (per sequence, per head; key j visible to query i iff
//   j <= i), P = softmax(S) row-wise, O = P V, lse[i] = log sum_j exp(S[i,j]).
//
// Query head h reads key/value head h / (num_heads / num_kv_heads). bf16
// Q/K/V/O and gradients, fp32 accumulation and softmax statistics. Tiled
// (forward: 128 queries x 64 keys per step, online softmax; backward: 64
// keys x 64 queries), mma.sync m16n8k16 through kernels/ptx; the backward
// recomputes P from lse (no S or P is ever stored in global memory). On an
// sm_90 GPU at head_dim 128 both directions run wgmma + TMA kernels instead
// (forward 128 queries x 128-key steps, attention_wgmma.cu; backward 128
// keys x 64-query steps, attention_wgmma_bwd.cu; attention_internal.h for
// the choice and the GROVE_ATTENTION_FWD / GROVE_ATTENTION_BWD=mma|wgmma
// overrides).
//
// Layouts (all device pointers, 16-byte aligned, one row per token):
//   q, out, dout, dq: [total_tokens, num_heads,    head_dim]
//   k, v, dk, dv:     [total_tokens, num_kv_heads, head_dim]
// out and dout rows are packed (num_heads * head_dim elements apart); q and
// dq rows are q_row_stride elements apart, k, v, dk, dv kv_row_stride (0:
// packed), so q, k, v can be column slices of one fused [tokens, qd + 2 kd]
// projection output and dq, dk, dv slices of its gradient. Elements of a
// row past its heads are neither read nor written.
//   lse:              [num_heads, total_tokens] fp32 (natural log)
//   cu_seqlens:       [batch + 1] int32 on the device: sequence b is tokens
//                     cu_seqlens[b] .. cu_seqlens[b+1]-1; cu_seqlens[0] = 0,
//                     nondecreasing, cu_seqlens[batch] = total_tokens.
// Contract the kernels cannot check without a host sync: cu_seqlens as above
// and max_seqlen >= every sequence's length (longer sequences would be cut).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

struct AttentionShape {
  const int32_t* cu_seqlens = nullptr;  // device, [batch + 1]
  int batch = 0;
  int max_seqlen = 0;    // host-side bound on every length (sizes the grid)
  int total_tokens = 0;  // cu_seqlens[batch]
  int num_heads = 0;     // query heads
  int num_kv_heads = 0;  // divides num_heads
  int head_dim = 0;      // 32, 64 or 128
  float softmax_scale = 0.f;  // 0 means 1 / sqrt(head_dim)
  // Elements between consecutive tokens' rows (see Layouts): 0 or a multiple
  // of 8 (16-byte rows) at least num_heads * head_dim (q, dq) or
  // num_kv_heads * head_dim (k, v, dk, dv).
  int64_t q_row_stride = 0;
  int64_t kv_row_stride = 0;
  // Backward only, optional: the rotary embedding's backward folded into
  // the gradients' stores. When rope_table is set, dq's and dk's heads
  // come out rotated by -angle exactly as kernels::RopeBackward
  // (kernels/rope.h) would leave them after the call (the same bits:
  // RopeBackward's fp32 rotation of the same bf16 values), token t at
  // position rope_positions[t] (device, int32), with the (cos, sin) pairs
  // of rope_table ([positions][head_dim / 2] float2, RopeCosSinTable).
  const float2* rope_table = nullptr;
  const int32_t* rope_positions = nullptr;
};

// out and lse are overwritten (rows of every sequence; nothing else).
Status AttentionForward(const AttentionShape& shape, const __nv_bfloat16* q,
                        const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out,
                        float* lse, cudaStream_t stream);

// Scratch bytes AttentionBackward needs: an fp32 dQ accumulator
// [total_tokens, num_heads, head_dim] and the row dot products dO . O
// [num_heads, total_tokens].
size_t AttentionBackwardWorkspaceBytes(const AttentionShape& shape);

// dq, dk, dv overwritten. out and lse are AttentionForward's on the same
// q, k, v; workspace has AttentionBackwardWorkspaceBytes bytes (16-byte
// aligned). dK/dV are summed over the query heads sharing a KV head inside
// one CTA (deterministic); dQ is accumulated with fp32 atomics (the order of
// the additions, and so the last bits of dq, may differ between runs).
Status AttentionBackward(const AttentionShape& shape, const __nv_bfloat16* q,
                         const __nv_bfloat16* k, const __nv_bfloat16* v,
                         const __nv_bfloat16* out, const __nv_bfloat16* dout, const float* lse,
                         __nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv,
                         void* workspace, cudaStream_t stream);

}  // namespace grove::kernels
