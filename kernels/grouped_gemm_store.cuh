// Epilogue helpers shared by the grouped GEMM kernels.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/swiglu_math.cuh"

namespace grove::kernels::detail {

// Two adjacent fp32 accumulators (columns col, col + 1; col even, row
// stride a multiple of 8) as float2 or bf16x2.
__device__ __forceinline__ void StorePair(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}

__device__ __forceinline__ void StorePair(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

// Two adjacent fp32 values written, or added to what is there (a gradient
// accumulated with beta = 1; the caller owns these elements exclusively).
// Returns the values stored.
__device__ __forceinline__ float2 StoreOrAddPair(float* p, float x, float y, bool add) {
  if (add) {
    const float2 old = *reinterpret_cast<const float2*>(p);
    x += old.x;
    y += old.y;
  }
  StorePair(p, x, y);
  return make_float2(x, y);
}

// Four adjacent values (col a multiple of 4): one 16-byte or 8-byte store.
__device__ __forceinline__ void StoreQuad(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}

__device__ __forceinline__ void StoreQuad(__nv_bfloat16* p, float a, float b, float c, float d) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 v;
  v.x = *reinterpret_cast<const uint32_t*>(&lo);
  v.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(p) = v;
}

// 8 values as bf16 in one 16-byte st.global (16-byte aligned p). Not
// vector_io's StoreBf16x8: in the wgmma SwiGLU epilogue nvcc split one of its
// two uint4 stores per step into four 4-byte ones (PTX), alignment hints or not.
__device__ __forceinline__ void StoreBf16x8Global(__nv_bfloat16* p, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  __stcg(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
}

// Stores one warp's share of a wgmma m64nNk16 fp32 accumulator (N/2
// registers; layout in kernels/ptx/wgmma.cuh): rows row0 + lane/4 (+8) of
// the warp's 16, columns col0 .. col0 + N - 1. Only rows < rows_valid
// (relative to row0) and columns < n are written; n % 8 == 0, col0 % 8 == 0.
//
// In the accumulator a lane holds 2 adjacent columns of each 8-column group,
// so a plain store writes 16 bytes per row per instruction and bf16 rows
// land as half sectors. StoreSwappedQuad takes one row's pairs of two
// adjacent groups (mine: group at col_group0, next: the one after; all 32
// lanes call it together): lanes q and q^1 (q = lane % 4) swap one pair, so
// even q owns 4 adjacent columns of the first group and odd q 4 of the
// second, and each store instruction covers 32 (bf16) or 64 (fp32)
// contiguous bytes per row. mma.sync's m16n8 accumulators have the same
// per-quad layout.
// The swap of StoreSwappedQuad: v receives the 4 adjacent values this lane
// owns after it; returns the first of their columns.
__device__ __forceinline__ int SwapQuad(int col_group0, const float* mine, const float* next,
                                        float (&v)[4]) {
  const int q = threadIdx.x % 4;
  const bool odd = q & 1;
  const float send_x = odd ? mine[0] : next[0];
  const float send_y = odd ? mine[1] : next[1];
  const float got_x = __shfl_xor_sync(0xffffffffu, send_x, 1);
  const float got_y = __shfl_xor_sync(0xffffffffu, send_y, 1);
  if (odd) {
    v[0] = got_x, v[1] = got_y, v[2] = next[0], v[3] = next[1];
    return col_group0 + 8 + 2 * (q - 1);
  }
  v[0] = mine[0], v[1] = mine[1], v[2] = got_x, v[3] = got_y;
  return col_group0 + 2 * q;
}

template <typename OutT>
__device__ __forceinline__ void StoreSwappedQuad(OutT* c, int n, int64_t row, bool row_ok,
                                                 int col_group0, const float* mine,
                                                 const float* next) {
  float v[4];
  const int col = SwapQuad(col_group0, mine, next, v);
  if (row_ok && col < n) StoreQuad(c + row * n + col, v[0], v[1], v[2], v[3]);
}

// StoreSwappedQuad's quads as dh of the SwiGLU backward epilogue
// (GroupedGemmArgs::swiglu_bwd_ab): each lane reads its 4 columns of a and
// of b (8 bytes each, the quads of a row contiguous like the stores) from
// ab ([rows, 2n]) and writes da, db at the same places of c ([rows, 2n]).
__device__ __forceinline__ void StoreSwappedQuadSwiGluBwd(__nv_bfloat16* c,
                                                          const __nv_bfloat16* ab, int n,
                                                          int64_t row, bool row_ok,
                                                          int col_group0, const float* mine,
                                                          const float* next) {
  float dh[4];
  const int col = SwapQuad(col_group0, mine, next, dh);
  if (!row_ok || col >= n) return;
  const int64_t at = row * 2 * n + col;
  const uint2 a_raw = *reinterpret_cast<const uint2*>(ab + at);
  const uint2 b_raw = *reinterpret_cast<const uint2*>(ab + at + n);
  const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a_raw);
  const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&b_raw);
  float da[4], db[4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 a = __bfloat1622float2(a2[i]), b = __bfloat1622float2(b2[i]);
    SwiGluBackwardElement(dh[2 * i], a.x, b.x, da[2 * i], db[2 * i]);
    SwiGluBackwardElement(dh[2 * i + 1], a.y, b.y, da[2 * i + 1], db[2 * i + 1]);
  }
  StoreQuad(c + at, da[0], da[1], da[2], da[3]);
  StoreQuad(c + at + n, db[0], db[1], db[2], db[3]);
}

template <int kRegs, typename OutT>
__device__ __forceinline__ void StoreWgmmaAccumulator(const float (&acc)[kRegs], OutT* c, int n,
                                                      int64_t row0, int rows_valid, int col0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int g = 0; g < kRegs / 4; g += 2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = lane / 4 + 8 * h;
      StoreSwappedQuad(c, n, row0 + row, row < rows_valid, col0 + 8 * g, &acc[4 * g + 2 * h],
                       &acc[4 * (g + 1) + 2 * h]);
    }
  }
}

}  // namespace grove::kernels::detail
