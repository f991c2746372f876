// The experts' weight gradients as one grouped launch (a ragged reduction):
// for every expert e, whose rows are offsets[e] .. offsets[e+1]-1,
//   G_e[j, i] (+)= sum over those rows t of dY[t, j] * X[t, i]
// i.e. G_e = dY_e^T X_e, the gradient of a Linear y = x W^T with W [n, k].
// dY [total_rows, n] and X [total_rows, k] are bf16 row-major, grouped by
// expert as the forward's permuted rows; G_e is fp32 row-major [n, k] at
// g + e * g_expert_stride. Products are exact in fp32, sums fp32.
// All pointers are device pointers; the call only enqueues work on `stream`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

// Which implementation runs. All: a plain grid over (expert, output, G
// tile) reducing over the expert's rows; rows past the expert's end never
// enter its sums. kAuto: kTmaPersistentN256 on sm_90 (the fastest measured
// on an H100: bench/kernels --dw), else kMmaSync.
enum class WeightGradImpl {
  kAuto,
  kMmaSync,    // sm_80+: 128 x 128 G tiles, 32 rows per stage, ldmatrix.trans + mma.sync
  kWgmma,      // sm_90a: 128 x 128 G tiles, 64 rows per stage, wgmma m64n128k16
               //   with both operands MN-major (as they lie in memory)
  kWgmmaN256,  // sm_90a: 128 x 256 G tiles, wgmma m64n256k16
  kTma,        // sm_90a: 128 x 256 G tiles, a TMA producer warpgroup feeding two
               //   wgmma consumer warpgroups through mbarriers (4 stages)
  kTmaN128,    // sm_90a: as kTma with 128 x 128 tiles, 3 stages, 2 CTAs per SM
  // sm_90a: the TMA pipelines in a persistent grid walking one tile queue,
  // longest experts first, G += by red.global.add (same bits as kTma / kTmaN128):
  kTmaPersistentRed,   // kTmaN128's tiling (128 x 128, 2 CTAs per SM)
  kTmaPersistentN256,  // kTma's tiling (128 x 256, 1 CTA per SM)
};

const char* WeightGradImplName(WeightGradImpl impl);

struct GroupedWeightGradArgs {
  const __nv_bfloat16* dy = nullptr;        // [total_rows, n] row-major
  const __nv_bfloat16* x = nullptr;         // [total_rows, k] row-major
  const int32_t* expert_offsets = nullptr;  // device, [num_experts + 1]
  int total_rows = 0;
  int num_experts = 0;
  int n = 0;  // rows of each G_e (multiple of 8)
  int k = 0;  // columns of each G_e (multiple of 8)
  float* g = nullptr;            // G_0; G_e = g + e * g_expert_stride
  int64_t g_expert_stride = 0;   // elements between experts' G (multiple of 4, >= n * k)
  // Optional second output sharing X (w1 and w3 share the expert input):
  // G2_e (+)= dY2_e^T X_e with dY2 shaped like dY and G2_e = g2 + e * stride.
  // Computed in the same launch; both or neither.
  const __nv_bfloat16* dy2 = nullptr;
  float* g2 = nullptr;
  // true: G (+)= ...; an expert with no rows leaves its G untouched.
  // false: G = ...; an expert with no rows gets G = 0.
  bool accumulate = true;
  // Optional (device, GroupedWeightGradSquareSlots(args) doubles): the sum
  // of the squares of what the launch leaves in G (and G2), so that a
  // gradient norm needs no second pass over them. Slot
  //   (((e * outputs + o) * row_blocks + rb) * col_blocks + cb) * 8 + w
  // (outputs 1 or 2, blocks of 128 x 128 elements of one G_e, w a warp of
  // the eight that store the block) holds that warp's share; the eight of a
  // block sum to the block's sum of squares. Squares and each thread's sums
  // (at most 64 values) in fp32, the warp's sum in double: within ~4e-6
  // relative of the exact sum; an element beyond ~1.8e19 makes it Inf. A
  // launch writes the slots of the blocks it writes; with accumulate, an
  // expert with no rows writes neither (its slots keep what they held, so a
  // buffer that described G before the launch still does). The persistent
  // TMA implementation then adds to G by load, add, store instead of
  // red.global.add (it must see the new values): the same bits, slower.
  double* sum_sq = nullptr;
};

// Slots GroupedWeightGradArgs::sum_sq needs for `args` (0 for bad shapes).
int64_t GroupedWeightGradSquareSlots(const GroupedWeightGradArgs& args);

// Contract on expert_offsets (read on the device, so not checked here):
// offsets[0] >= 0, non-decreasing, offsets[num_experts] <= total_rows. A
// violation cannot make the kernel read outside dY/X (rows are clamped to
// [0, total_rows)) but the sums are then undefined.
// Returns InvalidArgument for bad shapes, null or misaligned pointers (16
// bytes for dY, X, G; g_expert_stride % 4 == 0), FailedPrecondition when
// `impl` cannot run on this GPU (mma.sync: sm_80+; wgmma: sm_90 only),
// Internal for a CUDA launch error. total_rows == 0 with accumulate enqueues
// nothing; with overwrite it zeroes every G_e.
Status GroupedWeightGrad(const GroupedWeightGradArgs& args, cudaStream_t stream,
                         WeightGradImpl impl = WeightGradImpl::kAuto);

}  // namespace grove::kernels
