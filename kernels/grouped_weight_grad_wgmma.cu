// WeightGradImpl::kWgmma / kWgmmaN256: G_e (+)= dY_e^T X_e with wgmma (sm_90a).
//
// Same grid as the mma.sync kernel (blockIdx.y = expert, blockIdx.x =
// (output, row block, column block)); a CTA is two warpgroups, warpgroup w
// owns G rows 64 w .. 64 w + 63 of the CTA's 128 x kTileN tile as one
// m64n{kTileN}k16 accumulator.
//
// Both operands lie in memory with the reduction dim t as their row, which
// is wgmma's MN-major form (imm-trans-a/b = 1): A = dY^T is [t][m], B = X is
// [t][n]. Every thread copies with cp.async (zero-filling rows past the
// expert's end and columns past n / k) into 128-byte-swizzled [64 t][64]
// sub-tiles (8 KB, 1024-byte aligned: chunk c of row r at c ^ (r % 8)),
// exactly the MN-major SW128 canonical layout, so the descriptors point at
// them directly: 8-row atoms 1024 bytes apart along t, 64-wide sub-tiles
// 8 KB apart along m / n. Ring of kStages stages of 64 rows; stage s + 2 is
// copied while the wgmma batch of stage s runs (lookahead kStages - 2: its
// buffer last fed batch s - 2, which every warpgroup has waited for before
// the barrier at the top of iteration s).
//
// cp.async writes through the generic proxy and wgmma reads through the
// async proxy: each thread fences (fence.proxy.async) after its copies land
// and before the barrier that precedes the wgmmas.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/grouped_gemm_internal.h"
#include "kernels/grouped_gemm_store.cuh"
#include "kernels/grouped_weight_grad_internal.h"
#include "kernels/grouped_weight_grad_tile.cuh"
#include "kernels/grouped_weight_grad_wgmma.cuh"
#include "kernels/ptx/cp_async.cuh"
#include "kernels/ptx/tma.cuh"
#include "kernels/ptx/wgmma.cuh"

namespace grove::kernels::detail {
namespace {

constexpr int kThreads = 256;  // two consumer warpgroups, no producer
constexpr int kTileM = 128;    // G rows per CTA (dY columns)
constexpr int kStepT = 64;     // reduction rows per stage
constexpr int kStages = 4;
constexpr int kSubElems = kStepT * 64;  // one [64 t][64] swizzled sub-tile

template <int kTileN>
struct Tiling {
  static constexpr int kDyElems = (kTileM / 64) * kSubElems;
  static constexpr int kXElems = (kTileN / 64) * kSubElems;
  static constexpr int kStageElems = kDyElems + kXElems;
  static constexpr int kSmemBytes = kStages * kStageElems * 2 + 1024;  // + alignment slack
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// Copies rows t0 .. t0 + 63, columns col0 .. col0 + 64 * kSubs - 1 of the
// row-major [*, ld] `src` into kSubs consecutive swizzled sub-tiles at
// `dst`; rows >= row_end and columns >= ld are zero-filled (ld % 8 == 0).
template <int kSubs>
__device__ __forceinline__ void LoadSubTiles(__nv_bfloat16* dst, const __nv_bfloat16* src, int t0,
                                             int row_end, int ld, int col0) {
  constexpr int kChunksPerRow = kSubs * 8;
  static_assert((kStepT * kChunksPerRow) % kThreads == 0, "whole copy rounds");
#pragma unroll
  for (int i = 0; i < kStepT * kChunksPerRow / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int row = idx / kChunksPerRow, cc = idx % kChunksPerRow;
    const int sub = cc / 8, c = cc % 8;
    const int grow = t0 + row, gcol = col0 + cc * 8;
    const bool valid = grow < row_end && gcol < ld;
    const __nv_bfloat16* g = valid ? src + static_cast<int64_t>(grow) * ld + gcol : src;
    ptx::cp_async_cg_16_zfill(dst + sub * kSubElems + row * 64 + ((c ^ (row & 7)) * 8), g,
                              valid ? 16 : 0);
  }
}

template <int kTileN>
__global__ void __launch_bounds__(kThreads, 1)
    WeightGradWgmmaKernel(const WeightGradParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = Tiling<kTileN>;
  constexpr int kLookahead = kStages - 2;
  constexpr uint32_t kSubBytes = kSubElems * 2;  // leading byte offset: next 64 m / n
  extern __shared__ uint8_t smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});

  const WeightGradTile w = LocateWeightGradTile(p, kTileM, kTileN);
  const int n = p.n, k = p.k, m0 = w.row0, c0 = w.col0, begin = w.begin, end = w.end;
  if (end == begin && p.accumulate) return;  // G_e stays as it is
  const int steps = (end - begin + kStepT - 1) / kStepT;

  auto load_stage = [&](int s) {
    __nv_bfloat16* st = smem + (s % kStages) * T::kStageElems;
    const int t0 = begin + s * kStepT;
    LoadSubTiles<kTileM / 64>(st, w.dy, t0, end, n, m0);
    LoadSubTiles<kTileN / 64>(st + T::kDyElems, p.x, t0, end, k, c0);
  };
#pragma unroll
  for (int s = 0; s < kLookahead; ++s) {
    if (s < steps) load_stage(s);
    ptx::cp_async_commit_group();
  }

  const int wg = threadIdx.x / 128;
  float acc[kTileN / 2];
#pragma unroll
  for (int i = 0; i < kTileN / 2; ++i) acc[i] = 0.f;

  for (int s = 0; s < steps; ++s) {
    ptx::cp_async_wait_group<kLookahead - 1>();  // this thread's copies of stage s landed
    ptx::fence_proxy_async_shared_cta();          // ... and are visible to wgmma
    __syncthreads();  // everyone's copies landed; batch s - 2 is done in both warpgroups
    if (s + kLookahead < steps) load_stage(s + kLookahead);
    ptx::cp_async_commit_group();

    const __nv_bfloat16* st = smem + (s % kStages) * T::kStageElems;
    const __nv_bfloat16* a_tile = st + wg * kSubElems;  // this warpgroup's 64 G rows
    const __nv_bfloat16* b_tile = st + T::kDyElems;
    WeightGradWgmmaBatch<kTileN, kStepT>(acc, a_tile, b_tile, kSubBytes);
    ptx::wgmma_wait_group<1>();  // batch s - 1 done: its stage may be refilled next iteration
  }
  ptx::wgmma_wait_group<0>();
  ptx::cp_async_wait_all();

  StoreWeightGradAccumulator<kTileN>(acc, p, w, m0 + wg * 64);
#else
  __trap();  // built for a device without wgmma; the host never launches this
#endif
}

template <int kTileN>
Status Launch(const GroupedWeightGradArgs& args, cudaStream_t stream) {
  using T = Tiling<kTileN>;
  auto kernel = WeightGradWgmmaKernel<kTileN>;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes),
      "GroupedWeightGrad wgmma: shared memory attribute"));
  dim3 grid;
  WeightGradParams params;
  GROVE_RETURN_IF_ERROR(MakeWeightGradLaunch(args, kTileM, kTileN, &grid, &params));
  kernel<<<grid, kThreads, T::kSmemBytes, stream>>>(params);
  return CudaStatus(cudaGetLastError(), "GroupedWeightGrad wgmma launch");
}

}  // namespace

Status LaunchWeightGradWgmma(const GroupedWeightGradArgs& args, int tile_cols,
                             cudaStream_t stream) {
  if (tile_cols == 256) return Launch<256>(args, stream);
  if (tile_cols == 128) return Launch<128>(args, stream);
  return Status::Internal("GroupedWeightGrad wgmma: tile_cols must be 128 or 256");
}

}  // namespace grove::kernels::detail
