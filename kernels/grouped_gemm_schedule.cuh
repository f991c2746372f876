// Tile schedule of the grouped GEMM, shared by every implementation: the
// output tiles of all experts are numbered expert by expert, and within an
// expert row-block by row-block, the n-blocks of one row-block adjacent (so
// CTAs running at the same time share A rows and W[e] in L2). A persistent
// CTA takes tiles blockIdx.x, blockIdx.x + gridDim.x, ...
#pragma once

#include <cstdint>

#include "kernels/grouped_gemm.h"

namespace grove::kernels::detail {

// Largest expert count the schedule's shared-memory table holds.
inline constexpr int kMaxExperts = kGroupedGemmMaxExperts;

// Fills tile_prefix[0..num_experts] (shared memory) with the first tile
// number of each expert; tile_prefix[num_experts] is the total. Called by
// one whole warp; the caller synchronizes before reading the table.
__device__ __forceinline__ void BuildTilePrefix(const int32_t* __restrict__ offsets,
                                                int num_experts, int total_rows, int block_m,
                                                int n_tiles, int* tile_prefix) {
  const int lane = threadIdx.x % 32;
  int carry = 0;
  if (lane == 0) tile_prefix[0] = 0;
  for (int base = 0; base < num_experts; base += 32) {
    const int e = base + lane;
    int tiles = 0;
    if (e < num_experts) {
      const int begin = min(max(offsets[e], 0), total_rows);
      const int end = min(max(offsets[e + 1], begin), total_rows);
      tiles = (end - begin + block_m - 1) / block_m * n_tiles;
    }
    int incl = tiles;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += up;
    }
    if (e < num_experts) tile_prefix[e + 1] = carry + incl;
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
}

// Where one output tile lies.
struct TileCoord {
  int expert;
  int row_begin;  // first row of A/C of this tile
  int rows;       // rows of the tile that belong to the expert (1..block_m)
  int col_begin;  // first column of C (n) of this tile
};

// Maps tile number `tile` (< tile_prefix[num_experts]) to its coordinates.
// `expert_hint` carries the last expert found between calls: tiles of a CTA
// only increase, so the search moves forward only. rows_fastest: within an
// expert the row blocks of one n-block are adjacent instead (column by
// column), for a W[e] much larger than the expert's rows of A (the LM
// head: 64 MB of W against 8 MB of A a chunk), so that the CTAs running at
// once share W tiles and A stays in L2, instead of W streaming from memory
// once per row block.
__device__ __forceinline__ TileCoord LocateTile(int tile, const int* tile_prefix,
                                                const int32_t* __restrict__ offsets,
                                                int total_rows, int block_m, int block_n,
                                                int n_tiles, int& expert_hint,
                                                bool rows_fastest = false) {
  int e = expert_hint;
  while (tile_prefix[e + 1] <= tile) ++e;
  expert_hint = e;
  const int local = tile - tile_prefix[e];
  const int begin = min(max(offsets[e], 0), total_rows);
  const int end = min(max(offsets[e + 1], begin), total_rows);
  int m_block, n_block;
  if (rows_fastest) {
    const int m_blocks = (end - begin + block_m - 1) / block_m;
    n_block = local / m_blocks;
    m_block = local - n_block * m_blocks;
  } else {
    m_block = local / n_tiles;
    n_block = local - m_block * n_tiles;
  }
  TileCoord t;
  t.expert = e;
  t.row_begin = begin + m_block * block_m;
  t.rows = min(block_m, end - t.row_begin);
  t.col_begin = n_block * block_n;
  return t;
}

}  // namespace grove::kernels::detail
