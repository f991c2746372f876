// The attention forward's and backward's kernel choices, for tests and
// kernel_bench, and the entry points of the sm_90a kernels
// (attention_wgmma.cu, attention_wgmma_bwd.cu). Host-only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"
#include "kernels/attention.h"

namespace grove::kernels {

// kMmaSync: the mma.sync kernel (any GPU, head_dim 32, 64, 128).
// kWgmma: the warp-specialized wgmma + TMA kernel (sm_90 and head_dim 128
// only; FailedPrecondition elsewhere). kAuto: what AttentionForward runs:
// the environment variable GROVE_ATTENTION_FWD=mma|wgmma if set, else
// kWgmma where it can run and kMmaSync elsewhere.
enum class AttentionForwardImpl { kAuto, kMmaSync, kWgmma };

// AttentionForward (same contract) with the kernel chosen by `impl`.
Status AttentionForwardWith(AttentionForwardImpl impl, const AttentionShape& shape,
                            const __nv_bfloat16* q, const __nv_bfloat16* k,
                            const __nv_bfloat16* v, __nv_bfloat16* out, float* lse,
                            cudaStream_t stream);

// Whether the current device can run kWgmma at this head_dim.
bool AttentionForwardWgmmaSupported(int head_dim);

// The backward's main kernel (the D pre-pass and the dQ post-pass are
// shared). kMmaSync: attention.cu's (any GPU, head_dim 32, 64, 128).
// kWgmma: attention_wgmma_bwd.cu's (sm_90 and head_dim 128 only;
// FailedPrecondition elsewhere). kAuto: what AttentionBackward runs: the
// environment variable GROVE_ATTENTION_BWD=mma|wgmma if set, else kWgmma
// where it runs and kMmaSync elsewhere (H100: 257 vs 159 TFLOP/s at the
// gpu-ref step shape, dK/dV bit-equal to mma.sync's; docs/kernels.md).
enum class AttentionBackwardImpl { kAuto, kMmaSync, kWgmma };

// AttentionBackward (same contract) with the main kernel chosen by `impl`.
Status AttentionBackwardWith(AttentionBackwardImpl impl, const AttentionShape& shape,
                             const __nv_bfloat16* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const __nv_bfloat16* out,
                             const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq,
                             __nv_bfloat16* dk, __nv_bfloat16* dv, void* workspace,
                             cudaStream_t stream);

namespace detail {

// The environment variable `var` naming one of two kernel paths, `first` or
// `second`: *chose_second set accordingly; left as it is when `var` is unset
// or empty; InvalidArgument naming both when it names neither.
Status ReadPathChoice(const char* var, const char* first, const char* second, bool* chose_second);

// The wgmma forward (attention_wgmma.cu) on a shape AttentionForward has
// checked (head_dim 128, non-empty), on an sm_90 device. Row strides are
// resolved (never 0); scale is the softmax scale (> 0).
Status LaunchAttentionForwardWgmma(const AttentionShape& shape, const __nv_bfloat16* q,
                                   const __nv_bfloat16* k, const __nv_bfloat16* v,
                                   __nv_bfloat16* out, float* lse, int64_t q_row_stride,
                                   int64_t kv_row_stride, float scale, cudaStream_t stream);

// The wgmma backward's main kernel (attention_wgmma_bwd.cu), same
// conditions as above, after the D pre-pass filled dvec [num_heads,
// total_tokens] and with dq_accum [total_tokens, num_heads, 128] zeroed:
// adds dS K (unscaled) into dq_accum, writes dk (times scale) and dv.
Status LaunchAttentionBackwardWgmma(const AttentionShape& shape, const __nv_bfloat16* q,
                                    const __nv_bfloat16* k, const __nv_bfloat16* v,
                                    const __nv_bfloat16* dout, const float* lse,
                                    const float* dvec, float* dq_accum, __nv_bfloat16* dk,
                                    __nv_bfloat16* dv, int64_t q_row_stride,
                                    int64_t kv_row_stride, float scale, cudaStream_t stream);

}  // namespace detail
}  // namespace grove::kernels
