// Shared by the sm_90a GroupedWeightGrad kernels (kWgmma*, kTma*): one
// stage's wgmma batch over [kStepT t][64] MN-major SW128 sub-tiles, and the
// store of a warpgroup's m64 x kTileN accumulator into G.
#pragma once

#include <cstdint>

#include "kernels/grouped_gemm_store.cuh"
#include "kernels/grouped_weight_grad_tile.cuh"
#include "kernels/ptx/wgmma.cuh"

namespace grove::kernels::detail {

// acc (+)= A^T B over kStepT rows of t: a_tile holds this warpgroup's 64 G
// rows as one [kStepT][64] sub-tile, b_tile kTileN / 64 sub-tiles
// `sub_bytes` apart (the descriptors' leading byte offset). Fences before,
// commits the batch after; the caller waits for it.
template <int kTileN, int kStepT>
__device__ __forceinline__ void WeightGradWgmmaBatch(float (&acc)[kTileN / 2],
                                                     const __nv_bfloat16* a_tile,
                                                     const __nv_bfloat16* b_tile,
                                                     uint32_t sub_bytes) {
  ptx::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kStepT / 16; ++kk) {
    // 16 rows of t = two 8-row swizzle atoms = 2048 bytes further.
    const uint64_t desc_a = ptx::make_wgmma_desc_mn_sw128(a_tile + kk * 16 * 64, sub_bytes);
    const uint64_t desc_b = ptx::make_wgmma_desc_mn_sw128(b_tile + kk * 16 * 64, sub_bytes);
    if constexpr (kTileN == 256) {
      ptx::wgmma_m64n256k16_f32_bf16_ss_mn(acc, desc_a, desc_b, 1);
    } else {
      ptx::wgmma_m64n128k16_f32_bf16_ss_mn(acc, desc_a, desc_b, 1);
    }
  }
  ptx::wgmma_commit_group();
}

// G rows row0 .. row0 + 63 (this warpgroup's), columns w.col0 .. + kTileN,
// (+)= acc, clipped to n x k. Accumulator register i of thread (warp w of
// the warpgroup, lane l): row 16 w + l / 4 + 8 ((i / 2) % 2), column
// 8 (i / 4) + 2 (l % 4) + i % 2; registers i, i + 1 (i even) are adjacent
// columns of one row, in the tile's 128-column block i / 64.
// write_pair(g, x, y, i) for each in-bounds pair (g: its first element in G).
template <int kTileN, typename WritePair>
__device__ __forceinline__ void ForEachWeightGradPair(const float (&acc)[kTileN / 2],
                                                      const WeightGradParams& p,
                                                      const WeightGradTile& w, int row0,
                                                      WritePair write_pair) {
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kTileN / 2; i += 2) {
    const int row = row0 + 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
    const int col = w.col0 + 8 * (i / 4) + 2 * (lane % 4);
    if (row < p.n && col < p.k)
      write_pair(w.g + static_cast<int64_t>(row) * p.k + col, acc[i], acc[i + 1], i);
  }
}

// Stores (or load-adds) a warpgroup's accumulator as ForEachWeightGradPair
// walks it and, with p.sum_sq, writes its warps' sum_sq slots: warp w of
// the warpgroup at rows row0.. is the tile's storing warp 4 (row0 - w.row0)
// / 64 + w of each 128-column block.
template <int kTileN>
__device__ __forceinline__ void StoreWeightGradAccumulator(const float (&acc)[kTileN / 2],
                                                           const WeightGradParams& p,
                                                           const WeightGradTile& w, int row0) {
  constexpr int kBlocks = kTileN / kSquareBlock;
  float sq[kBlocks];
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) sq[b] = 0.f;
  ForEachWeightGradPair<kTileN>(acc, p, w, row0, [&](float* g, float x, float y, int i) {
    const float2 v = StoreOrAddPair(g, x, y, p.accumulate);
    sq[i / 64] = fmaf(v.y, v.y, fmaf(v.x, v.x, sq[i / 64]));
  });
  if (p.sum_sq == nullptr) return;
  const int warp = (row0 - w.row0) / 64 * 4 + (threadIdx.x / 32) % 4;
#pragma unroll
  for (int b = 0; b < kBlocks; ++b)
    if (w.col0 / kSquareBlock + b < p.sq_col_blocks)
      WriteSquareSlot(p.sum_sq + w.square_slot0 + b * kSquareSlotsPerBlock + warp, sq[b]);
}

}  // namespace grove::kernels::detail
