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

// Bytes of scratch RmsNormBackward (and RmsNormBackwardResidual) needs for
// these sizes.
size_t RmsNormBackwardWorkspaceBytes(int tokens, int hidden);

// dx [tokens, hidden] bf16 (overwritten); dweight [hidden] fp32 (overwritten,
// not accumulated); rstd from RmsNormForward on the same x; workspace of
// RmsNormBackwardWorkspaceBytes bytes.
Status RmsNormBackward(const __nv_bfloat16* dy, const __nv_bfloat16* x, const float* weight,
                       const float* rstd, __nv_bfloat16* dx, float* dweight, void* workspace,
                       int tokens, int hidden, cudaStream_t stream);

// The backward of a pre-norm block's RMSNorm fused with the residual
// stream's gradient: RmsNormBackward's math on an fp32 dy, the input
// gradient dx (fp32, never rounded) added to the residual gradient, which is
// also written in bf16 for the next block's GEMMs, and the weight gradient
// added straight into the parameter gradient. Per row t, column j:
//   dres[t,j]      = (accumulate_residual ? dres[t,j] : 0) + dx[t,j]
//   dres_bf16[t,j] = bf16(dres[t,j])  (the rounding of the fp32 just written)
//   grad_w[j]      = (accumulate_weight_grad ? grad_w[j] : 0) + dweight[j]
// with dx and dweight as RmsNormBackward defines them. dweight is reduced in
// a fixed order (the result does not depend on the run). One pass over dy,
// x and dres: 16 bytes of memory traffic per element when accumulating.
struct RmsNormBackwardResidualArgs {
  const float* dy = nullptr;              // [tokens, hidden]
  const __nv_bfloat16* x = nullptr;       // [tokens, hidden], the norm's input
  const float* weight = nullptr;          // [hidden]
  const float* rstd = nullptr;            // [tokens], from RmsNormForward on x
  float* dres = nullptr;                  // [tokens, hidden], in/out
  __nv_bfloat16* dres_bf16 = nullptr;     // [tokens, hidden], out
  float* grad_w = nullptr;                // [hidden], in/out (any alignment)
  void* workspace = nullptr;              // RmsNormBackwardWorkspaceBytes(tokens, hidden)
  int tokens = 0;
  int hidden = 0;
  bool accumulate_residual = true;
  bool accumulate_weight_grad = true;
};

// dy, x, weight, dres, dres_bf16 and workspace 16-byte aligned; with
// tokens == 0 only grad_w may be touched (zeroed unless accumulating).
Status RmsNormBackwardResidual(const RmsNormBackwardResidualArgs& a, cudaStream_t stream);

}  // namespace grove::kernels
