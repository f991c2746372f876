// Rotary position embedding, as model/layers.h (RopeTables, RopeRow) defines
// it: in each head, the pair (x_i, x_{i+half}) (half = head_dim / 2, "rotate
// half") is rotated by the angle pos * base^(-2i/head_dim), pos counted from
// 0 at the sequence start:
//   x_i' = x_i cos a - x_{i+half} sin a,  x_{i+half}' = x_i sin a + x_{i+half} cos a.
// The angle and its cosine and sine are computed in double and rounded to
// fp32 (the CPU model's fp32 tables hold exactly these values); the rotation
// is fp32 arithmetic on bf16 data, one rounding per output.
// The backward is the transpose rotation (by -a), applied to the gradient.
//
// x: bf16 [tokens, heads, head_dim] rows of `row_stride` elements (0: packed,
// heads * head_dim; a larger stride lets q and k be rotated inside a fused
// qkv buffer). In place. head_dim even, at most kRopeMaxHeadDim. 16-byte
// vectors are used when head_dim/2 and row_stride are multiples of 8 and x is
// 16-byte aligned, bf16 scalars otherwise.
// positions: int32 [tokens] on the device, >= 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

inline constexpr int kRopeMaxHeadDim = 512;

Status RopeForward(__nv_bfloat16* x, const int32_t* positions, int tokens, int heads, int head_dim, double base,
                   cudaStream_t stream, int64_t row_stride = 0);

// dx in place: rotation by -angle (the transpose of the forward's rotation).
Status RopeBackward(__nv_bfloat16* dx, const int32_t* positions, int tokens, int heads, int head_dim, double base,
                    cudaStream_t stream, int64_t row_stride = 0);

// The (cos, sin) pairs RopeForward rotates with, for positions 0 ..
// positions - 1: table[pos * head_dim / 2 + i] = (cos, sin) of pos *
// base^(-2i/head_dim), computed as RopeForward computes them (double, then
// rounded to fp32), so an epilogue that rotates from the table
// (GroupedGemmArgs::rope_table) gives RopeForward's bits. table: device,
// [positions, head_dim / 2] float2.
Status RopeCosSinTable(float2* table, int positions, int head_dim, double base, cudaStream_t stream);

// RopeBackward with the angles from such a table (positions < the table's),
// the same bits.
Status RopeBackwardFromTable(__nv_bfloat16* dx, const int32_t* positions, int tokens, int heads, int head_dim,
                             const float2* table, cudaStream_t stream, int64_t row_stride = 0);

}  // namespace grove::kernels
