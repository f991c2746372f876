// The attention forward's kernel choice, for tests and kernel_bench, and the
// entry point of the sm_90a kernel (attention_wgmma.cu). Host-only.
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

namespace detail {

// The wgmma forward (attention_wgmma.cu) on a shape AttentionForward has
// checked (head_dim 128, non-empty), on an sm_90 device. Row strides are
// resolved (never 0); scale is the softmax scale (> 0).
Status LaunchAttentionForwardWgmma(const AttentionShape& shape, const __nv_bfloat16* q,
                                   const __nv_bfloat16* k, const __nv_bfloat16* v,
                                   __nv_bfloat16* out, float* lse, int64_t q_row_stride,
                                   int64_t kv_row_stride, float scale, cudaStream_t stream);

}  // namespace detail
}  // namespace grove::kernels
