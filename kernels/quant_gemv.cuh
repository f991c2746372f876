// The device core shared by QuantLinear and MoeDecodeForward: a block of 8
// warps applies a few weight rows (any QuantFormat) to up to kMaxTokens
// activation rows held in shared memory, fp32 accumulation.
//
// Work split. A weight row is cut into 16-byte "chunks" (8 bf16, 16 int8 or
// 32 int4 columns); lane l of a warp takes chunks l, l + 32, ... of each of
// its kRows rows ("iterations" it = chunk / 32). The 8 warps form `groups`
// row groups of `slices` warps each (slices = the largest of 8, 4, 2, 1 not
// above the iteration count, so short rows still keep all warps busy): warp
// w handles the rows of group w / slices and iterations it = w % slices,
// + slices, ... . Partial sums are reduced by warp shuffles, then across the
// slices in slice order through shared memory: the result of a row for a
// token depends only on the weight row, the token's activation row and k,
// never on how many tokens share the launch (decode and prefill agree bit
// for bit).
//
// Shared activations. Token i's octet o (columns 8o..8o+7, 16 bytes of bf16)
// lives at octet index ((it * S + s) * M + i) * 32 + l, where c = o / S is its
// chunk, s = o % S, it = c / 32, l = c % 32 and S = chunk columns / 8: the 32
// lanes of a warp read 32 consecutive octets (no bank conflicts) for each (s,
// i). Octets past k and tokens past the count are zero.
//
// Dequantization: w = q * scale in fp32 (the exact values of
// DequantizeInt8 / DequantizeInt4), bf16 weights exactly; then fma with x.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/quant_linear.h"
#include "kernels/quant_unpack.h"

namespace grove::kernels::gemv {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 2;          // weight rows per warp (the default; QuantLinear's R knob varies it)
constexpr int kMaxTokens = 16;    // activation rows per pass
constexpr int kPadColumns = 1024; // the largest chunk-iteration span (int4: 32 lanes x 32)

template <QuantFormat F>
struct Format;
template <>
struct Format<QuantFormat::kBF16> {
  static constexpr int kChunkCols = 8;
};
template <>
struct Format<QuantFormat::kInt8> {
  static constexpr int kChunkCols = 16;
};
template <>
struct Format<QuantFormat::kInt4> {
  static constexpr int kChunkCols = 32;
};

__host__ __device__ inline int ChunkCols(QuantFormat f) {
  return f == QuantFormat::kBF16 ? 8 : f == QuantFormat::kInt8 ? 16 : 32;
}
// Bytes of one weight row.
__host__ __device__ inline int64_t RowBytes(QuantFormat f, int64_t k) {
  return f == QuantFormat::kBF16 ? 2 * k : f == QuantFormat::kInt8 ? k : k / 2;
}
// fp32 scales per row.
__host__ __device__ inline int64_t RowScales(QuantFormat f, int64_t k) {
  return f == QuantFormat::kBF16 ? 0 : f == QuantFormat::kInt8 ? 1 : k / 128;
}

struct Split {
  int chunks = 0;  // 16-byte chunks per row
  int iters = 0;   // ceil(chunks / 32)
  int slices = 1;  // warps per row group
  int groups = 8;  // row groups per block
};

__host__ __device__ inline Split MakeSplit(QuantFormat f, int k) {
  Split s;
  s.chunks = k / ChunkCols(f);
  s.iters = (s.chunks + 31) / 32;
  s.slices = s.iters >= 8 ? 8 : s.iters >= 4 ? 4 : s.iters >= 2 ? 2 : 1;
  s.groups = kWarps / s.slices;
  return s;
}

// Shared bytes of the activation tile for `tokens` rows of k columns (any format).
__host__ __device__ inline int64_t XTileBytes(int64_t k, int tokens) {
  return (k + kPadColumns - 1) / kPadColumns * kPadColumns * tokens * 2;
}
// Shared bytes of the cross-warp reduction buffer (rows: weight rows per warp).
__host__ __device__ constexpr int ReduceBytes(int rows) { return kWarps * rows * kMaxTokens * 4; }
constexpr int kReduceBytes = ReduceBytes(kRows);

// Stages `count` (<= M) activation rows into x_s in the layout above;
// octet(i, col) gives token i's 8 bf16 columns col..col+7 as 16 bytes (each
// (i, col) with i < count and col < k asked for exactly once, by one
// thread). Ends with a barrier.
template <QuantFormat F, int M, typename OctetOf>
__device__ __forceinline__ void StageXOctets(uint4* x_s, int k, int count, OctetOf octet) {
  constexpr int S = Format<F>::kChunkCols / 8;
  const int chunks = k / Format<F>::kChunkCols;
  const int iters = (chunks + 31) / 32;
  const int total = iters * S * M * 32;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int l = idx % 32;
    const int i = (idx / 32) % M;
    const int rest = idx / (32 * M);
    const int s = rest % S, it = rest / S;
    const int c = it * 32 + l;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (c < chunks && i < count) v = octet(i, 8 * (c * S + s));
    x_s[idx] = v;
  }
  __syncthreads();
}

// StageXOctets from bf16 rows: row(i) is the bf16 row of token i (16-byte aligned).
template <QuantFormat F, int M, typename RowOf>
__device__ __forceinline__ void StageX(uint4* x_s, int k, int count, RowOf row) {
  StageXOctets<F, M>(x_s, k, count,
                     [&](int i, int col) { return *reinterpret_cast<const uint4*>(row(i) + col); });
}

__device__ __forceinline__ void XOctetToFloats(const uint4& raw, float (&v)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  Bf16WordsToFloats(w, v);
}

// Sub-chunk s (8 columns) of a loaded chunk, dequantized to fp32.
template <QuantFormat F>
__device__ __forceinline__ void DequantOctet(const uint4& raw, int s, float scale, float (&w)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (F == QuantFormat::kBF16) {
    Bf16WordsToFloats(words, w);
  } else if constexpr (F == QuantFormat::kInt8) {
    float a[4], b[4];
    Int8WordToFloats(words[2 * s], a);
    Int8WordToFloats(words[2 * s + 1], b);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      w[e] = a[e] * scale;
      w[4 + e] = b[e] * scale;
    }
  } else {
    float q[8];
    Int4WordToFloats(words[s], q);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = q[e] * scale;
  }
}

// acc[r][i] = this lane's part of dot(weight row r, token i) over this warp's
// iterations (slice of `slices`). rows[r] points at row r's data, scales[r]
// at its fp32 scales (unused for bf16). kRows rows per warp by default; R
// rows put R 16-byte loads per lane in flight per iteration. A row's sum
// does not depend on R (each row's accumulator sees the same FMAs in the
// same order), so every R gives the same bits.
template <QuantFormat F, int M, int kRows = gemv::kRows>
__device__ __forceinline__ void WarpDot(const uint8_t* const (&rows)[kRows], const float* const (&scales)[kRows],
                                        const uint4* __restrict__ x_s, const Split& split, int slice,
                                        float (&acc)[kRows][M]) {
  constexpr int S = Format<F>::kChunkCols / 8;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < M; ++i) acc[r][i] = 0.f;

  auto valid = [&](int it) { return it < split.iters && it * 32 + lane < split.chunks; };
  auto load = [&](int it, uint4 (&raw)[kRows]) {
    const int c = it * 32 + lane;
#pragma unroll
    for (int r = 0; r < kRows; ++r) raw[r] = __ldg(reinterpret_cast<const uint4*>(rows[r]) + c);
  };
  int it = slice;
  bool have = valid(it);
  uint4 cur[kRows];
  if (have) load(it, cur);
  while (have) {
    // Issue the next iteration's loads before computing this one.
    const int next = it + split.slices;
    const bool have_next = valid(next);
    uint4 nxt[kRows];
    if (have_next) load(next, nxt);
    const int c = it * 32 + lane;
    float sc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if constexpr (F == QuantFormat::kInt8) sc[r] = __ldg(scales[r]);
      else if constexpr (F == QuantFormat::kInt4) sc[r] = __ldg(scales[r] + (c * 32) / 128);
      else sc[r] = 1.f;
    }
#pragma unroll
    for (int s = 0; s < S; ++s) {
      float w[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) DequantOctet<F>(cur[r], s, sc[r], w[r]);
#pragma unroll
      for (int i = 0; i < M; ++i) {
        float xv[8];
        XOctetToFloats(x_s[((it * S + s) * M + i) * 32 + lane], xv);
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][i] = fmaf(w[r][e], xv[e], acc[r][i]);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) cur[r] = nxt[r];
    it = next;
    have = have_next;
  }
}

// Warp-shuffle reduction of acc, then lane 0 stores it to red_s[warp][r][i].
template <int M, int kRows = gemv::kRows>
__device__ __forceinline__ void WarpReduceToShared(float (&acc)[kRows][M], float* red_s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < M; ++i) {
      float v = acc[r][i];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) red_s[(warp * kRows + r) * kMaxTokens + i] = v;
    }
}

// The block's total for (row group g, row r, token i): the slices summed in order.
template <int kRows = gemv::kRows>
__device__ __forceinline__ float SliceSum(const float* red_s, const Split& split, int g, int r, int i) {
  float v = 0.f;
  for (int j = 0; j < split.slices; ++j) v += red_s[((g * split.slices + j) * kRows + r) * kMaxTokens + i];
  return v;
}

// Runs `body.template operator()<M>()` with the smallest M in {1, 2, 4, 8,
// 16} that holds `count` tokens (count in 1..kMaxTokens).
template <typename Body>
__device__ __forceinline__ void DispatchTokens(int count, Body&& body) {
  if (count <= 1) body(std::integral_constant<int, 1>{});
  else if (count <= 2) body(std::integral_constant<int, 2>{});
  else if (count <= 4) body(std::integral_constant<int, 4>{});
  else if (count <= 8) body(std::integral_constant<int, 8>{});
  else body(std::integral_constant<int, 16>{});
}

}  // namespace grove::kernels::gemv
