// GroupedGemmImpl::kMmaSync: the sm_80+ grouped GEMM from the PTX wrappers.
//
// Persistent CTAs of 8 warps (2 per SM), 128 x 128 output tiles, K in steps
// of 64 through a kStages-deep cp.async ring. Shared-memory rows are 64 bf16
// (128 bytes, eight 16-byte chunks); chunk c of row r is stored at chunk
// c ^ (r % 8), so the 8 row addresses of each ldmatrix hit 8 different bank
// groups. Warp (wm, wn) of the 2 x 4 warp grid computes rows 64*wm..+63 and
// columns 32*wn..+31 with 4 x 4 mma.sync m16n8k16 per 16-wide k step.
//
// MN-major weights (B [k, n] per expert): the W tile of a stage is instead
// two [64 k][64 n] halves (n 0-63, 64-127 of the column block), swizzled the
// same way with k as the row, and the B fragments come from ldmatrix.trans
// (each 8 x 8 matrix read along k rows and transposed into the fragment
// that the K-major tile gives without .trans).
#include <cuda_bf16.h>

#include <type_traits>

#include "kernels/grouped_gemm_internal.h"
#include "kernels/grouped_gemm_schedule.cuh"
#include "kernels/grouped_gemm_store.cuh"
#include "kernels/ptx/cp_async.cuh"
#include "kernels/ptx/ldmatrix.cuh"
#include "kernels/ptx/mma.cuh"

namespace grove::kernels::detail {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 3, kThreads = 256;
constexpr int kTileElems = kBM * kBK;  // A and W tiles are both 128 x 64
constexpr int kStageElems = 2 * kTileElems;
constexpr int kSmemBytes = kStages * kStageElems * 2 + (kMaxExperts + 1) * 4;

__device__ __forceinline__ int Swizzled(int row, int chunk) {
  return row * kBK + ((chunk ^ (row & 7)) * 8);
}

// Copies a 128 x 64 tile whose row r is src_rows[r] (rows >= row_limit and
// columns >= k are zero-filled) into the swizzled `dst`.
__device__ __forceinline__ void LoadTile(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                         int first_row, int row_limit, int k, int k0) {
#pragma unroll
  for (int i = 0; i < kBM * 8 / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int row = idx / 8, chunk = idx % 8;
    const int grow = first_row + row;
    const int gcol = k0 + chunk * 8;
    const bool valid = grow < row_limit && gcol < k;  // k % 8 == 0: chunks are whole
    const __nv_bfloat16* g = valid ? src + static_cast<int64_t>(grow) * k + gcol : src;
    ptx::cp_async_cg_16_zfill(dst + Swizzled(row, chunk), g, valid ? 16 : 0);
  }
}

// The MN-major W tile: k rows k0 .. k0 + 63 (rows >= k zero-filled: they
// would be the next expert's or a gap) and columns col0 .. col0 + 127
// (>= n zero-filled) of the expert's [k, n] matrix at w_e.
__device__ __forceinline__ void LoadTileMn(__nv_bfloat16* dst, const __nv_bfloat16* w_e, int k,
                                           int n, int k0, int col0) {
#pragma unroll
  for (int i = 0; i < kBK * (kBN / 8) / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int row = idx / (kBN / 8), chunk = idx % (kBN / 8);  // row: k; chunk: 8 n
    const int gk = k0 + row, gcol = col0 + chunk * 8;
    const bool valid = gk < k && gcol < n;  // n % 8 == 0: chunks are whole
    const __nv_bfloat16* g = valid ? w_e + static_cast<int64_t>(gk) * n + gcol : w_e;
    ptx::cp_async_cg_16_zfill(dst + (chunk / 8) * kTileElems / 2 + Swizzled(row, chunk % 8), g,
                              valid ? 16 : 0);
  }
}

// kSwiGluBwd (OutT bf16): the SwiGLU backward epilogue
// (GroupedGemmArgs::swiglu_bwd_ab): c and ab are [rows, 2n].
template <typename OutT, bool kWMn, bool kSwiGluBwd>
__global__ void __launch_bounds__(kThreads, 2)
    GroupedGemmMmaKernel(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ w,
                         const int32_t* __restrict__ offsets, int num_experts, int total_rows,
                         int n, int k, int w_expert_rows, OutT* __restrict__ c,
                         const __nv_bfloat16* __restrict__ ab) {
  static_assert(!kSwiGluBwd || std::is_same_v<OutT, __nv_bfloat16>);
  extern __shared__ __align__(128) uint8_t smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  int* tile_prefix = reinterpret_cast<int*>(smem_raw + kStages * kStageElems * 2);
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
    // K-major: W rows past this expert's n belong to the next expert:
    // harmless (those columns are not stored), but never read past the tensor.
    auto load_stage = [&](int kb) {
      __nv_bfloat16* st = smem + (kb % kStages) * kStageElems;
      LoadTile(st, a, t.row_begin, total_rows, k, kb * kBK);
      if constexpr (kWMn) {
        LoadTileMn(st + kTileElems, w + static_cast<int64_t>(t.expert) * w_expert_rows * n, k, n,
                   kb * kBK, t.col_begin);
      } else {
        LoadTile(st + kTileElems, w, w_row0, w_rows, k, kb * kBK);
      }
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_blocks) load_stage(s);
      ptx::cp_async_commit_group();
    }

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    for (int kb = 0; kb < k_blocks; ++kb) {
      ptx::cp_async_wait_group<kStages - 2>();
      __syncthreads();  // stage kb landed for everyone; stage kb-1 is free
      if (kb + kStages - 1 < k_blocks) load_stage(kb + kStages - 1);
      ptx::cp_async_commit_group();

      const __nv_bfloat16* sa = smem + (kb % kStages) * kStageElems;
      const __nv_bfloat16* sw = sa + kTileElems;
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        uint32_t af[4][4], bf[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = wm * 64 + i * 16 + (lane % 16);
          ptx::ldmatrix_x4(af[i][0], af[i][1], af[i][2], af[i][3],
                           sa + Swizzled(row, kk * 2 + lane / 16));
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // Lanes 8 g .. 8 g + 7 address matrix g: n 0-7 / 8-15 (g / 2) of
          // this 16-column group, k 0-7 / 8-15 (g % 2) of the step.
          if constexpr (kWMn) {
            const int k_row = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;
            const int n_chunk = (wn * 32 + j * 16) / 8 + lane / 16;  // 0 .. 15
            ptx::ldmatrix_x4_trans(bf[2 * j][0], bf[2 * j][1], bf[2 * j + 1][0],
                                   bf[2 * j + 1][1],
                                   sw + (n_chunk / 8) * kTileElems / 2 +
                                       Swizzled(k_row, n_chunk % 8));
          } else {
            const int n_row = wn * 32 + j * 16 + (lane % 8) + (lane / 16) * 8;
            ptx::ldmatrix_x4(bf[2 * j][0], bf[2 * j][1], bf[2 * j + 1][0], bf[2 * j + 1][1],
                             sw + Swizzled(n_row, kk * 2 + (lane / 8) % 2));
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) ptx::mma_m16n8k16_bf16_f32(acc[i][j], af[i], bf[j]);
      }
    }
    ptx::cp_async_wait_all();
    __syncthreads();  // every warp is done with the ring before the next tile refills it

    // bf16: column groups j, j+1 go out together (StoreSwappedQuad: full
    // 32-byte sectors). fp32 pairs already fill a sector per quad, and the
    // swap would push this kernel past its 128-register cap into spills.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm * 64 + i * 16 + lane / 4 + 8 * h;
        const int64_t grow = static_cast<int64_t>(t.row_begin) + row;
        if constexpr (std::is_same_v<OutT, float>) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int col = t.col_begin + wn * 32 + j * 8 + 2 * (lane % 4);
            if (row < t.rows && col < n)
              StorePair(c + grow * n + col, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
          }
        } else if constexpr (kSwiGluBwd) {
#pragma unroll
          for (int j = 0; j < 4; j += 2)
            StoreSwappedQuadSwiGluBwd(c, ab, n, grow, row < t.rows, t.col_begin + wn * 32 + j * 8,
                                      &acc[i][j][2 * h], &acc[i][j + 1][2 * h]);
        } else {
#pragma unroll
          for (int j = 0; j < 4; j += 2)
            StoreSwappedQuad(c, n, grow, row < t.rows, t.col_begin + wn * 32 + j * 8,
                             &acc[i][j][2 * h], &acc[i][j + 1][2 * h]);
        }
      }
    }
  }
}

template <typename OutT, bool kWMn, bool kSwiGluBwd = false>
Status Launch(const GroupedGemmArgs& args, const DeviceInfo& dev, cudaStream_t stream) {
  auto kernel = GroupedGemmMmaKernel<OutT, kWMn, kSwiGluBwd>;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
      "mma.sync grouped GEMM: shared memory attribute"));
  int per_sm = 0;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kSmemBytes),
      "mma.sync grouped GEMM: occupancy"));
  const int64_t n_tiles = (args.n + kBN - 1) / kBN;
  const int64_t max_tiles =
      (static_cast<int64_t>(args.total_rows) / kBM + args.num_experts) * n_tiles;
  const int grid = static_cast<int>(
      std::min<int64_t>(static_cast<int64_t>(dev.sm_count) * std::max(per_sm, 1),
                        std::max<int64_t>(max_tiles, 1)));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(args.a, args.w, args.expert_offsets,
                                                 args.num_experts, args.total_rows, args.n,
                                                 args.k, args.w_expert_rows,
                                                 static_cast<OutT*>(args.c), args.swiglu_bwd_ab);
  return CudaStatus(cudaGetLastError(), "mma.sync grouped GEMM launch");
}

}  // namespace

Status LaunchGroupedGemmMmaSync(const GroupedGemmArgs& args, const DeviceInfo& dev,
                                cudaStream_t stream) {
  const bool f32 = args.out_type == GemmOutType::kF32;
  if (args.swiglu_bwd_ab != nullptr)  // bf16 out (checked by GroupedGemm)
    return args.w_layout == GemmWeightLayout::kMnMajor
               ? Launch<__nv_bfloat16, true, true>(args, dev, stream)
               : Launch<__nv_bfloat16, false, true>(args, dev, stream);
  if (args.w_layout == GemmWeightLayout::kMnMajor)
    return f32 ? Launch<float, true>(args, dev, stream)
               : Launch<__nv_bfloat16, true>(args, dev, stream);
  return f32 ? Launch<float, false>(args, dev, stream)
             : Launch<__nv_bfloat16, false>(args, dev, stream);
}

}  // namespace grove::kernels::detail
