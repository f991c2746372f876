// RMSNorm forward and backward over rows of activations [tokens, hidden]:
//   rstd[t] = 1 / sqrt(mean_j x[t,j]^2 + eps),  y[t,j] = x[t,j] * rstd[t] * w[j]
// Activations bf16, the weight and its gradient fp32 (master copy), all
// arithmetic fp32. The backward is deterministic: the weight gradient is
// reduced in a fixed order (no atomics). Device pointers; work is enqueued
// on `stream`; hidden must be a multiple of 8 and at most kRmsNormMaxHidden.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "base/status.h"

namespace grove::kernels {

inline constexpr int kRmsNormMaxHidden = 8192;

// y [tokens, hidden] bf16; rstd [tokens] fp32 (kept for the backward; may be null).
Status RmsNormForward(const __nv_bfloat16* x, const float* weight, __nv_bfloat16* y, float* rstd,
                      int tokens, int hidden, float eps, cudaStream_t stream);

// Bytes of scratch RmsNormBackward needs for these sizes.
size_t RmsNormBackwardWorkspaceBytes(int tokens, int hidden);

// dx [tokens, hidden] bf16 (overwritten); dweight [hidden] fp32 (overwritten,
// not accumulated); rstd from RmsNormForward on the same x; workspace of
// RmsNormBackwardWorkspaceBytes bytes.
Status RmsNormBackward(const __nv_bfloat16* dy, const __nv_bfloat16* x, const float* weight,
                       const float* rstd, __nv_bfloat16* dx, float* dweight, void* workspace,
                       int tokens, int hidden, cudaStream_t stream);

}  // namespace grove::kernels
