// GroupedWeightGrad: G_e (+)= dY_e^T X_e for all experts in one launch.
//
// Plain grid: blockIdx.y = expert, blockIdx.x = (output, n-block, k-block)
// with the tiles of one expert adjacent, so CTAs resident together read the
// same expert's rows (L2 hits). Each CTA of 8 warps owns one 128 x 128 tile
// of G_e and reduces over the expert's rows in steps of 32 through a
// kStages-deep cp.async ring. A plain grid (4096 CTAs at gpu-ref's shapes,
// ~16 per resident slot) lets the hardware balance ragged experts; an empty
// expert's CTAs exit at once (accumulate) or store zeros (overwrite).
//
// Both operands have the reduction dim t as their row, so tiles are copied
// as they lie ([32 t][128 cols], 256-byte rows = 16 chunks of 16 bytes,
// chunk c of row r stored at c ^ (r % 8): the 8 row addresses of one
// ldmatrix hit 8 different bank groups) and ldmatrix.trans forms the
// mma.sync fragments: transposing a stored [t][n] 8 x 8 block gives the
// A fragment's (row n, k = t pair), and a stored [t][k] block the B
// fragment's (k = t pair, column k). Warp (wn, wk) of the 2 x 4 warp grid
// computes G rows 64*wn..+63 and columns 32*wk..+31: 4 x 4 mma.sync
// m16n8k16 per 16 rows of t.
#include "kernels/grouped_weight_grad.h"

#include <cuda_bf16.h>

#include <cstdint>
#include <string>

#include "kernels/grouped_gemm_internal.h"
#include "kernels/grouped_gemm_store.cuh"
#include "kernels/grouped_weight_grad_internal.h"
#include "kernels/grouped_weight_grad_tile.cuh"
#include "kernels/ptx/cp_async.cuh"
#include "kernels/ptx/ldmatrix.cuh"
#include "kernels/ptx/mma.cuh"

namespace grove::kernels {
namespace {

constexpr int kTileN = 128;   // rows of G per CTA (columns of dY)
constexpr int kTileK = 128;   // columns of G per CTA (columns of X)
constexpr int kStepT = 32;    // rows of the reduction per ring stage
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kChunksPerRow = kTileN / 8;  // 16-byte chunks of one smem row (kTileN == kTileK)
constexpr int kOperandElems = kStepT * kTileN;
constexpr int kStageElems = 2 * kOperandElems;  // dY tile, then X tile
constexpr int kSmemBytes = kStages * kStageElems * 2;
static_assert(kTileN == kTileK, "both operand tiles share one smem row shape");
static_assert(kStepT % 16 == 0 && (kStepT * kChunksPerRow) % kThreads == 0, "whole copy rounds");

__device__ __forceinline__ int Swizzled(int row, int chunk) {
  return row * kTileN + ((chunk ^ (row & 7)) * 8);
}

// Copies rows t0 .. t0 + kStepT - 1, columns col0 .. col0 + 127 of the
// row-major [*, ld] `src` into the swizzled `dst`; rows >= row_end and
// columns >= ld are zero-filled (ld % 8 == 0: chunks are whole).
__device__ __forceinline__ void LoadTile(__nv_bfloat16* dst, const __nv_bfloat16* src, int t0,
                                         int row_end, int ld, int col0) {
#pragma unroll
  for (int i = 0; i < kStepT * kChunksPerRow / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
    const int grow = t0 + row, gcol = col0 + chunk * 8;
    const bool valid = grow < row_end && gcol < ld;
    const __nv_bfloat16* g = valid ? src + static_cast<int64_t>(grow) * ld + gcol : src;
    ptx::cp_async_cg_16_zfill(dst + Swizzled(row, chunk), g, valid ? 16 : 0);
  }
}

__global__ void __launch_bounds__(kThreads, 2)
    GroupedWeightGradKernel(const detail::WeightGradParams p) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);

  const detail::WeightGradTile w = detail::LocateWeightGradTile(p, kTileN, kTileK);
  const int n = p.n, k = p.k, n0 = w.row0, k0 = w.col0, begin = w.begin, end = w.end;
  if (end == begin && p.accumulate) return;  // G_e stays as it is
  const int steps = (end - begin + kStepT - 1) / kStepT;

  auto load_stage = [&](int s) {
    __nv_bfloat16* st = smem + (s % kStages) * kStageElems;
    const int t0 = begin + s * kStepT;
    LoadTile(st, w.dy, t0, end, n, n0);
    LoadTile(st + kOperandElems, p.x, t0, end, k, k0);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_stage(s);
    ptx::cp_async_commit_group();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wn = warp / 4, wk = warp % 4;
  const int mat = lane / 8, mrow = lane % 8;  // which 8 x 8 block this lane addresses, and its row

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  for (int s = 0; s < steps; ++s) {
    ptx::cp_async_wait_group<kStages - 2>();
    __syncthreads();  // stage s landed for everyone; stage s-1 is free
    if (s + kStages - 1 < steps) load_stage(s + kStages - 1);
    ptx::cp_async_commit_group();

    const __nv_bfloat16* sdy = smem + (s % kStages) * kStageElems;
    const __nv_bfloat16* sx = sdy + kOperandElems;
#pragma unroll
    for (int kk = 0; kk < kStepT / 16; ++kk) {
      uint32_t af[4][4], bf[4][2];
      // A = dY^T (16 n x 16 t): blocks (t 0-7, n 0-7), (t 0-7, n 8-15),
      // (t 8-15, n 0-7), (t 8-15, n 8-15) -> a[0..3].
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = kk * 16 + mrow + (mat / 2) * 8;
        const int chunk = (wn * 64 + i * 16) / 8 + (mat % 2);
        ptx::ldmatrix_x4_trans(af[i][0], af[i][1], af[i][2], af[i][3], sdy + Swizzled(t, chunk));
      }
      // B = X (16 t x 8 k, two 8-column groups per load): blocks
      // (t 0-7, k 0-7), (t 8-15, k 0-7), (t 0-7, k 8-15), (t 8-15, k 8-15)
      // -> b[2j][0], b[2j][1], b[2j+1][0], b[2j+1][1].
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = kk * 16 + mrow + (mat % 2) * 8;
        const int chunk = (wk * 32 + j * 16) / 8 + (mat / 2);
        ptx::ldmatrix_x4_trans(bf[2 * j][0], bf[2 * j][1], bf[2 * j + 1][0], bf[2 * j + 1][1],
                               sx + Swizzled(t, chunk));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) ptx::mma_m16n8k16_bf16_f32(acc[i][j], af[i], bf[j]);
    }
  }
  ptx::cp_async_wait_all();

  // Accumulator (i, j): rows n0 + 64 wn + 16 i + lane/4 (+8), columns
  // k0 + 32 wk + 8 j + 2 (lane % 4) (+1). Each (row, column pair) belongs to
  // exactly one thread of the grid, so the read-modify-write needs no atomics.
  // The tile is one sum_sq block; warp w its storing warp w.
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = n0 + wn * 64 + i * 16 + lane / 4 + 8 * h;
      if (row >= n) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = k0 + wk * 32 + j * 8 + 2 * (lane % 4);
        if (col >= k) continue;
        const float2 v = detail::StoreOrAddPair(w.g + static_cast<int64_t>(row) * k + col,
                                                acc[i][j][2 * h], acc[i][j][2 * h + 1], p.accumulate);
        sq = fmaf(v.y, v.y, fmaf(v.x, v.x, sq));
      }
    }
  }
  if (p.sum_sq != nullptr) detail::WriteSquareSlot(p.sum_sq + w.square_slot0 + warp, sq);
}

Status CheckArgs(const GroupedWeightGradArgs& a) {
  const std::string where = "GroupedWeightGrad: ";
  if (a.num_experts <= 0 || a.num_experts > 65535)
    return Status::InvalidArgument(where + "num_experts must be in 1..65535, got " +
                                   std::to_string(a.num_experts));
  if (a.total_rows < 0) return Status::InvalidArgument(where + "total_rows < 0");
  if (a.n <= 0 || a.k <= 0 || a.n % 8 != 0 || a.k % 8 != 0)
    return Status::InvalidArgument(where + "n and k must be positive multiples of 8, got n=" +
                                   std::to_string(a.n) + " k=" + std::to_string(a.k));
  if (a.expert_offsets == nullptr || a.g == nullptr)
    return Status::InvalidArgument(where + "null offsets or gradient");
  if (a.total_rows > 0 && (a.dy == nullptr || a.x == nullptr))
    return Status::InvalidArgument(where + "null dY or X");
  if ((a.dy2 == nullptr) != (a.g2 == nullptr))
    return Status::InvalidArgument(where + "dy2 and g2 come together (both or neither)");
  if (a.g2 != nullptr && a.total_rows > 0 && a.dy2 == nullptr)
    return Status::InvalidArgument(where + "null dY2");
  if (a.g_expert_stride % 4 != 0)
    return Status::InvalidArgument(where + "g_expert_stride must be a multiple of 4");
  if (a.num_experts > 1 && a.g_expert_stride < static_cast<int64_t>(a.n) * a.k)
    return Status::InvalidArgument(where + "g_expert_stride " + std::to_string(a.g_expert_stride) +
                                   " < n * k: experts' gradients would overlap");
  if (a.sum_sq != nullptr && reinterpret_cast<uintptr_t>(a.sum_sq) % 8 != 0)
    return Status::InvalidArgument(where + "sum_sq must be 8-byte aligned");
  auto misaligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; };
  if (misaligned(a.dy) || misaligned(a.x) || misaligned(a.g) || misaligned(a.dy2) ||
      misaligned(a.g2))
    return Status::InvalidArgument(where + "dY, X, G (and dY2, G2) must be 16-byte aligned");
  return Status::OK();
}

}  // namespace

int64_t GroupedWeightGradSquareSlots(const GroupedWeightGradArgs& a) {
  if (a.num_experts <= 0 || a.n <= 0 || a.k <= 0) return 0;
  const int64_t blocks = int64_t{(a.n + detail::kSquareBlock - 1) / detail::kSquareBlock} *
                         ((a.k + detail::kSquareBlock - 1) / detail::kSquareBlock);
  return int64_t{a.num_experts} * (a.g2 != nullptr ? 2 : 1) * blocks * detail::kSquareSlotsPerBlock;
}

const char* WeightGradImplName(WeightGradImpl impl) {
  switch (impl) {
    case WeightGradImpl::kAuto: return "auto";
    case WeightGradImpl::kMmaSync: return "mma_sync";
    case WeightGradImpl::kWgmma: return "wgmma";
    case WeightGradImpl::kWgmmaN256: return "wgmma_n256";
    case WeightGradImpl::kTma: return "tma";
    case WeightGradImpl::kTmaN128: return "tma_n128";
    case WeightGradImpl::kTmaPersistentRed: return "tma_persistent_red";
    case WeightGradImpl::kTmaPersistentN256: return "tma_persistent_n256";
  }
  return "unknown";
}

Status GroupedWeightGrad(const GroupedWeightGradArgs& args, cudaStream_t stream,
                         WeightGradImpl impl) {
  GROVE_RETURN_IF_ERROR(CheckArgs(args));
  if (args.total_rows == 0 && args.accumulate) return Status::OK();  // every expert is empty
  int dev = 0, cc_major = 0, cc_minor = 0;
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(cudaGetDevice(&dev), "GroupedWeightGrad: device"));
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(
      cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev),
      "GroupedWeightGrad: compute capability"));
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(
      cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, dev),
      "GroupedWeightGrad: compute capability"));
  // kAuto: the fastest measured where it runs (H100, kernel_bench --dw, one
  // gpu-ref layer: tma_persistent_n256 1.37x tma_n128 on both w2 and w1+w3,
  // 2.15x / 1.45x the per-expert cuBLAS loop; docs/kernels.md).
  if (impl == WeightGradImpl::kAuto)
    impl = cc_major == 9 && cc_minor == 0 ? WeightGradImpl::kTmaPersistentN256
                                          : WeightGradImpl::kMmaSync;
  if (impl == WeightGradImpl::kTma || impl == WeightGradImpl::kTmaN128 ||
      impl == WeightGradImpl::kTmaPersistentRed || impl == WeightGradImpl::kTmaPersistentN256) {
    // No rows: nothing for a tensor map to describe; the mma.sync kernel
    // zeroes every G (overwrite) without reading dY or X.
    if (args.total_rows == 0) {
      impl = WeightGradImpl::kMmaSync;
    } else {
      if (cc_major != 9 || cc_minor != 0)
        return Status::FailedPrecondition("GroupedWeightGrad: the tma path needs an sm_90 GPU");
      return detail::LaunchWeightGradTma(args, impl, stream);
    }
  }
  if (impl == WeightGradImpl::kWgmma || impl == WeightGradImpl::kWgmmaN256) {
    // sm_90a machine code runs on compute capability 9.0 only.
    if (cc_major != 9 || cc_minor != 0)
      return Status::FailedPrecondition("GroupedWeightGrad: the wgmma path needs an sm_90 GPU");
    return detail::LaunchWeightGradWgmma(args, impl == WeightGradImpl::kWgmmaN256 ? 256 : 128,
                                         stream);
  }
  if (cc_major < 8)
    return Status::FailedPrecondition("GroupedWeightGrad: needs an sm_80 or newer GPU");
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(
      cudaFuncSetAttribute(GroupedWeightGradKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           kSmemBytes),
      "GroupedWeightGrad: shared memory attribute"));
  dim3 grid;
  detail::WeightGradParams params;
  GROVE_RETURN_IF_ERROR(detail::MakeWeightGradLaunch(args, kTileN, kTileK, &grid, &params));
  GroupedWeightGradKernel<<<grid, kThreads, kSmemBytes, stream>>>(params);
  return detail::CudaStatus(cudaGetLastError(), "GroupedWeightGrad launch");
}

}  // namespace grove::kernels
