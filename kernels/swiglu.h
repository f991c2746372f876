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

}  // namespace grove::kernels
