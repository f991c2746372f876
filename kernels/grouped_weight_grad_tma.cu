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

#include <algorithm>
#include <cstdint>

#include "kernels/grouped_gemm_internal.h"
#include "kernels/grouped_gemm_store.cuh"
#include "kernels/grouped_weight_grad_internal.h"
#include "kernels/grouped_weight_grad_tile.cuh"
#include "kernels/grouped_weight_grad_wgmma.cuh"
#include "kernels/ptx/mbarrier.cuh"
#include "kernels/ptx/red.cuh"
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

// The ragged edge (file comment): rows valid .. kStepT - 1 of every one of
// the stage's kSubs boxes set to zero by the 256 consumer threads (ctid),
// fenced against the wgmmas' async-proxy reads; all consumers call it.
template <int kSubs>
__device__ __forceinline__ void ZeroStageRowsPastEnd(uint8_t* st, int valid, int ctid) {
  constexpr int kChunksPerRow = 8;  // 16-byte chunks of a 128-byte row
  const int tail_chunks = (kStepT - valid) * kChunksPerRow;
  for (int i = ctid; i < kSubs * tail_chunks; i += kConsumerThreads) {
    const int sub = i / tail_chunks, r = valid + (i % tail_chunks) / kChunksPerRow,
              c = i % kChunksPerRow;
    *reinterpret_cast<uint4*>(st + sub * kSubBytes + r * 128 + c * 16) = make_uint4(0, 0, 0, 0);
  }
  ptx::fence_proxy_async_shared_cta();  // these stores before the wgmmas' async reads
  // Named barrier 1 (0 is __syncthreads): the consumers meet without the producer.
  asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
}

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
      if (valid < kStepT) ZeroStageRowsPastEnd<Cfg::kSubs>(st, valid, ctid);  // uniform
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

// WeightGradImpl::kTmaPersistentN256 / kTmaPersistentRed: the same
// pipeline (kTma's / kTmaN128's tiling) in a persistent grid (#SMs x CTAs
// per SM) that walks one tile queue. Why: in the plain grid the hardware
// hands out CTAs in expert order, so the experts' ragged row counts
// (1109..7511 in a gpu-ref layer) leave an uneven last wave, and a CTA's
// epilogue (the fp32 read-modify-write of its G tile) overlaps nothing of
// its own (kTma: nothing at all, one CTA per SM). Here
// - the queue holds every expert's tiles, experts longest first (ranked in
//   shared memory from the offsets; ties by expert id), one expert's tiles
//   adjacent (they share its rows in L2);
// - CTA b takes queue entries wave by wave, in a snake: entry j G + b in
//   even waves, j G + (G - 1 - b) in odd ones (G CTAs), so the long tiles
//   of each wave do not all land on the same CTAs (static: no counter to
//   reset between launches, any stream);
// - the producer runs on into the next tile's stages while the consumers
//   store the last one (the ring's stage / phase count continues across
//   tiles);
// - accumulate hands each G pair to L2 as red.global.add.v2.f32, so the
//   consumers start the next tile without waiting for the old G (overwrite:
//   plain stores, as before).
// Each tile is still reduced by one CTA, over the same rows in the same
// stage order as kTma / kTmaN128, and each G element gets exactly one add
// per launch: the same bits as those kernels, every run (no ordering
// between CTAs is needed: no two touch one element).
// (+)= of a warpgroup's m64 x kTileN accumulator into G as
// StoreWeightGradAccumulator does, but each accumulate pair handed to L2 as
// red.global.add.v2.f32: the consumers go on to the next tile without a
// round trip to memory per pair.
template <int kTileN>
__device__ __forceinline__ void AddWeightGradAccumulator(const float (&acc)[kTileN / 2],
                                                         const WeightGradParams& p,
                                                         const WeightGradTile& w, int row0) {
  // The squares need the new values: load, add, store (sum_sq's contract).
  if (!p.accumulate || p.sum_sq != nullptr) {
    StoreWeightGradAccumulator<kTileN>(acc, p, w, row0);
    return;
  }
  ForEachWeightGradPair<kTileN>(acc, p, w, row0, [](float* g, float x, float y, int) {
    ptx::red_global_add_v2_f32(g, x, y);
  });
}

template <typename Cfg>
__device__ __forceinline__ void WeightGradTmaPersistentBody(const CUtensorMap* tmap_dy,
                                                            const CUtensorMap* tmap_dy2,
                                                            const CUtensorMap* tmap_x,
                                                            const WeightGradParams& p,
                                                            int num_experts,
                                                            int tiles_per_expert) {
  constexpr int kTileN = Cfg::kTileN;
  constexpr int kStages = Cfg::kStages;
  constexpr int kMaxRankedExperts = 1024;  // more: the queue keeps expert order
  extern __shared__ uint8_t smem_raw[];
  __shared__ int expert_rows[kMaxRankedExperts];
  __shared__ int rank_order[kMaxRankedExperts];  // rank_order[r]: the r-th longest expert
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Cfg::kBarrierOffset);
  uint64_t* empty_bar = full_bar + kStages;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(&full_bar[s], 1);
      ptx::mbarrier_init(&empty_bar[s], 8);  // one arrival per consumer warp
    }
    ptx::fence_mbarrier_init();
  }
  const bool ranked = num_experts <= kMaxRankedExperts;
  if (ranked) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      const int begin = min(max(p.offsets[e], 0), p.total_rows);
      expert_rows[e] = min(max(p.offsets[e + 1], begin), p.total_rows) - begin;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      const int rows = expert_rows[e];
      int rank = 0;
      for (int f = 0; f < num_experts; ++f) {
        const int other = expert_rows[f];
        rank += other > rows || (other == rows && f < e);
      }
      rank_order[rank] = e;
    }
  }
  __syncthreads();

  const int total_tiles = num_experts * tiles_per_expert;
  const int grid = static_cast<int>(gridDim.x), cta = static_cast<int>(blockIdx.x);
  // This CTA's j-th queue entry (the snake above); >= total_tiles: done.
  auto queue_entry = [&](int j) { return j * grid + ((j & 1) ? grid - 1 - cta : cta); };
  auto locate = [&](int entry) {
    const int slot = entry / tiles_per_expert;
    return LocateWeightGradTileAt(p, ranked ? rank_order[slot] : slot, entry % tiles_per_expert,
                                  kTileM, kTileN);
  };

  if (threadIdx.x >= kConsumerThreads) {
    if constexpr (Cfg::kMinBlocks == 1) ptx::setmaxnreg_dec<40>();
    if (threadIdx.x != kConsumerThreads) return;
    ptx::prefetch_tensormap(tmap_dy);
    if (p.dy2 != nullptr) ptx::prefetch_tensormap(tmap_dy2);
    ptx::prefetch_tensormap(tmap_x);
    int ring = 0;  // stages issued so far, over every tile
    for (int j = 0;; ++j) {
      const int entry = queue_entry(j);
      if (entry >= total_tiles) break;
      const WeightGradTile w = locate(entry);
      const CUtensorMap* tmap_a =
          entry % tiles_per_expert >= p.tiles_per_output ? tmap_dy2 : tmap_dy;
      for (int t0 = w.begin; t0 < w.end; t0 += kStepT, ++ring) {
        const int stage = ring % kStages;
        ptx::mbarrier_wait_parity(&empty_bar[stage], ((ring / kStages) & 1) ^ 1);
        uint8_t* dst = smem + stage * Cfg::kStageBytes;
        ptx::mbarrier_arrive_expect_tx(&full_bar[stage], Cfg::kStageBytes);
#pragma unroll
        for (int i = 0; i < Cfg::kDySubs; ++i)
          ptx::cp_async_bulk_tensor_2d_g2s(dst + i * kSubBytes, tmap_a, w.row0 + 64 * i, t0,
                                           &full_bar[stage]);
#pragma unroll
        for (int i = 0; i < Cfg::kXSubs; ++i)
          ptx::cp_async_bulk_tensor_2d_g2s(dst + (Cfg::kDySubs + i) * kSubBytes, tmap_x,
                                           w.col0 + 64 * i, t0, &full_bar[stage]);
      }
    }
  } else {
    if constexpr (Cfg::kMinBlocks == 1) ptx::setmaxnreg_inc<232>();
    const int consumer = threadIdx.x / 128;  // G rows consumer * 64 .. + 63 of the tile
    const int ctid = threadIdx.x;            // 0 .. 255 over both consumers
    const int lane = threadIdx.x % 32;
    int ring = 0;  // stages consumed so far, over every tile (as the producer's count)
    for (int j = 0;; ++j) {
      const int entry = queue_entry(j);
      if (entry >= total_tiles) break;
      const WeightGradTile w = locate(entry);
      if (w.end == w.begin && p.accumulate) continue;  // G_e stays as it is
      float acc[kTileN / 2];
#pragma unroll
      for (int i = 0; i < kTileN / 2; ++i) acc[i] = 0.f;
      int prev_stage = -1;
      for (int t0 = w.begin; t0 < w.end; t0 += kStepT, ++ring) {
        const int stage = ring % kStages;
        ptx::mbarrier_wait_parity(&full_bar[stage], (ring / kStages) & 1);
        uint8_t* st = smem + stage * Cfg::kStageBytes;
        const int valid = w.end - t0;
        if (valid < kStepT) ZeroStageRowsPastEnd<Cfg::kSubs>(st, valid, ctid);  // uniform
        const __nv_bfloat16* a_tile =
            reinterpret_cast<const __nv_bfloat16*>(st) + consumer * kSubElems;
        const __nv_bfloat16* b_tile =
            reinterpret_cast<const __nv_bfloat16*>(st) + Cfg::kDySubs * kSubElems;
        WeightGradWgmmaBatch<kTileN, kStepT>(acc, a_tile, b_tile, kSubBytes);
        ptx::wgmma_wait_group<1>();  // the previous stage's wgmmas are done
        if (prev_stage >= 0 && lane == 0) ptx::mbarrier_arrive(&empty_bar[prev_stage]);
        prev_stage = stage;
      }
      ptx::wgmma_wait_group<0>();
      // The tile's last stage back to the producer before the epilogue, so
      // the next tile's loads run under it.
      if (prev_stage >= 0 && lane == 0) ptx::mbarrier_arrive(&empty_bar[prev_stage]);
      AddWeightGradAccumulator<kTileN>(acc, p, w, w.row0 + consumer * 64);
    }
  }
}

// Two CTAs of 288 threads per SM (kTmaN128's tiling). 112 registers: the
// most they can have (18 warps x 32 x 112 <= 64 K); __launch_bounds__(288,
// 2) made ptxas stop at 96 and spill the queue's state.
template <typename Cfg>
__global__ void __maxnreg__(112)
    WeightGradTmaPersistent2Kernel(const __grid_constant__ CUtensorMap tmap_dy,
                                   const __grid_constant__ CUtensorMap tmap_dy2,
                                   const __grid_constant__ CUtensorMap tmap_x,
                                   const WeightGradParams p, int num_experts,
                                   int tiles_per_expert) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(Cfg::kMinBlocks == 2);
  WeightGradTmaPersistentBody<Cfg>(&tmap_dy, &tmap_dy2, &tmap_x, p, num_experts,
                                              tiles_per_expert);
#else
  __trap();  // built for a device without wgmma; the host never launches this
#endif
}

// One CTA of 384 threads per SM (kTma's tiling: the producer warpgroup
// gives its registers to the consumers' m64n256 accumulators).
template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    WeightGradTmaPersistent1Kernel(const __grid_constant__ CUtensorMap tmap_dy,
                                   const __grid_constant__ CUtensorMap tmap_dy2,
                                   const __grid_constant__ CUtensorMap tmap_x,
                                   const WeightGradParams p, int num_experts,
                                   int tiles_per_expert) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(Cfg::kMinBlocks == 1);
  WeightGradTmaPersistentBody<Cfg>(&tmap_dy, &tmap_dy2, &tmap_x, p, num_experts,
                                              tiles_per_expert);
#else
  __trap();  // built for a device without wgmma; the host never launches this
#endif
}

// The kernels' tensor maps: dY (and the second output's dY2, dY where there
// is none) [rows, n] and X [rows, k], in boxes of kStepT rows x 64 columns.
Status MakeTensorMaps(const GroupedWeightGradArgs& args, CUtensorMap* tmap_dy, CUtensorMap* tmap_dy2,
                      CUtensorMap* tmap_x) {
  const uint64_t rows = static_cast<uint64_t>(args.total_rows);
  GROVE_RETURN_IF_ERROR(
      ptx::MakeTensorMap2dBf16Swizzled(tmap_dy, args.dy, rows, args.n, args.n, kStepT, 64, 128));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(
      tmap_dy2, args.dy2 != nullptr ? args.dy2 : args.dy, rows, args.n, args.n, kStepT, 64, 128));
  return ptx::MakeTensorMap2dBf16Swizzled(tmap_x, args.x, rows, args.k, args.k, kStepT, 64, 128);
}

template <typename Cfg>
Status Launch(const GroupedWeightGradArgs& args, cudaStream_t stream) {
  CUtensorMap tmap_dy, tmap_dy2, tmap_x;
  GROVE_RETURN_IF_ERROR(MakeTensorMaps(args, &tmap_dy, &tmap_dy2, &tmap_x));
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

template <typename Cfg>
Status LaunchPersistent(const GroupedWeightGradArgs& args, cudaStream_t stream) {
  CUtensorMap tmap_dy, tmap_dy2, tmap_x;
  GROVE_RETURN_IF_ERROR(MakeTensorMaps(args, &tmap_dy, &tmap_dy2, &tmap_x));
  const auto kernel = [] {
    if constexpr (Cfg::kMinBlocks == 2) {
      return &WeightGradTmaPersistent2Kernel<Cfg>;
    } else {
      return &WeightGradTmaPersistent1Kernel<Cfg>;
    }
  }();
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
      "GroupedWeightGrad tma_persistent: shared memory attribute"));
  dim3 plain_grid;
  WeightGradParams params;
  GROVE_RETURN_IF_ERROR(MakeWeightGradLaunch(args, kTileM, Cfg::kTileN, &plain_grid, &params));
  const int64_t total_tiles = static_cast<int64_t>(plain_grid.x) * args.num_experts;
  if (total_tiles > INT32_MAX)
    return Status::InvalidArgument("GroupedWeightGrad tma_persistent: too many tiles");
  int dev = 0, sms = 0, per_sm = 0;
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&dev), "GroupedWeightGrad: device"));
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "GroupedWeightGrad: SMs"));
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads,
                                                    Cfg::kSmemBytes),
      "GroupedWeightGrad tma_persistent: occupancy"));
  const int64_t ctas = std::min<int64_t>(total_tiles, static_cast<int64_t>(sms) * std::max(per_sm, 1));
  if (ctas == 0) return Status::OK();  // no experts
  kernel<<<static_cast<unsigned>(ctas), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      tmap_dy, tmap_dy2, tmap_x, params, args.num_experts, static_cast<int>(plain_grid.x));
  return CudaStatus(cudaGetLastError(), "GroupedWeightGrad tma_persistent launch");
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
    case WeightGradImpl::kTmaPersistentRed:
      return LaunchPersistent<TmaTiling<128, 3, 2>>(args, stream);
    case WeightGradImpl::kTmaPersistentN256:
      return LaunchPersistent<TmaTiling<256, 4, 1>>(args, stream);
    default:
      return Status::Internal("GroupedWeightGrad tma: not a tma implementation");
  }
}

}  // namespace grove::kernels::detail
