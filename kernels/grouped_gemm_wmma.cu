// GroupedGemmImpl::kWmma: the kMmaSync kernel's tiling (persistent CTAs of
// 8 warps, 128 x 128 tiles, K steps of 64, 3-stage async-copy ring, 2 x 4
// warps of 64 x 32) written in plain CUDA C++: nvcuda::wmma fragments and the
// __pipeline_memcpy_async primitives, no inline PTX. It exists to measure
// what the hand-written path buys (bench/kernels). WMMA cannot read a
// swizzled layout, so rows are padded by 8 elements against bank conflicts;
// its accumulator layout is opaque, so the epilogue goes through shared
// memory.
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <mma.h>

#include "kernels/grouped_gemm_internal.h"
#include "kernels/grouped_gemm_schedule.cuh"
#include "kernels/grouped_gemm_store.cuh"

namespace grove::kernels::detail {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 3, kThreads = 256;
constexpr int kLd = kBK + 8;  // padded row, elements
constexpr int kTileElems = kBM * kLd;
constexpr int kStageElems = 2 * kTileElems;
constexpr int kRingBytes = kStages * kStageElems * 2;
constexpr int kEpilogueLd = 32 + 4;  // per-warp 64 x 32 fp32 staging, padded
constexpr int kEpilogueBytes = 8 * 64 * kEpilogueLd * 4;
static_assert(kEpilogueBytes <= kRingBytes, "epilogue staging reuses the ring");
constexpr int kSmemBytes = kRingBytes + (kMaxExperts + 1) * 4;

__device__ __forceinline__ void LoadTile(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                         int first_row, int row_limit, int k, int k0) {
#pragma unroll
  for (int i = 0; i < kBM * 8 / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int row = idx / 8, chunk = idx % 8;
    const int grow = first_row + row;
    const int gcol = k0 + chunk * 8;
    const bool valid = grow < row_limit && gcol < k;
    const __nv_bfloat16* g = valid ? src + static_cast<int64_t>(grow) * k + gcol : src;
    // zfill of all 16 bytes when out of range
    __pipeline_memcpy_async(dst + row * kLd + chunk * 8, g, 16, valid ? 0 : 16);
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads, 2)
    GroupedGemmWmmaKernel(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ w,
                          const int32_t* __restrict__ offsets, int num_experts, int total_rows,
                          int n, int k, int w_expert_rows, OutT* __restrict__ c) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  int* tile_prefix = reinterpret_cast<int*>(smem_raw + kRingBytes);
  const int n_tiles = (n + kBN - 1) / kBN;
  const int k_blocks = (k + kBK - 1) / kBK;
  if (threadIdx.x < 32)
    BuildTilePrefix(offsets, num_experts, total_rows, kBM, n_tiles, tile_prefix);
  __syncthreads();
  const int total_tiles = tile_prefix[num_experts];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int w_rows = (num_experts - 1) * w_expert_rows + n;
  int expert_hint = 0;

  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileCoord t = LocateTile(tile, tile_prefix, offsets, total_rows, kBM, kBN, n_tiles,
                                   expert_hint);
    const int w_row0 = t.expert * w_expert_rows + t.col_begin;
    auto load_stage = [&](int kb) {
      __nv_bfloat16* st = smem + (kb % kStages) * kStageElems;
      LoadTile(st, a, t.row_begin, total_rows, k, kb * kBK);
      LoadTile(st + kTileElems, w, w_row0, w_rows, k, kb * kBK);
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_blocks) load_stage(s);
      __pipeline_commit();
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int kb = 0; kb < k_blocks; ++kb) {
      __pipeline_wait_prior(kStages - 2);
      __syncthreads();
      if (kb + kStages - 1 < k_blocks) load_stage(kb + kStages - 1);
      __pipeline_commit();

      const __nv_bfloat16* sa = smem + (kb % kStages) * kStageElems;
      const __nv_bfloat16* sw = sa + kTileElems;
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af[4];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bf[2];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          wmma::load_matrix_sync(af[i], sa + (wm * 64 + i * 16) * kLd + kk * 16, kLd);
        // W is stored [n][k]: as a k x n matrix that is column-major.
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(bf[j], sw + (wn * 32 + j * 16) * kLd + kk * 16, kLd);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
      }
    }
    __pipeline_wait_prior(0);
    __syncthreads();  // the ring is free: reuse it to stage the accumulators

    float* stage = reinterpret_cast<float*>(smem_raw) + warp * 64 * kEpilogueLd;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(stage + i * 16 * kEpilogueLd + j * 16, acc[i][j], kEpilogueLd,
                                wmma::mem_row_major);
    __syncwarp();
    // 64 rows x 16 column pairs per warp; lanes walk pairs of one row.
    for (int idx = lane; idx < 64 * 16; idx += 32) {
      const int r = idx / 16, cp = idx % 16;
      const int row = wm * 64 + r;
      const int col = t.col_begin + wn * 32 + 2 * cp;
      if (row < t.rows && col < n)
        StorePair(c + static_cast<int64_t>(t.row_begin + row) * n + col,
                  stage[r * kEpilogueLd + 2 * cp], stage[r * kEpilogueLd + 2 * cp + 1]);
    }
    __syncthreads();  // staging area is the next tile's ring
  }
}

template <typename OutT>
Status Launch(const GroupedGemmArgs& args, const DeviceInfo& dev, cudaStream_t stream) {
  auto kernel = GroupedGemmWmmaKernel<OutT>;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
      "wmma grouped GEMM: shared memory attribute"));
  int per_sm = 0;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kSmemBytes),
      "wmma grouped GEMM: occupancy"));
  const int64_t n_tiles = (args.n + kBN - 1) / kBN;
  const int64_t max_tiles =
      (static_cast<int64_t>(args.total_rows) / kBM + args.num_experts) * n_tiles;
  const int grid = static_cast<int>(
      std::min<int64_t>(static_cast<int64_t>(dev.sm_count) * std::max(per_sm, 1),
                        std::max<int64_t>(max_tiles, 1)));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(args.a, args.w, args.expert_offsets,
                                                 args.num_experts, args.total_rows, args.n,
                                                 args.k, args.w_expert_rows,
                                                 static_cast<OutT*>(args.c));
  return CudaStatus(cudaGetLastError(), "wmma grouped GEMM launch");
}

}  // namespace

Status LaunchGroupedGemmWmma(const GroupedGemmArgs& args, const DeviceInfo& dev,
                             cudaStream_t stream) {
  return args.out_type == GemmOutType::kF32 ? Launch<float>(args, dev, stream)
                                            : Launch<__nv_bfloat16>(args, dev, stream);
}

}  // namespace grove::kernels::detail
