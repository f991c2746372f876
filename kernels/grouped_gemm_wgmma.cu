// kGroupedGemmImpl::kWgmma: the sm_90a grouped GEMM.
//
// One persistent CTA per SM, three warpgroups: warpgroup 0 is the producer
// (one thread issues TMA loads of A and W tiles into a ring of kStages
// shared-memory stages, each completing on a "full" mbarrier), warpgroups 1
// and 2 are consumers (each owns 64 rows of the 128-row tile and issues
// wgmma m64n{BN}k16 on the stage, then releases it on an "empty" mbarrier).
// The producer runs ahead across tile boundaries, so the next tile's loads
// overlap the consumers' epilogue. Rows of a tile past its expert's end are
// computed from whatever A holds there (or TMA zeros past the tensor) and
// never stored.
#include <cuda.h>
#include <cuda_bf16.h>

#include "kernels/grouped_gemm_internal.h"
#include "kernels/grouped_gemm_schedule.cuh"
#include "kernels/grouped_gemm_store.cuh"
#include "kernels/ptx/mbarrier.cuh"
#include "kernels/ptx/tensor_map.h"
#include "kernels/ptx/tma.cuh"
#include "kernels/ptx/wgmma.cuh"

namespace grove::kernels::detail {
namespace {

constexpr int kBlockM = 128;
constexpr int kBlockK = 64;  // one 128-byte swizzle row of bf16
constexpr int kThreads = 384;

template <int BN>
struct WgmmaConfig {
  static constexpr int kStages = BN == 256 ? 4 : 6;
  static constexpr int kABytes = kBlockM * kBlockK * 2;
  static constexpr int kBBytes = BN * kBlockK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  // stages, then full/empty (and ping-pong turn) barriers, then the tile table.
  static constexpr int kBarrierOffset = kStages * kStageBytes;
  static constexpr int kPrefixOffset = kBarrierOffset + (2 * kStages + 2) * 8;
  static constexpr int kSmemBytes = kPrefixOffset + (kMaxExperts + 1) * 4 + 1024;  // + align slack
};

template <int BN, typename OutT>
__global__ void __launch_bounds__(kThreads, 1)
    GroupedGemmWgmmaKernel(const __grid_constant__ CUtensorMap tmap_a,
                           const __grid_constant__ CUtensorMap tmap_w,
                           const int32_t* __restrict__ offsets, int num_experts, int total_rows,
                           int n, int k, OutT* __restrict__ c) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = WgmmaConfig<BN>;
  extern __shared__ uint8_t smem_raw[];
  // 128-byte swizzled TMA boxes and wgmma descriptors want 1024-byte alignment.
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Cfg::kBarrierOffset);
  uint64_t* empty_bar = full_bar + Cfg::kStages;
  int* tile_prefix = reinterpret_cast<int*>(smem + Cfg::kPrefixOffset);

  const int warpgroup = threadIdx.x / 128;
  const int n_tiles = (n + BN - 1) / BN;
  const int k_blocks = (k + kBlockK - 1) / kBlockK;

  if (threadIdx.x == 0) {
    ptx::prefetch_tensormap(&tmap_a);
    ptx::prefetch_tensormap(&tmap_w);
    for (int s = 0; s < Cfg::kStages; ++s) {
      ptx::mbarrier_init(&full_bar[s], 1);
      ptx::mbarrier_init(&empty_bar[s], 8);  // one arrival per consumer warp
    }
    ptx::fence_mbarrier_init();
  }
  if (threadIdx.x / 32 == 1) {
    BuildTilePrefix(offsets, num_experts, total_rows, kBlockM, n_tiles, tile_prefix);
  }
  __syncthreads();
  const int total_tiles = tile_prefix[num_experts];

  if (warpgroup == 0) {
    ptx::setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      int expert_hint = 0;
      for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        const TileCoord t = LocateTile(tile, tile_prefix, offsets, total_rows, kBlockM, BN,
                                       n_tiles, expert_hint);
        const int w_row = t.expert * n + t.col_begin;
        for (int kb = 0; kb < k_blocks; ++kb) {
          ptx::mbarrier_wait_parity(&empty_bar[stage], phase ^ 1);
          uint8_t* a_dst = smem + stage * Cfg::kStageBytes;
          uint8_t* w_dst = a_dst + Cfg::kABytes;
          ptx::mbarrier_arrive_expect_tx(&full_bar[stage], Cfg::kStageBytes);
          ptx::cp_async_bulk_tensor_2d_g2s(a_dst, &tmap_a, kb * kBlockK, t.row_begin,
                                           &full_bar[stage]);
          ptx::cp_async_bulk_tensor_2d_g2s(w_dst, &tmap_w, kb * kBlockK, w_row,
                                           &full_bar[stage]);
          if (++stage == Cfg::kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    ptx::setmaxnreg_inc<232>();
    const int consumer = warpgroup - 1;  // rows consumer*64 .. +63 of the tile
    const int warp_in_group = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    int stage = 0;
    uint32_t phase = 0;
    int expert_hint = 0;
    float acc[BN / 2];
    for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
      const TileCoord t = LocateTile(tile, tile_prefix, offsets, total_rows, kBlockM, BN,
                                     n_tiles, expert_hint);
      int prev_stage = -1;
      for (int kb = 0; kb < k_blocks; ++kb) {
        ptx::mbarrier_wait_parity(&full_bar[stage], phase);
        const __nv_bfloat16* a_tile = reinterpret_cast<const __nv_bfloat16*>(
                                          smem + stage * Cfg::kStageBytes) +
                                      consumer * 64 * kBlockK;
        const __nv_bfloat16* w_tile = reinterpret_cast<const __nv_bfloat16*>(
            smem + stage * Cfg::kStageBytes + Cfg::kABytes);
        ptx::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockK / 16; ++kk) {
          const uint64_t desc_a = ptx::make_wgmma_desc_k_sw128(a_tile + kk * 16);
          const uint64_t desc_w = ptx::make_wgmma_desc_k_sw128(w_tile + kk * 16);
          const int accumulate = (kb > 0 || kk > 0) ? 1 : 0;
          if constexpr (BN == 256) {
            ptx::wgmma_m64n256k16_f32_bf16_ss(acc, desc_a, desc_w, accumulate);
          } else {
            ptx::wgmma_m64n128k16_f32_bf16_ss(acc, desc_a, desc_w, accumulate);
          }
        }
        ptx::wgmma_commit_group();
        // The previous stage's wgmmas are done once at most this batch is
        // pending: hand that stage back to the producer.
        ptx::wgmma_wait_group<1>();
        if (prev_stage >= 0 && lane == 0) ptx::mbarrier_arrive(&empty_bar[prev_stage]);
        prev_stage = stage;
        if (++stage == Cfg::kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      ptx::wgmma_wait_group<0>();
      if (prev_stage >= 0 && lane == 0) ptx::mbarrier_arrive(&empty_bar[prev_stage]);

      // Epilogue: register i of this thread is (row r0 + 8*((i/2)%2),
      // column 8*(i/4) + 2*(lane%4) + i%2) of the consumer's 64 x BN block.
      const int r0 = consumer * 64 + warp_in_group * 16 + lane / 4;
      const int c0 = t.col_begin + 2 * (lane % 4);
#pragma unroll
      for (int i = 0; i < BN / 2; i += 4) {
        const int col = c0 + 8 * (i / 4);
        if (col < n) {
          if (r0 < t.rows)
            StorePair(c + static_cast<int64_t>(t.row_begin + r0) * n + col, acc[i], acc[i + 1]);
          if (r0 + 8 < t.rows)
            StorePair(c + static_cast<int64_t>(t.row_begin + r0 + 8) * n + col, acc[i + 2],
                      acc[i + 3]);
        }
      }
    }
  }
#else
  __trap();  // built for a device without wgmma; the host never launches this
#endif
}

// The ping-pong variant: the two consumer warpgroups take alternate tiles
// of the CTA's sequence, each a whole 128 x 128 tile (two m64n128k16 per k
// step, 128 accumulators per thread). The producer fills the ring in tile
// order, so one warpgroup's main loop runs while the other stores its
// previous tile: the epilogue hides behind the tensor cores instead of
// stalling them. Ring position p (stage p % kStages, parity (p / kStages) & 1)
// of k block kb of the CTA's i-th tile is i * k_blocks + kb.
//
// A parity wait can only tell the awaited fill of a stage from the one
// before it, never from two before: a warpgroup that skipped the other's
// tile must not wait on a position before the other has passed its own
// waits up to there. So the main loops take turns: "turn" mbarrier w
// completes when warpgroup 1-w has waited on every stage of its tile, and
// warpgroup w waits for it before its next main loop.
template <typename OutT>
__global__ void __launch_bounds__(kThreads, 1)
    GroupedGemmWgmmaPingpongKernel(const __grid_constant__ CUtensorMap tmap_a,
                                   const __grid_constant__ CUtensorMap tmap_w,
                                   const int32_t* __restrict__ offsets, int num_experts,
                                   int total_rows, int n, int k, OutT* __restrict__ c) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = 128;
  using Cfg = WgmmaConfig<BN>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Cfg::kBarrierOffset);
  uint64_t* empty_bar = full_bar + Cfg::kStages;
  uint64_t* turn_bar = empty_bar + Cfg::kStages;  // 2 barriers
  int* tile_prefix = reinterpret_cast<int*>(smem + Cfg::kPrefixOffset);

  const int warpgroup = threadIdx.x / 128;
  const int n_tiles = (n + BN - 1) / BN;
  const int k_blocks = (k + kBlockK - 1) / kBlockK;

  if (threadIdx.x == 0) {
    ptx::prefetch_tensormap(&tmap_a);
    ptx::prefetch_tensormap(&tmap_w);
    for (int s = 0; s < Cfg::kStages; ++s) {
      ptx::mbarrier_init(&full_bar[s], 1);
      ptx::mbarrier_init(&empty_bar[s], 4);  // the 4 warps of the one consuming warpgroup
    }
    ptx::mbarrier_init(&turn_bar[0], 1);
    ptx::mbarrier_init(&turn_bar[1], 1);
    ptx::fence_mbarrier_init();
  }
  if (threadIdx.x / 32 == 1) {
    BuildTilePrefix(offsets, num_experts, total_rows, kBlockM, n_tiles, tile_prefix);
  }
  __syncthreads();
  const int total_tiles = tile_prefix[num_experts];

  if (warpgroup == 0) {
    ptx::setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      int expert_hint = 0;
      for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        const TileCoord t = LocateTile(tile, tile_prefix, offsets, total_rows, kBlockM, BN,
                                       n_tiles, expert_hint);
        const int w_row = t.expert * n + t.col_begin;
        for (int kb = 0; kb < k_blocks; ++kb) {
          ptx::mbarrier_wait_parity(&empty_bar[stage], phase ^ 1);
          uint8_t* a_dst = smem + stage * Cfg::kStageBytes;
          uint8_t* w_dst = a_dst + Cfg::kABytes;
          ptx::mbarrier_arrive_expect_tx(&full_bar[stage], Cfg::kStageBytes);
          ptx::cp_async_bulk_tensor_2d_g2s(a_dst, &tmap_a, kb * kBlockK, t.row_begin,
                                           &full_bar[stage]);
          ptx::cp_async_bulk_tensor_2d_g2s(w_dst, &tmap_w, kb * kBlockK, w_row,
                                           &full_bar[stage]);
          if (++stage == Cfg::kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    ptx::setmaxnreg_inc<232>();
    const int consumer = warpgroup - 1;
    const int warp_in_group = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    int expert_hint = 0;
    float acc[2][64];
    int iter = 0;
    for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x, ++iter) {
      if ((iter & 1) != consumer) continue;
      const TileCoord t = LocateTile(tile, tile_prefix, offsets, total_rows, kBlockM, BN,
                                     n_tiles, expert_hint);
      // This warpgroup's j-th tile (j = iter / 2) waits for completion j of
      // its turn barrier (warpgroup 0's first tile waits for nothing).
      const int j = iter / 2;
      if (consumer == 1) {
        ptx::mbarrier_wait_parity(&turn_bar[1], j & 1);
      } else if (j > 0) {
        ptx::mbarrier_wait_parity(&turn_bar[0], (j - 1) & 1);
      }
      const uint32_t pos0 = static_cast<uint32_t>(iter) * k_blocks;
      int prev_stage = -1;
      for (int kb = 0; kb < k_blocks; ++kb) {
        const uint32_t pos = pos0 + kb;
        const int stage = static_cast<int>(pos % Cfg::kStages);
        ptx::mbarrier_wait_parity(&full_bar[stage], (pos / Cfg::kStages) & 1);
        const __nv_bfloat16* a_tile =
            reinterpret_cast<const __nv_bfloat16*>(smem + stage * Cfg::kStageBytes);
        const __nv_bfloat16* w_tile = reinterpret_cast<const __nv_bfloat16*>(
            smem + stage * Cfg::kStageBytes + Cfg::kABytes);
        ptx::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockK / 16; ++kk) {
          const uint64_t desc_w = ptx::make_wgmma_desc_k_sw128(w_tile + kk * 16);
          const int accumulate = (kb > 0 || kk > 0) ? 1 : 0;
          ptx::wgmma_m64n128k16_f32_bf16_ss(
              acc[0], ptx::make_wgmma_desc_k_sw128(a_tile + kk * 16), desc_w, accumulate);
          ptx::wgmma_m64n128k16_f32_bf16_ss(
              acc[1], ptx::make_wgmma_desc_k_sw128(a_tile + 64 * kBlockK + kk * 16), desc_w,
              accumulate);
        }
        ptx::wgmma_commit_group();
        ptx::wgmma_wait_group<1>();
        if (prev_stage >= 0 && lane == 0) ptx::mbarrier_arrive(&empty_bar[prev_stage]);
        prev_stage = stage;
      }
      // This thread has passed every full-barrier wait of the tile; the other
      // warpgroup's next tile comes after it in the ring.
      if (threadIdx.x % 128 == 0) ptx::mbarrier_arrive(&turn_bar[1 - consumer]);
      ptx::wgmma_wait_group<0>();
      if (prev_stage >= 0 && lane == 0) ptx::mbarrier_arrive(&empty_bar[prev_stage]);

#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r0 = half * 64 + warp_in_group * 16 + lane / 4;
        const int c0 = t.col_begin + 2 * (lane % 4);
#pragma unroll
        for (int i = 0; i < 64; i += 4) {
          const int col = c0 + 8 * (i / 4);
          if (col < n) {
            if (r0 < t.rows)
              StorePair(c + static_cast<int64_t>(t.row_begin + r0) * n + col, acc[half][i],
                        acc[half][i + 1]);
            if (r0 + 8 < t.rows)
              StorePair(c + static_cast<int64_t>(t.row_begin + r0 + 8) * n + col,
                        acc[half][i + 2], acc[half][i + 3]);
          }
        }
      }
    }
  }
#else
  __trap();
#endif
}

template <int BN, typename OutT, bool kPingpong>
Status LaunchWgmma(const GroupedGemmArgs& args, const DeviceInfo& dev, cudaStream_t stream) {
  static_assert(!kPingpong || BN == 128);
  using Cfg = WgmmaConfig<BN>;
  CUtensorMap tmap_a, tmap_w;
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Sw128(
      &tmap_a, args.a, static_cast<uint64_t>(args.total_rows), args.k, args.k, kBlockM, kBlockK));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Sw128(
      &tmap_w, args.w, static_cast<uint64_t>(args.num_experts) * args.n, args.k, args.k, BN,
      kBlockK));
  auto kernel = kPingpong ? GroupedGemmWgmmaPingpongKernel<OutT> : GroupedGemmWgmmaKernel<BN, OutT>;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
      "wgmma grouped GEMM: shared memory attribute"));
  // Never more CTAs than tiles can exist (each expert adds at most one
  // partial row block).
  const int64_t n_tiles = (args.n + BN - 1) / BN;
  const int64_t max_tiles = (static_cast<int64_t>(args.total_rows) / kBlockM + args.num_experts) * n_tiles;
  const int grid = static_cast<int>(std::min<int64_t>(dev.sm_count, std::max<int64_t>(max_tiles, 1)));
  kernel<<<grid, kThreads, Cfg::kSmemBytes, stream>>>(
      tmap_a, tmap_w, args.expert_offsets, args.num_experts, args.total_rows, args.n, args.k,
      static_cast<OutT*>(args.c));
  return CudaStatus(cudaGetLastError(), "wgmma grouped GEMM launch");
}

}  // namespace

Status LaunchGroupedGemmWgmma(const GroupedGemmArgs& args, const DeviceInfo& dev,
                              WgmmaVariant variant, cudaStream_t stream) {
  const bool f32 = args.out_type == GemmOutType::kF32;
  switch (variant) {
    case WgmmaVariant::kCooperativeBn128:
      return f32 ? LaunchWgmma<128, float, false>(args, dev, stream)
                 : LaunchWgmma<128, __nv_bfloat16, false>(args, dev, stream);
    case WgmmaVariant::kCooperativeBn256:
      return f32 ? LaunchWgmma<256, float, false>(args, dev, stream)
                 : LaunchWgmma<256, __nv_bfloat16, false>(args, dev, stream);
    case WgmmaVariant::kPingpongBn128:
      return f32 ? LaunchWgmma<128, float, true>(args, dev, stream)
                 : LaunchWgmma<128, __nv_bfloat16, true>(args, dev, stream);
  }
  return Status::Internal("unknown wgmma variant");
}

}  // namespace grove::kernels::detail
