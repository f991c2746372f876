// The tensor-core core shared by QuantLinear (m >= 2) and MoeDecodeForward
// (busy experts): mma.sync m16n8k16, quantized weights as the A operand.
//
// A warp owns 16 weight rows r0..r0+15; lane (g = lane / 4, q = lane % 4)
// loads rows r0+g and r0+g+8, 16-byte chunk 4 it + q of each ("iteration"
// it covers 4 chunks = 32 / 64 / 128 columns for bf16 / int8 / int4). Each
// 8-column octet of a chunk feeds two k16 steps: the dot product does not
// care in which order the columns are summed, so lane q's octet elements
// 0,1 / 2,3 play the virtual k 2q,2q+1 / 2q+8,2q+9 of the first step and
// 4,5 / 6,7 those of the second, and the B operand (x, token g of an 8-token
// tile) is loaded from the very same columns by the same lane. A holds the
// weights as bf16 q (exact: |q| <= 127) or bf16 w; int8 sums are scaled per
// row at the end, int4 sums per iteration (an iteration is exactly one
// group of 128). Warps split the iterations ("slices") as the CUDA-core
// path does, reduced across slices in order through shared memory.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "kernels/ptx/mma.cuh"
#include "kernels/quant_gemv.cuh"
#include "kernels/quant_linear.h"
#include "kernels/quant_unpack.h"

namespace grove::kernels::mma {

constexpr int kTileRows = 16;

struct Split {
  int iters = 0, slices = 1, groups = 8;
};

__host__ __device__ inline Split MakeSplit(QuantFormat f, int k) {
  Split s;
  s.iters = k / (4 * gemv::ChunkCols(f));
  s.slices = s.iters >= 8 ? 8 : s.iters >= 4 ? 4 : s.iters >= 2 ? 2 : 1;
  s.groups = gemv::kWarps / s.slices;
  return s;
}

// Shared bytes of x for 8 * nt tokens of k columns.
__host__ __device__ constexpr int64_t XBytes(int64_t k, int nt) { return k * 2 * 8 * nt; }

// Octet index of (iteration it, octet s of the chunk, token, quad q) in the
// shared x tile of T tokens: the 32 lanes of a warp read 32 consecutive
// octets for each (it, s, tile).
__device__ __forceinline__ int XIndex(int it, int s, int S, int T, int token, int q) {
  return ((it * S + s) * T + token) * 4 + q;
}

// Stages `count` (<= 8 * NT) token rows of k columns; row(i) is token i's
// bf16 row (16-byte aligned). Ends with a barrier.
template <QuantFormat F, int NT, typename RowOf>
__device__ __forceinline__ void StageX(uint4* x_s, int k, int count, RowOf row) {
  constexpr int S = gemv::Format<F>::kChunkCols / 8, T = 8 * NT;
  const int iters = k / (4 * gemv::Format<F>::kChunkCols);
  for (int idx = threadIdx.x; idx < iters * S * T * 4; idx += blockDim.x) {
    const int q = idx % 4, token = (idx / 4) % T, rest = idx / (4 * T);
    const int s = rest % S, it = rest / S;
    const int octet = (4 * it + q) * S + s;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (token < count) v = *reinterpret_cast<const uint4*>(row(token) + 8 * octet);
    x_s[idx] = v;
  }
  __syncthreads();
}

// The 8 columns of octet s of a loaded chunk as 4 bf16 pairs (elements
// 2j, 2j+1 in pair j, lower column in the low half).
template <QuantFormat F>
__device__ __forceinline__ void OctetPairs(const uint4& raw, int s, uint32_t (&p)[4]) {
  if constexpr (F == QuantFormat::kBF16) {
    p[0] = raw.x;
    p[1] = raw.y;
    p[2] = raw.z;
    p[3] = raw.w;
  } else if constexpr (F == QuantFormat::kInt8) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    float a[4], b[4];
    Int8WordToFloats(words[2 * s], a);
    Int8WordToFloats(words[2 * s + 1], b);
    const float v[8] = {a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);  // exact: small integers
      std::memcpy(&p[j], &h, 4);
    }
  } else {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    Int4WordToBf16Pairs(words[s], p);
  }
}

// The sums of one iteration of a warp's tile, unscaled: d[t] = the 16 rows'
// chunks (wa: row g, wb: row g + 8) dotted with the staged tokens of tile t,
// the k16 steps added in octet order; `it` is the iteration.
template <QuantFormat F, int NT>
__device__ __forceinline__ void IterationSums(const uint4& wa, const uint4& wb, const uint4* x_s, int it,
                                              float (&d)[NT][4]) {
  constexpr int S = gemv::Format<F>::kChunkCols / 8, T = 8 * NT;
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int r = 0; r < 4; ++r) d[t][r] = 0.f;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    uint32_t fa[4], fb[4];
    OctetPairs<F>(wa, s, fa);
    OctetPairs<F>(wb, s, fb);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const uint4 xv = x_s[XIndex(it, s, S, T, 8 * t + g, q)];
      const uint32_t a0[4] = {fa[0], fb[0], fa[1], fb[1]};
      const uint32_t b0[2] = {xv.x, xv.y};
      ptx::mma_m16n8k16_bf16_f32(d[t], a0, b0);
      const uint32_t a1[4] = {fa[2], fb[2], fa[3], fb[3]};
      const uint32_t b1[2] = {xv.z, xv.w};
      ptx::mma_m16n8k16_bf16_f32(d[t], a1, b1);
    }
  }
}

// acc += one iteration's sums: int4 times the rows' scales of the
// iteration's group (sa: row g, sb: row g + 8), the others as they are.
template <QuantFormat F, int NT>
__device__ __forceinline__ void AddIteration(const float (&d)[NT][4], float sa, float sb, float (&acc)[NT][4]) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    if constexpr (F == QuantFormat::kInt4) {
      acc[t][0] = fmaf(sa, d[t][0], acc[t][0]);
      acc[t][1] = fmaf(sa, d[t][1], acc[t][1]);
      acc[t][2] = fmaf(sb, d[t][2], acc[t][2]);
      acc[t][3] = fmaf(sb, d[t][3], acc[t][3]);
    } else {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[t][r] += d[t][r];
    }
  }
}

// int8: a slice's sums times the rows' scales (sa: row g, sb: row g + 8),
// each product rounded on its own (__fmul_rn: never contracted into a later
// add, so every caller sums the same rounded products).
template <QuantFormat F, int NT>
__device__ __forceinline__ void ScaleRows(float sa, float sb, float (&acc)[NT][4]) {
  if constexpr (F == QuantFormat::kInt8) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      acc[t][0] = __fmul_rn(acc[t][0], sa);
      acc[t][1] = __fmul_rn(acc[t][1], sa);
      acc[t][2] = __fmul_rn(acc[t][2], sb);
      acc[t][3] = __fmul_rn(acc[t][3], sb);
    }
  }
}

// One warp's part of rows r0..r0+15 (rows >= n read as zero; r0 < n) of a
// weight [n, k] times the staged tokens, over iterations slice, slice +
// slices, ... < iters: acc[t][0..1] = row r0+g, tokens 8t+2q, 8t+2q+1;
// acc[t][2..3] = row r0+g+8, same tokens (g = lane / 4, q = lane % 4), the
// format's scales applied. Whole warp, converged.
template <QuantFormat F, int NT>
__device__ __forceinline__ void WarpTile(const uint8_t* data, const float* scales, int64_t n, int64_t r0, int k,
                                         const uint4* x_s, int slice, int slices, float (&acc)[NT][4]) {
  const int iters = k / (4 * gemv::Format<F>::kChunkCols);
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int64_t row_bytes = gemv::RowBytes(F, k), row_scales = gemv::RowScales(F, k);
  const int64_t ra = r0 + g, rb = r0 + g + 8;
  const bool va = ra < n, vb = rb < n;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[t][r] = 0.f;
  const uint4* pa = reinterpret_cast<const uint4*>(data + (va ? ra : 0) * row_bytes);
  const uint4* pb = reinterpret_cast<const uint4*>(data + (vb ? rb : 0) * row_bytes);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  int it = slice;
  uint4 wa = zero, wb = zero;
  if (it < iters) {
    wa = va ? __ldg(pa + 4 * it + q) : zero;
    wb = vb ? __ldg(pb + 4 * it + q) : zero;
  }
  while (it < iters) {
    // Issue the next iteration's loads before this one's math.
    const int next = it + slices;
    uint4 na = zero, nb = zero;
    if (next < iters) {
      na = va ? __ldg(pa + 4 * next + q) : zero;
      nb = vb ? __ldg(pb + 4 * next + q) : zero;
    }
    float d[NT][4];
    IterationSums<F, NT>(wa, wb, x_s, it, d);
    float sa = 0.f, sb = 0.f;
    if constexpr (F == QuantFormat::kInt4) {
      sa = va ? __ldg(scales + ra * row_scales + it) : 0.f;
      sb = vb ? __ldg(scales + rb * row_scales + it) : 0.f;
    }
    AddIteration<F, NT>(d, sa, sb, acc);
    wa = na;
    wb = nb;
    it = next;
  }
  if constexpr (F == QuantFormat::kInt8)
    ScaleRows<F, NT>(va ? __ldg(scales + ra) : 0.f, vb ? __ldg(scales + rb) : 0.f, acc);
}

// WarpTile for two weights of the same shape and the same staged tokens
// (the MoE's W1 and W3), their loads issued together one iteration ahead:
// half the dependent round trips of two WarpTile calls in turn, and the
// same arithmetic for each weight, so the same bits.
template <QuantFormat F, int NT>
__device__ __forceinline__ void WarpTilePair(const uint8_t* const (&data)[2], const float* const (&scales)[2],
                                             int64_t n, int64_t r0, int k, const uint4* x_s, int slice, int slices,
                                             float (&acc)[2][NT][4]) {
  const int iters = k / (4 * gemv::Format<F>::kChunkCols);
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int64_t row_bytes = gemv::RowBytes(F, k), row_scales = gemv::RowScales(F, k);
  const int64_t ra = r0 + g, rb = r0 + g + 8;
  const bool va = ra < n, vb = rb < n;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const uint4* pa[2];
  const uint4* pb[2];
  uint4 wa[2], wb[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][t][r] = 0.f;
    pa[i] = reinterpret_cast<const uint4*>(data[i] + (va ? ra : 0) * row_bytes);
    pb[i] = reinterpret_cast<const uint4*>(data[i] + (vb ? rb : 0) * row_bytes);
    wa[i] = va && slice < iters ? __ldg(pa[i] + 4 * slice + q) : zero;
    wb[i] = vb && slice < iters ? __ldg(pb[i] + 4 * slice + q) : zero;
  }
  for (int it = slice; it < iters; it += slices) {
    const int next = it + slices;
    uint4 na[2], nb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      na[i] = va && next < iters ? __ldg(pa[i] + 4 * next + q) : zero;
      nb[i] = vb && next < iters ? __ldg(pb[i] + 4 * next + q) : zero;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float d[NT][4];
      IterationSums<F, NT>(wa[i], wb[i], x_s, it, d);
      float sa = 0.f, sb = 0.f;
      if constexpr (F == QuantFormat::kInt4) {
        sa = va ? __ldg(scales[i] + ra * row_scales + it) : 0.f;
        sb = vb ? __ldg(scales[i] + rb * row_scales + it) : 0.f;
      }
      AddIteration<F, NT>(d, sa, sb, acc[i]);
      wa[i] = na[i];
      wb[i] = nb[i];
    }
  }
  if constexpr (F == QuantFormat::kInt8) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      ScaleRows<F, NT>(va ? __ldg(scales[i] + ra) : 0.f, vb ? __ldg(scales[i] + rb) : 0.f, acc[i]);
  }
}

// The fragment element (t, r) of `lane`: its row within the 16-row tile and its token.
__device__ __forceinline__ int TileRow(int lane, int r) { return lane / 4 + (r >= 2 ? 8 : 0); }
__device__ __forceinline__ int TileToken(int lane, int t, int r) { return 8 * t + 2 * (lane % 4) + (r & 1); }

}  // namespace grove::kernels::mma
