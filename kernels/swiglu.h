// SwiGLU, the gate of the expert MLP: h = silu(g) * u with g = x W1^T and
// u = x W3^T (silu(g) = g * sigmoid(g)), elementwise over [rows, width].
// bf16 in and out, fp32 arithmetic. Device pointers, 16-byte aligned;
// count (= rows * width) a multiple of 8.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

Status SwiGluForward(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* h,
                     int64_t count, cudaStream_t stream);

// dg = dh * u * silu'(g), du = dh * silu(g), with
// silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
Status SwiGluBackward(const __nv_bfloat16* dh, const __nv_bfloat16* g, const __nv_bfloat16* u,
                      __nv_bfloat16* dg, __nv_bfloat16* du, int64_t count, cudaStream_t stream);

// The same with g and u side by side in one [rows, 2 * width] buffer, gu =
// [g | u] per row: the output of one GEMM against W1 and W3 stacked (they
// are adjacent in the parameter layout), so both come from one launch and
// the backward's dX through them is one GEMM with k = 2 * width. h and dh
// are [rows, width]; dgu = [dg | du] like gu. width a multiple of 8.
Status SwiGluForwardPacked(const __nv_bfloat16* gu, __nv_bfloat16* h, int64_t rows, int width,
                           cudaStream_t stream);
Status SwiGluBackwardPacked(const __nv_bfloat16* dh, const __nv_bfloat16* gu, __nv_bfloat16* dgu, int64_t rows,
                            int width, cudaStream_t stream);

// The MoE backward's SwiGLU step with the router's gate kept out of the
// GEMMs around it. Expert row r (of `rows`) belongs to slot
// slot_of_row[r] (moe_permute.h), whose gate is slot_gates[slot]; the
// expert's output was y_r = h_r W2^T and the layer's gate * y_r. Given
// dh_ungated [rows, width] = dY_token W2 (the gradient of h before the
// gate) and gu = [g | u] as SwiGluBackwardPacked takes it, this writes
//   dgu      = [dg | du] for dh = gate * dh_ungated (as SwiGluBackwardPacked),
//   h_gated  [rows, width] bf16 = gate * h (h = silu(g) * u recomputed in
//            fp32): the x of w2's weight gradient, sum_r dY_r^T (gate h_r),
//   slot_dgates[slot] = <dh_ungated_r, h_r> (fp32) = <dY, y_r>: the
//            gate's gradient.
// Why: the forward's y and h need not be kept for the backward (0.6 GB a
// gpu-ref layer at 32k tokens), and the combine backward need not read y.
// Every slot must own exactly one row (rows = tokens * top_k): slot_dgates
// is written whole. width a multiple of 8; pointers 16-byte aligned
// (slot_of_row, slot_gates, slot_dgates 4-byte).
Status SwiGluBackwardGated(const __nv_bfloat16* dh_ungated, const __nv_bfloat16* gu, const int32_t* slot_of_row,
                           const float* slot_gates, __nv_bfloat16* dgu, __nv_bfloat16* h_gated, float* slot_dgates,
                           int64_t rows, int width, cudaStream_t stream);

// The gate's gradient when the gated SwiGLU backward runs in the w2 dX
// GEMM's epilogue (GroupedGemmArgs::swiglu_bwd_slot_of_row): that epilogue
// leaves each row's <dh_ungated, h> in `parts` partial sums ([rows, parts]
// fp32, one per 128-column block); this adds them in column order into
// slot_dgates[slot_of_row[r]]. Every slot must own exactly one row.
Status SwiGluGateGradFromPartials(const float* partials, int parts, const int32_t* slot_of_row, float* slot_dgates,
                                  int64_t rows, cudaStream_t stream);

}  // namespace grove::kernels
