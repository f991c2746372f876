// The log-prob head after the lm_head GEMM: per row r with target y_r,
//   lse_r = log sum_v exp(z_rv),  logp_r = z_{r,y_r} - lse_r
// and its gradient for the following cuBLAS GEMMs,
//   dz_rv = dlogp_r * (onehot(y_r)_v - exp(z_rv - lse_r)),
// as model/transformer.cc's Score/Backward. One block per row, 16-byte
// loads, an online (running max, rescaled sum) reduction in fp32.
//
// Logits come as fp32 or bf16 (overloads): fp32 when [rows, vocab] fits in
// memory (a 16k x 32k fp32 block is 2 GiB), bf16 to halve it. A row whose
// target is < 0 or >= vocab is skipped: logp 0, lse still computed, dlogits
// row 0. Device pointers, 16-byte aligned; vocab a multiple of 8, at most
// kLogProbMaxVocab.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "base/status.h"
#include "kernels/grouped_gemm.h"

namespace grove::kernels {

inline constexpr int kLogProbMaxVocab = 1 << 20;

// logits [rows, vocab], targets int32 [rows] -> logp fp32 [rows], lse fp32 [rows].
Status TokenLogProbForward(const float* logits, const int32_t* targets, float* logp, float* lse, int rows,
                           int vocab, cudaStream_t stream);
Status TokenLogProbForward(const __nv_bfloat16* logits, const int32_t* targets, float* logp, float* lse, int rows,
                           int vocab, cudaStream_t stream);

// dlogits bf16 [rows, vocab] (overwritten); lse from the forward on the same logits.
Status TokenLogProbBackward(const float* logits, const int32_t* targets, const float* lse, const float* dlogp,
                            __nv_bfloat16* dlogits, int rows, int vocab, cudaStream_t stream);
Status TokenLogProbBackward(const __nv_bfloat16* logits, const int32_t* targets, const float* lse,
                            const float* dlogp, __nv_bfloat16* dlogits, int rows, int vocab, cudaStream_t stream);

// The same head from the fused lm_head GEMM's epilogue
// (GroupedGemmArgs::logit_block_stats, kernels/grouped_gemm.h), where no
// fp32 logits exist: per row, `block_stats` [rows, blocks] holds each
// 128-column block's (max m_j, sum of exp(z - m_j)) and `target_logit` the
// target's fp32 logit; `shifted` [rows, vocab] bf16 holds u = z - m_j.
// lse_r = M + log sum_j s_j exp(m_j - M) with M = max_j m_j (one warp a
// row), logp_r = target_logit_r - lse_r; rows with a target outside
// [0, vocab) get logp 0 and never read target_logit. blocks =
// LogitBlocks(vocab).
Status TokenLogProbFromBlockStats(const float2* block_stats, const float* target_logit,
                                  const int32_t* targets, float* logp, float* lse, int rows, int vocab,
                                  cudaStream_t stream);

// dlogits_rv = dlogp_r * (onehot(y_r)_v - exp(u_rv + m_rj - lse_r)), j the
// block of v: the backward above from u. dlogits may be `shifted` itself
// (each element is read before it is written, by the same thread), which
// is how the learner turns its kept u into dz without another buffer.
Status TokenLogProbBackwardFromShifted(const __nv_bfloat16* shifted, const float2* block_stats,
                                       const int32_t* targets, const float* lse, const float* dlogp,
                                       __nv_bfloat16* dlogits, int rows, int vocab, cudaStream_t stream);

}  // namespace grove::kernels
