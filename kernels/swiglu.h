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

}  // namespace grove::kernels
