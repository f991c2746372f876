// Shared by the GroupedWeightGrad kernels: their launch parameters, the grid
// (blockIdx.y = expert, blockIdx.x = (output, G row block, G column block),
// the tiles of one expert adjacent) and where a CTA's tile lies.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"
#include "kernels/grouped_weight_grad.h"

namespace grove::kernels::detail {

struct WeightGradParams {
  const __nv_bfloat16* dy;
  const __nv_bfloat16* dy2;
  const __nv_bfloat16* x;
  const int32_t* offsets;
  int total_rows, n, k;
  float* g;
  float* g2;
  int64_t g_stride;
  int tiles_per_output;  // G tiles of one expert's one output
  int col_tiles;         // G column blocks
  bool accumulate;
  // GroupedWeightGradArgs::sum_sq (null: none) and its 128 x 128 block grid.
  double* sum_sq;
  int outputs, sq_row_blocks, sq_col_blocks;
};

constexpr int kSquareBlock = 128;        // sum_sq's blocks of G: 128 x 128 elements
constexpr int kSquareSlotsPerBlock = 8;  // one per storing warp

// One CTA's work: G rows row0.., columns col0.. of one output of one expert,
// summed over that expert's rows begin .. end - 1 (clamped to [0, total_rows)).
struct WeightGradTile {
  const __nv_bfloat16* dy;  // this output's dY
  float* g;                 // this output's G of this expert
  int row0, col0;
  int begin, end;
  int64_t square_slot0;  // sum_sq slot of (this tile's first 128 x 128 block, warp 0)
};

// `expert_tile`: the tile's index among the expert's tiles of every output
// (blockIdx.x of the plain grid).
__device__ __forceinline__ WeightGradTile LocateWeightGradTileAt(const WeightGradParams& p,
                                                                 int expert, int expert_tile,
                                                                 int tile_rows, int tile_cols) {
  const int output = expert_tile / p.tiles_per_output;
  const int tile = expert_tile - output * p.tiles_per_output;
  WeightGradTile t;
  t.dy = output == 0 ? p.dy : p.dy2;
  t.g = (output == 0 ? p.g : p.g2) + expert * p.g_stride;
  t.row0 = (tile / p.col_tiles) * tile_rows;
  t.col0 = (tile % p.col_tiles) * tile_cols;
  t.begin = min(max(p.offsets[expert], 0), p.total_rows);
  t.end = min(max(p.offsets[expert + 1], t.begin), p.total_rows);
  t.square_slot0 = ((static_cast<int64_t>(expert * p.outputs + output) * p.sq_row_blocks +
                     t.row0 / kSquareBlock) * p.sq_col_blocks + t.col0 / kSquareBlock) *
                   kSquareSlotsPerBlock;
  return t;
}

// The plain grid's tile: blockIdx.y = expert, blockIdx.x = its tile.
__device__ __forceinline__ WeightGradTile LocateWeightGradTile(const WeightGradParams& p,
                                                               int tile_rows, int tile_cols) {
  return LocateWeightGradTileAt(p, blockIdx.y, blockIdx.x, tile_rows, tile_cols);
}

// The grid and parameters for G tiles of tile_rows x tile_cols.
inline Status MakeWeightGradLaunch(const GroupedWeightGradArgs& a, int tile_rows, int tile_cols,
                                   dim3* grid, WeightGradParams* p) {
  const int row_tiles = (a.n + tile_rows - 1) / tile_rows;
  const int col_tiles = (a.k + tile_cols - 1) / tile_cols;
  const int64_t tiles_per_output = static_cast<int64_t>(row_tiles) * col_tiles;
  const int outputs = a.g2 != nullptr ? 2 : 1;
  if (tiles_per_output * outputs > INT32_MAX)
    return Status::InvalidArgument("GroupedWeightGrad: n x k too large for one grid");
  *grid = dim3(static_cast<unsigned>(tiles_per_output * outputs),
               static_cast<unsigned>(a.num_experts));
  *p = WeightGradParams{a.dy, a.dy2, a.x, a.expert_offsets, a.total_rows, a.n, a.k, a.g, a.g2,
                        a.g_expert_stride, static_cast<int>(tiles_per_output), col_tiles,
                        a.accumulate, a.sum_sq, outputs, (a.n + kSquareBlock - 1) / kSquareBlock,
                        (a.k + kSquareBlock - 1) / kSquareBlock};
  return Status::OK();
}

// A warp's share of one block's sum of squares into its sum_sq slot (lane
// 0 writes; every lane of the warp calls, with its own partial sum).
__device__ __forceinline__ void WriteSquareSlot(double* slot, float partial) {
  double v = partial;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) *slot = v;
}

}  // namespace grove::kernels::detail
