// WeightGradImpl::kTma / kTmaN128: G_e (+)= dY_e^T X_e with a warp-
// specialized TMA pipeline feeding wgmma (sm_90a).
//
// Why another kernel: the kWgmma kernel has every thread copy with cp.async
// and meet at a CTA barrier per stage, so the copies and the wgmmas take
// turns; it reached 340-370 TFLOP/s where cuBLAS does 740-780 on the same
// work. Here a producer (one thread of the warps after the consumers issues
// the bulk tensor copies of each stage, completing on the stage's "full"
// mbarrier) feeds consumer warpgroups 0 and 1 (each owns 64 G rows of the 128 x kTileN
// tile, waits on "full", issues its wgmmas and hands the stage back on its
// "empty" mbarrier), so loads run kStages - 1 stages ahead of the math.
//
// Same grid and tile as the other implementations (blockIdx.y = expert,
// blockIdx.x = (output, G row block, G column block); LocateWeightGradTile).
// A stage is 64 reduction rows t: two [64 t][64] boxes of dY (this CTA's 128
// G rows) and kTileN / 64 boxes of X, each 128-byte swizzled by the copy
// engine, which is exactly wgmma's MN-major SW128 layout (the kWgmma kernel
// builds the same bytes by hand), so the descriptors are the same.
//
// The ragged edge: a box starting at row t0 copies rows t0 .. t0 + 63 of
// the whole tensor, and rows at or past the expert's end belong to the next
// expert (TMA zero-fills only past the tensor). In the one stage where that
// happens (the last), the consumers overwrite those rows of every box with
// zeros before their wgmmas (a 128-byte row is one swizzle span, so a whole
// row is zeroed wherever its chunks lie), then fence the generic-proxy
// stores against the async-proxy reads and meet at a named barrier. Zeroing
// X as well as dY keeps an Inf or NaN in the next expert's rows out of this
// expert's sums (0 * Inf is NaN).
#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/grouped_gemm_internal.h"
#include "kernels/grouped_gemm_store.cuh"
#include "kernels/grouped_weight_grad_internal.h"
#include "kernels/grouped_weight_grad_tile.cuh"
#include "kernels/grouped_weight_grad_wgmma.cuh"
#include "kernels/ptx/mbarrier.cuh"
#include "kernels/ptx/tensor_map.h"
#include "kernels/ptx/tma.cuh"
#include "kernels/ptx/wgmma.cuh"

namespace grove::kernels::detail {
namespace {

constexpr int kConsumerThreads = 256;  // two consumer warpgroups, threads 0 .. 255
constexpr int kTileM = 128;    // G rows per CTA (dY columns)
constexpr int kStepT = 64;     // reduction rows per stage
constexpr int kSubElems = kStepT * 64;         // one [64 t][64] box
constexpr uint32_t kSubBytes = kSubElems * 2;  // 8 KB; wgmma's leading byte offset

// kMinBlocks CTAs per SM. One: the producer is a whole warpgroup (threads
// 256 .. 383) so registers can move to the consumers (setmaxnreg works per
// warpgroup). Two: the producer is one warp (threads 256 .. 287), so two
// CTAs of 288 threads may use up to 112 registers each (96 used), enough for
// the m64n128 accumulators without moving any (384-thread CTAs would get 80:
// too few).
template <int kTileN_, int kStages_, int kMinBlocks_>
struct TmaTiling {
  static constexpr int kTileN = kTileN_;
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kThreads = kConsumerThreads + (kMinBlocks == 1 ? 128 : 32);
  static constexpr int kDySubs = kTileM / 64;
  static constexpr int kXSubs = kTileN / 64;
  static constexpr int kSubs = kDySubs + kXSubs;
  static constexpr uint32_t kStageBytes = kSubs * kSubBytes;
  static constexpr int kBarrierOffset = kStages * kStageBytes;
  static constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8 + 1024;  // + align slack
  static_assert(kTileN == 128 || kTileN == 256);
  static_assert(kSmemBytes * kMinBlocks <= 227 * 1024, "shared memory");
};

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    WeightGradTmaKernel(const __grid_constant__ CUtensorMap tmap_dy,
                        const __grid_constant__ CUtensorMap tmap_dy2,
                        const __grid_constant__ CUtensorMap tmap_x, const WeightGradParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kTileN = Cfg::kTileN;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Cfg::kBarrierOffset);
  uint64_t* empty_bar = full_bar + kStages;

  const WeightGradTile w = LocateWeightGradTile(p, kTileM, kTileN);
  if (w.end == w.begin && p.accumulate) return;  // G_e stays as it is (whole CTA)
  const int steps = (w.end - w.begin + kStepT - 1) / kStepT;
  const bool second_output = blockIdx.x >= static_cast<unsigned>(p.tiles_per_output);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(&full_bar[s], 1);
      ptx::mbarrier_init(&empty_bar[s], 8);  // one arrival per consumer warp
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();

  if (threadIdx.x >= kConsumerThreads) {
    if constexpr (Cfg::kMinBlocks == 1) ptx::setmaxnreg_dec<40>();
    if (threadIdx.x == kConsumerThreads && steps > 0) {
      const CUtensorMap* tmap_a = second_output ? &tmap_dy2 : &tmap_dy;
      ptx::prefetch_tensormap(tmap_a);
      ptx::prefetch_tensormap(&tmap_x);
      for (int s = 0; s < steps; ++s) {
        const int stage = s % kStages;
        const uint32_t phase = (s / kStages) & 1;
        ptx::mbarrier_wait_parity(&empty_bar[stage], phase ^ 1);
        uint8_t* dst = smem + stage * Cfg::kStageBytes;
        const int t0 = w.begin + s * kStepT;
        ptx::mbarrier_arrive_expect_tx(&full_bar[stage], Cfg::kStageBytes);
#pragma unroll
        for (int j = 0; j < Cfg::kDySubs; ++j)
          ptx::cp_async_bulk_tensor_2d_g2s(dst + j * kSubBytes, tmap_a, w.row0 + 64 * j, t0,
                                           &full_bar[stage]);
#pragma unroll
        for (int j = 0; j < Cfg::kXSubs; ++j)
          ptx::cp_async_bulk_tensor_2d_g2s(dst + (Cfg::kDySubs + j) * kSubBytes, &tmap_x,
                                           w.col0 + 64 * j, t0, &full_bar[stage]);
      }
    }
  } else {
    if constexpr (Cfg::kMinBlocks == 1) ptx::setmaxnreg_inc<232>();
    const int consumer = threadIdx.x / 128;  // G rows consumer * 64 .. + 63 of the tile
    const int ctid = threadIdx.x;            // 0 .. 255 over both consumers
    const int lane = threadIdx.x % 32;
    float acc[kTileN / 2];
#pragma unroll
    for (int i = 0; i < kTileN / 2; ++i) acc[i] = 0.f;

    int prev_stage = -1;
    for (int s = 0; s < steps; ++s) {
      const int stage = s % kStages;
      ptx::mbarrier_wait_parity(&full_bar[stage], (s / kStages) & 1);
      uint8_t* st = smem + stage * Cfg::kStageBytes;
      const int valid = w.end - (w.begin + s * kStepT);
      if (valid < kStepT) {  // uniform: every consumer thread sees the same tail
        constexpr int kChunksPerRow = 8;  // 16-byte chunks of a 128-byte row
        const int tail_chunks = (kStepT - valid) * kChunksPerRow;
        for (int i = ctid; i < Cfg::kSubs * tail_chunks; i += kConsumerThreads) {
          const int sub = i / tail_chunks, r = valid + (i % tail_chunks) / kChunksPerRow,
                    c = i % kChunksPerRow;
          *reinterpret_cast<uint4*>(st + sub * kSubBytes + r * 128 + c * 16) = make_uint4(0, 0, 0, 0);
        }
        ptx::fence_proxy_async_shared_cta();  // these stores before the wgmmas' async reads
        // Named barrier 1 (0 is __syncthreads): the consumers meet without the producer.
        asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
      }
      const __nv_bfloat16* a_tile = reinterpret_cast<const __nv_bfloat16*>(st) + consumer * kSubElems;
      const __nv_bfloat16* b_tile =
          reinterpret_cast<const __nv_bfloat16*>(st) + Cfg::kDySubs * kSubElems;
      WeightGradWgmmaBatch<kTileN, kStepT>(acc, a_tile, b_tile, kSubBytes);
      // The previous stage's wgmmas are done once at most this batch is
      // pending: hand that stage back to the producer.
      ptx::wgmma_wait_group<1>();
      if (prev_stage >= 0 && lane == 0) ptx::mbarrier_arrive(&empty_bar[prev_stage]);
      prev_stage = stage;
    }
    ptx::wgmma_wait_group<0>();

    StoreWeightGradAccumulator<kTileN>(acc, p, w, w.row0 + consumer * 64);
  }
#else
  __trap();  // built for a device without wgmma; the host never launches this
#endif
}

template <typename Cfg>
Status Launch(const GroupedWeightGradArgs& args, cudaStream_t stream) {
  const uint64_t rows = static_cast<uint64_t>(args.total_rows);
  CUtensorMap tmap_dy, tmap_dy2, tmap_x;
  GROVE_RETURN_IF_ERROR(
      ptx::MakeTensorMap2dBf16Swizzled(&tmap_dy, args.dy, rows, args.n, args.n, kStepT, 64, 128));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(
      &tmap_dy2, args.dy2 != nullptr ? args.dy2 : args.dy, rows, args.n, args.n, kStepT, 64, 128));
  GROVE_RETURN_IF_ERROR(
      ptx::MakeTensorMap2dBf16Swizzled(&tmap_x, args.x, rows, args.k, args.k, kStepT, 64, 128));
  auto kernel = WeightGradTmaKernel<Cfg>;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
      "GroupedWeightGrad tma: shared memory attribute"));
  dim3 grid;
  WeightGradParams params;
  GROVE_RETURN_IF_ERROR(MakeWeightGradLaunch(args, kTileM, Cfg::kTileN, &grid, &params));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tmap_dy, tmap_dy2, tmap_x, params);
  return CudaStatus(cudaGetLastError(), "GroupedWeightGrad tma launch");
}

}  // namespace

Status LaunchWeightGradTma(const GroupedWeightGradArgs& args, WeightGradImpl impl,
                           cudaStream_t stream) {
  // 256 columns: 48 KB stages, 4 of them, one CTA per SM, registers moved to
  // the consumers (128 accumulators each). 128 columns: 32 KB stages, 3 of
  // them, two CTAs per SM, so one CTA's epilogue overlaps the other's loads.
  switch (impl) {
    case WeightGradImpl::kTma:
      return Launch<TmaTiling<256, 4, 1>>(args, stream);
    case WeightGradImpl::kTmaN128:
      return Launch<TmaTiling<128, 3, 2>>(args, stream);
    default:
      return Status::Internal("GroupedWeightGrad tma: not a tma implementation");
  }
}

}  // namespace grove::kernels::detail
