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
// never stored. W is K-major or MN-major (GemmWeightLayout; WgmmaConfig
// says how each is loaded and described to wgmma).
#include <cuda.h>
#include <type_traits>
#include <cuda_bf16.h>


#include "kernels/grouped_gemm_internal.h"
#include "kernels/grouped_gemm_schedule.cuh"
#include "kernels/grouped_gemm_store.cuh"
#include "kernels/rope_math.cuh"
#include "kernels/vector_io.cuh"
#include "kernels/ptx/cluster.cuh"
#include "kernels/ptx/math.cuh"
#include "kernels/ptx/mbarrier.cuh"
#include "kernels/ptx/tensor_map.h"
#include "kernels/ptx/tma.cuh"
#include "kernels/ptx/wgmma.cuh"

namespace grove::kernels::detail {
namespace {

constexpr int kBlockM = 128;
constexpr int kThreads = 384;

// BK is one swizzle span of bf16: 64 (128-byte swizzle) or 32 (64-byte).
// W_MN: the weights are kMnMajor ([k, n] per expert). A stage's W tile is
// then BN / 64 TMA boxes of [BK k rows][64 n] (128-byte swizzled, so rows of
// 64 n along consecutive k: wgmma's MN-major SW128 layout, the one the
// weight-gradient kernels feed it), read through a 3-D tensor map (n, k,
// expert) so that k rows past an expert's k read zeros, never the next
// expert's rows or the gap between them (0 * NaN would be NaN).
template <int BN, int BK, int STAGES, bool W_MN = false>
struct WgmmaConfig {
  static constexpr int kBlockN = BN;
  static constexpr int kBlockK = BK;
  static constexpr int kStages = STAGES;
  static constexpr int kSwizzleBytes = BK * 2;
  static constexpr int kABytes = kBlockM * kBlockK * 2;
  static constexpr int kBBytes = BN * kBlockK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  // stages, then full/empty (and ping-pong turn) barriers, then the tile table.
  static constexpr int kBarrierOffset = kStages * kStageBytes;
  static constexpr int kPrefixOffset = kBarrierOffset + (2 * kStages + 2) * 8;
  static constexpr int kTableEnd = kPrefixOffset + (kMaxExperts + 1) * 4;
  static constexpr int kSmemBytes = kTableEnd + 1024;  // + align slack
  static constexpr bool kWMnMajor = W_MN;
  static constexpr uint32_t kWBoxBytes = BK * 128;  // one [BK][64] box of an MN-major W tile
  static_assert(BK == 64 || BK == 32);
  static_assert(!W_MN || BK == 64, "MN-major W tiles are built and tested with BK = 64 only");
  static_assert(kWBoxBytes % 1024 == 0, "each box starts a 1024-byte swizzle atom");
  static_assert(kSmemBytes <= 227 * 1024);
  // A K-major tile (A, or W when !W_MN) at p, k offset included.
  static __device__ __forceinline__ uint64_t Desc(const void* p) {
    if constexpr (BK == 64) {
      return ptx::make_wgmma_desc_k_sw128(p);
    } else {
      return ptx::make_wgmma_desc_k_sw64(p);
    }
  }
  // The W tile's 16-wide k slice kk: 16 elements along a K-major row, or 16
  // rows (two swizzle atoms) of every MN-major box, the boxes kWBoxBytes
  // apart (the descriptor's leading byte offset).
  static __device__ __forceinline__ uint64_t DescW(const __nv_bfloat16* w_tile, int kk) {
    if constexpr (W_MN) {
      return ptx::make_wgmma_desc_mn_sw128(w_tile + kk * 16 * 64, kWBoxBytes);
    } else {
      return Desc(w_tile + kk * 16);
    }
  }
  // d (+)= A_slice W_slice^T (or A_slice B_slice) for one k slice, N columns.
  template <int N>
  static __device__ __forceinline__ void Mma(float (&d)[N / 2], uint64_t desc_a,
                                             uint64_t desc_w, int accumulate) {
    static_assert(N == 128 || N == 256);
    if constexpr (N == 256 && W_MN) {
      ptx::wgmma_m64n256k16_f32_bf16_ss_bmn(d, desc_a, desc_w, accumulate);
    } else if constexpr (N == 256) {
      ptx::wgmma_m64n256k16_f32_bf16_ss(d, desc_a, desc_w, accumulate);
    } else if constexpr (W_MN) {
      ptx::wgmma_m64n128k16_f32_bf16_ss_bmn(d, desc_a, desc_w, accumulate);
    } else {
      ptx::wgmma_m64n128k16_f32_bf16_ss(d, desc_a, desc_w, accumulate);
    }
  }
  // MN-major: the boxes of the column block starting at col_begin that
  // hold a column < n. The others are not loaded: they would only feed
  // accumulator columns past n, which are never stored, so their stale
  // shared memory is harmless (a column of A B depends on B's column only).
  static __device__ __forceinline__ int WBoxes(int n, int col_begin) {
    return min(BN / 64, (n - col_begin + 63) / 64);
  }
  // The bytes a stage's TMA loads bring for this column block.
  static __device__ __forceinline__ uint32_t StageBytes(int n, int col_begin) {
    if constexpr (W_MN) {
      return kABytes + WBoxes(n, col_begin) * kWBoxBytes;
    } else {
      return kStageBytes;
    }
  }
  // Issues the TMA of k block kb of `expert`'s W tile for output columns
  // col_begin .. + BN into dst, completing on bar (StageBytes - kABytes).
  static __device__ __forceinline__ void LoadW(uint8_t* dst, const CUtensorMap* tmap_w,
                                               int expert, int w_expert_rows, int n,
                                               int col_begin, int kb, uint64_t* bar) {
    if constexpr (W_MN) {
      const int boxes = WBoxes(n, col_begin);
      for (int j = 0; j < boxes; ++j)
        ptx::cp_async_bulk_tensor_3d_g2s(dst + j * kWBoxBytes, tmap_w, col_begin + 64 * j,
                                         kb * BK, expert, bar);
    } else {
      ptx::cp_async_bulk_tensor_2d_g2s(dst, tmap_w, kb * BK, expert * w_expert_rows + col_begin,
                                       bar);
    }
  }
};

// The log-prob head epilogue's outputs (GroupedGemmArgs::logit_block_stats
// and the rest).
struct LogitStatsOut {
  float2* block_stats = nullptr;
  const int32_t* targets = nullptr;  // null: no target logits
  float* target_logit = nullptr;
};

// The log-prob head epilogue on one warp's share of an m64nN accumulator
// (N = 2 kRegs: rows row0 + lane/4 (+8), columns col0 .. col0 + N - 1,
// N / 128 logit blocks, since tiles start at multiples of 128): per row and
// block the max m and the sum of exp(z - m) over its columns < n, reduced
// over the 4 lanes of a quad that hold the row; the target's fp32 z from
// the lane that holds it; then the accumulator becomes u = z - m (columns
// >= n: -inf, never stored) for the caller's bf16 store. The quad shuffles
// run on every lane (rows past rows_valid included) and only the writes
// are masked.
template <int kRegs>
__device__ __forceinline__ void LogitStatsEpilogue(float (&acc)[kRegs], int n, int64_t row0,
                                                   int rows_valid, int col0,
                                                   const LogitStatsOut& out) {
  static_assert(kRegs % 64 == 0, "whole 128-column logit blocks");
  constexpr int kGroups = kRegs / 4;  // 8-column groups
  constexpr float kLog2e = 1.4426950408889634f;
  const int lane = threadIdx.x % 32;
  const int q = lane % 4;
  const int blocks = (n + kLogitBlockColumns - 1) / kLogitBlockColumns;  // LogitBlocks(n), host-only
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = lane / 4 + 8 * h;
    const bool row_ok = r < rows_valid;
    const int64_t row = row0 + r;
    if (out.targets != nullptr && row_ok) {
      // Lane q holds columns 8 g + 2 q + e (e = 0, 1) of the tile: only the
      // lane that holds the target walks its registers, storing from the one
      // that matches (a select chain over them made nvcc index the
      // registers, moving the accumulators to local memory).
      const int t = __ldg(out.targets + row);
      const int rel = t < n ? t - col0 - 2 * q : -1;
      if (rel >= 0 && rel < 8 * kGroups && rel % 8 < 2) {
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (rel == 8 * g + e) out.target_logit[row] = acc[4 * g + 2 * h + e];
          }
        }
      }
    }
#pragma unroll
    for (int jb = 0; jb < kGroups / 16; ++jb) {
      const int block_col0 = col0 + jb * kLogitBlockColumns;
      // Two max and four sum chains: the consumer warps are few (2 per
      // scheduler), so the epilogue needs instruction-level parallelism.
      float m2[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int g = 16 * jb; g < 16 * jb + 16; ++g) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& z = acc[4 * g + 2 * h + e];
          if (col0 + 8 * g + 2 * q + e >= n) z = -INFINITY;
          m2[e] = fmaxf(m2[e], z);
        }
      }
      float m = fmaxf(m2[0], m2[1]);
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      float s4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int g = 16 * jb; g < 16 * jb + 16; ++g) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& z = acc[4 * g + 2 * h + e];
          z -= m;
          s4[(2 * g + e) % 4] += ptx::ex2_approx_ftz_f32(z * kLog2e);
        }
      }
      float sum = (s4[0] + s4[1]) + (s4[2] + s4[3]);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      // A block wholly past n (a 256-wide tile's second half) writes nothing.
      if (q == 0 && row_ok && block_col0 < n)
        out.block_stats[row * blocks + block_col0 / kLogitBlockColumns] = make_float2(m, sum);
    }
  }
}

template <typename Cfg, typename OutT, bool kLogitStats = false>
__global__ void __launch_bounds__(kThreads, 1)
    GroupedGemmWgmmaKernel(const __grid_constant__ CUtensorMap tmap_a,
                           const __grid_constant__ CUtensorMap tmap_w,
                           const int32_t* __restrict__ offsets, int num_experts, int total_rows,
                           int n, int k, int w_expert_rows, OutT* __restrict__ c,
                           LogitStatsOut logit_out = {}, bool rows_fastest = false) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = Cfg::kBlockN;
  constexpr int kBlockK = Cfg::kBlockK;
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
                                       n_tiles, expert_hint, rows_fastest);
        for (int kb = 0; kb < k_blocks; ++kb) {
          ptx::mbarrier_wait_parity(&empty_bar[stage], phase ^ 1);
          uint8_t* a_dst = smem + stage * Cfg::kStageBytes;
          uint8_t* w_dst = a_dst + Cfg::kABytes;
          ptx::mbarrier_arrive_expect_tx(&full_bar[stage], Cfg::StageBytes(n, t.col_begin));
          ptx::cp_async_bulk_tensor_2d_g2s(a_dst, &tmap_a, kb * kBlockK, t.row_begin,
                                           &full_bar[stage]);
          Cfg::LoadW(w_dst, &tmap_w, t.expert, w_expert_rows, n, t.col_begin, kb,
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
                                     n_tiles, expert_hint, rows_fastest);
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
          const int accumulate = (kb > 0 || kk > 0) ? 1 : 0;
          Cfg::template Mma<BN>(acc, Cfg::Desc(a_tile + kk * 16), Cfg::DescW(w_tile, kk),
                                accumulate);
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

      // Epilogue: this warp's 16 rows of the consumer's 64 x BN block.
      const int row_off = consumer * 64 + warp_in_group * 16;
      if constexpr (kLogitStats) {
        LogitStatsEpilogue(acc, n, static_cast<int64_t>(t.row_begin) + row_off, t.rows - row_off,
                           t.col_begin, logit_out);
      }
      StoreWgmmaAccumulator(acc, c, n, static_cast<int64_t>(t.row_begin) + row_off,
                            t.rows - row_off, t.col_begin);
    }
  }
#else
  __trap();  // built for a device without wgmma; the host never launches this
#endif
}

// The staged-epilogue variant (bf16 output): the cooperative kernel, but
// the consumers only dump their accumulators as bf16 into a padded
// shared-memory tile and go straight on to the next tile's main loop; warps
// 1-3 of the producer warpgroup (idle otherwise) copy that tile to global
// memory in 16-byte, row-contiguous stores, masking rows past the expert's
// end. "c_full" (256 consumer arrivals) hands the tile to the storers,
// "c_empty" (96 storer arrivals) hands the buffer back. The ring is 3 stages
// deep to make room for the 66 KB tile.
//
// kSwiGluBwd (GroupedGemmArgs::swiglu_bwd_ab), run on 128 x 128 tiles with
// a 4-stage ring: the consumers dump dh in fp32 instead (70 KB at BN = 128;
// a 128 x 256 fp32 tile would leave no room for a ring), and the storers
// compute the SwiGLU backward from it and the forward's a, b, meant to
// overlap the epilogue's extra global traffic with the tensor cores like
// the plain store. With the 3 storer warps and the IEEE sigmoid it was
// slower (H100, kernel_bench --dx-swiglu, the model's w2 shape: 0.88 ms
// against 0.67 for the GEMM and SwiGluBackwardPacked apart: the storers,
// not the main loop, set the pace; prefetching the next tile's a, b into
// L2 did not help, 0.93 / 1.07 ms). It now runs a fourth warpgroup of
// storers (224 in all, StagedStorers) at 128 registers a thread, and the
// fast sigmoid: 0.50 ms. The consumers' code is the same but for the dump.
constexpr int kStorers = 96;
static_assert(kStorers % 8 == 0, "StoreSwiGluBwdTile's bank spread needs whole 8-lane groups");

// The staged-epilogue kernel's output tile, after the tile table: bf16
// rows padded by 16 bytes against bank conflicts; fp32 ones (kSwiGluBwd) by
// 32, so that the 4 rows of each half-warp's 8-byte dump stores and the 8
// chunks of each quarter-warp's 16-byte storer loads hit distinct banks.
template <typename Cfg, bool kSwiGluBwd = false>
struct StagedTile {
  static constexpr int kPitchBytes = kSwiGluBwd ? Cfg::kBlockN * 4 + 32 : Cfg::kBlockN * 2 + 16;
  static constexpr int kOffset = (Cfg::kTableEnd + 127) / 128 * 128;
  static constexpr int kSmemBytes = kOffset + kBlockM * kPitchBytes + 1024;
};

// The gated SwiGLU backward's extra operands (GroupedGemmArgs::
// swiglu_bwd_slot_of_row and the rest); slot_of_row null: ungated.
struct SwiGluBwdGate {
  const int32_t* slot_of_row = nullptr;
  const float* slot_gates = nullptr;
  __nv_bfloat16* h_gated = nullptr;
  float* dgate_partial = nullptr;
};

// One step of a storer's work in the SwiGLU epilogue: kUnroll chunks of 8
// columns of a row (16 bytes of each bf16 operand), kStorers chunks apart;
// ok[u]: chunk u exists (a row of the tile, a column < n).
template <int kUnroll>
struct SwiGluBwdBatch {
  uint4 a[kUnroll], b[kUnroll];
  float gate[kUnroll];  // gated: the row's gate, loaded with a and b
  bool ok[kUnroll];
};

template <int BN, int kUnroll, int kNumStorers>
__device__ __forceinline__ SwiGluBwdBatch<kUnroll> LoadSwiGluBwdBatch(
    const __nv_bfloat16* __restrict__ ab, int n, const TileCoord& t, int base, const SwiGluBwdGate& gate) {
  constexpr int kChunksPerRow = BN / 8;
  SwiGluBwdBatch<kUnroll> batch;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int idx = base + u * kNumStorers;
    const int col = t.col_begin + idx % kChunksPerRow * 8;
    batch.ok[u] = idx < t.rows * kChunksPerRow && col < n;
    batch.gate[u] = 0.f;
    if (batch.ok[u]) {
      const int64_t row = t.row_begin + idx / kChunksPerRow;
      const __nv_bfloat16* p = ab + row * 2 * int64_t{n} + col;
      batch.a[u] = __ldg(reinterpret_cast<const uint4*>(p));
      batch.b[u] = __ldg(reinterpret_cast<const uint4*>(p + n));
      // Two dependent loads, a step ahead of their use like a and b.
      if (gate.slot_of_row != nullptr) batch.gate[u] = __ldg(gate.slot_gates + __ldg(gate.slot_of_row + row));
    }
  }
  return batch;
}

// The SwiGLU epilogue's storers on one tile: dh (fp32, the consumers' dump
// in c_tile) and the forward's a, b (ab) give da, db into c ([rows, 2n]
// like ab); a warp's 16-byte accesses cover 2 rows' 256 contiguous bytes.
// The global loads run one step ahead of the math (the first step's before
// wait_for_dh(), which returns once the consumers' dump is complete): they
// do not depend on dh. Rows past the expert's end and columns past n are
// not touched. Gated (gate.slot_of_row set): dh is ungated; da, db are of
// gate * dh, h_gated gets gate * h, and each row's <dh, h> over the tile's
// columns -- summed over a chunk's 8, then over the half-warp that holds
// the row's 16 chunks (BN = 128), in a fixed order -- goes to
// dgate_partial[row, col_begin / 128]. Measured (H100, the model's w2
// shape, kernel_bench --dx-swiglu): 0.66-0.68 ms against 0.75 for the GEMM
// and SwiGluBackwardGated apart with 7 storer warps; 0.98 with 3.
template <int BN, int kPitch, int kNumStorers, typename WaitForDh>
__device__ __forceinline__ void StoreSwiGluBwdTile(const uint8_t* c_tile,
                                                   const __nv_bfloat16* __restrict__ ab,
                                                   __nv_bfloat16* __restrict__ c, int n,
                                                   const TileCoord& t, int sid,
                                                   const SwiGluBwdGate& gate,
                                                   WaitForDh&& wait_for_dh) {
  constexpr int kChunksPerRow = BN / 8;
  constexpr int kUnroll = 4;
  constexpr int kStep = kNumStorers * kUnroll;
  static_assert(kChunksPerRow == 16, "a row's chunks are one half-warp");
  static_assert(kNumStorers % 32 == 0, "whole storer warps");
  const int chunks = t.rows * kChunksPerRow;
  const int64_t ld = 2 * int64_t{n};
  const bool gated = gate.slot_of_row != nullptr;
  const int partials = (n + 127) / 128;
  const int lane = sid % 32;
  SwiGluBwdBatch<kUnroll> cur = LoadSwiGluBwdBatch<BN, kUnroll, kNumStorers>(ab, n, t, sid, gate);
  wait_for_dh();
  // Gated, the loop runs while any lane of the warp has a chunk (the
  // half-warp sums need every lane).
  for (int base = sid; (gated ? base - lane : base) < chunks; base += kStep) {
    const SwiGluBwdBatch<kUnroll> next =
        LoadSwiGluBwdBatch<BN, kUnroll, kNumStorers>(ab, n, t, base + kStep, gate);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = base + u * kNumStorers;
      const int r = idx / kChunksPerRow, ch = idx % kChunksPerRow;
      float dot = 0.f;
      if (cur.ok[u]) {
        // dh's 8 values are two 16-byte halves. The 8 lanes of a wavefront
        // hold 8 consecutive chunks of one row (kStorers and the step are
        // multiples of 8); chunks 4-7 of them read their second half first,
        // so each load's 8 lanes cover all 32 banks once.
        const float* dh_row = reinterpret_cast<const float*>(c_tile + r * kPitch) + ch * 8;
        const int first = ch & 4;
        const float4 x = *reinterpret_cast<const float4*>(dh_row + first);
        const float4 y = *reinterpret_cast<const float4*>(dh_row + (4 - first));
        const float4 lo = first ? y : x, hi = first ? x : y;
        const float dh[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&cur.a[u]);
        const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&cur.b[u]);
        const int64_t row = t.row_begin + r;
        const int col = t.col_begin + ch * 8;
        float da[8], db[8];
        if (gated) {
          const float g = cur.gate[u];
          float hg[8];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 av = __bfloat1622float2(a2[i]), bv = __bfloat1622float2(b2[i]);
            const float h0 = SwiGluForwardElement(av.x, bv.x), h1 = SwiGluForwardElement(av.y, bv.y);
            dot = fmaf(dh[2 * i], h0, dot);
            dot = fmaf(dh[2 * i + 1], h1, dot);
            hg[2 * i] = g * h0;
            hg[2 * i + 1] = g * h1;
            SwiGluBackwardElement(g * dh[2 * i], av.x, bv.x, da[2 * i], db[2 * i]);
            SwiGluBackwardElement(g * dh[2 * i + 1], av.y, bv.y, da[2 * i + 1], db[2 * i + 1]);
          }
          StoreBf16x8Global(gate.h_gated + row * n + col, hg);
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 av = __bfloat1622float2(a2[i]), bv = __bfloat1622float2(b2[i]);
            SwiGluBackwardElement(dh[2 * i], av.x, bv.x, da[2 * i], db[2 * i]);
            SwiGluBackwardElement(dh[2 * i + 1], av.y, bv.y, da[2 * i + 1], db[2 * i + 1]);
          }
        }
        __nv_bfloat16* out = c + row * ld + col;
        StoreBf16x8Global(out, da);
        StoreBf16x8Global(out + n, db);
      }
      if (gated) {
#pragma unroll
        for (int off = 8; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (ch == 0 && idx < chunks)
          gate.dgate_partial[(t.row_begin + r) * int64_t{partials} + t.col_begin / 128] = dot;
      }
    }
    cur = next;
  }
}

// The rotary-embedding epilogue's operands (GroupedGemmArgs::rope_table
// and the rest); table null: none.
struct RopeEpilogue {
  const float2* table = nullptr;
  const int32_t* positions = nullptr;
  int columns = 0;
};

// The plain staged tile's storers with the rotary embedding
// (GroupedGemmArgs::rope_table, kRope below): a unit is one row's chunk j
// (8 columns) of x_i and chunk j + 8 of x_{i+64}, i = 8 j .. 8 j + 7, in
// every 128-column head of the dumped bf16 tile; the unit's 8 (cos, sin)
// pairs are read once for all of the tile's heads (they depend on the row's
// position only), one unit ahead of their use (they come from L2: with the
// reads waited for in turn the storers set the pace). Heads starting at or
// past rope.columns are stored as they are. The rotation is RopeForward's
// (RotatePair, kernels/rope_math.cuh) on the same bf16 values with the same
// fp32 cosines and sines, so C gets the bits RopeForward would leave. A
// quarter-warp's 8 units are one row's 8 chunks: each 16-byte read of the
// quarter covers 128 contiguous bytes of the row.
struct RopeUnitAngles {
  float4 cs[4];  // (cos, sin) of pairs 2p, 2p + 1
};

__device__ __forceinline__ RopeUnitAngles LoadRopeAngles(const RopeEpilogue& rope, const TileCoord& t, int idx,
                                                         int units) {
  RopeUnitAngles angles;
  if (idx < units) {
    const int64_t row = t.row_begin + idx / 8;
    const float4* cs =
        reinterpret_cast<const float4*>(rope.table + int64_t{__ldg(rope.positions + row)} * 64 + 8 * (idx % 8));
#pragma unroll
    for (int p = 0; p < 4; ++p) angles.cs[p] = __ldg(cs + p);
  }
  return angles;
}

template <int BN, int kPitch>
__device__ __forceinline__ void StoreRopeTile(const uint8_t* c_tile, __nv_bfloat16* __restrict__ c, int n,
                                              const TileCoord& t, int sid, const RopeEpilogue& rope) {
  constexpr int kHead = 128, kHalf = 64;
  const int units = t.rows * 8;
  RopeUnitAngles cur = LoadRopeAngles(rope, t, sid, units);
  for (int idx = sid; idx < units; idx += kStorers) {
    const RopeUnitAngles next = LoadRopeAngles(rope, t, idx + kStorers, units);
    const int r = idx / 8, j = idx % 8;
    const int64_t row = t.row_begin + r;
#pragma unroll 1
    for (int hh = 0; hh < BN / kHead; ++hh) {
      const int col_lo = hh * kHead + 8 * j;  // in the tile
      if (t.col_begin + col_lo >= n) continue;
      uint4 lo = *reinterpret_cast<const uint4*>(c_tile + r * kPitch + col_lo * 2);
      uint4 hi = *reinterpret_cast<const uint4*>(c_tile + r * kPitch + (col_lo + kHalf) * 2);
      if (t.col_begin + hh * kHead < rope.columns) {
        __nv_bfloat162* a2 = reinterpret_cast<__nv_bfloat162*>(&lo);
        __nv_bfloat162* b2 = reinterpret_cast<__nv_bfloat162*>(&hi);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const float4 w = cur.cs[p];
          const float2 a = __bfloat1622float2(a2[p]);
          const float2 b = __bfloat1622float2(b2[p]);
          float x0, y0, x1, y1;
          RotatePair(a.x, b.x, w.x, w.y, x0, y0);
          RotatePair(a.y, b.y, w.z, w.w, x1, y1);
          a2[p] = __floats2bfloat162_rn(x0, x1);
          b2[p] = __floats2bfloat162_rn(y0, y1);
        }
      }
      __nv_bfloat16* out = c + row * n + t.col_begin + col_lo;
      *reinterpret_cast<uint4*>(out) = lo;
      *reinterpret_cast<uint4*>(out + kHalf) = hi;
    }
    cur = next;
  }
}

// The SwiGLU forward epilogue's storers on one tile (kSwiGluFwd below):
// the dumped bf16 tile holds a in chunks 0..BN/16-1 of each row and b of
// the same features in BN/16..BN/8-1. A storer takes one 8-feature chunk
// pair: a to c[row, feature], b to c[row, f + feature] (c is [rows, 2f]),
// h to h_out[row, feature]; a quarter-warp's 8 pairs are one row's 128
// contiguous smem bytes of each half (no bank conflicts) and a warp's
// stores cover 2 rows' 256 contiguous bytes of each output. h is computed
// from the bf16 a and b as SwiGluForwardPacked does (swiglu.cu: bf16 ->
// fp32, SwiGluForwardElement, round to bf16), so its bits match it. The
// sigmoid's division is the fast one (swiglu_math.cuh): with the IEEE
// division the storers set the pace (0.92-0.95 ms against 0.81 for the GEMM
// and SwiGluForwardPacked apart, H100), with it they keep up (0.64).
template <int BN, int kPitch>
__device__ __forceinline__ void StoreSwiGluFwdTile(const uint8_t* c_tile,
                                                   __nv_bfloat16* __restrict__ c,
                                                   __nv_bfloat16* __restrict__ h_out, int f,
                                                   const TileCoord& t, int sid) {
  constexpr int kPairsPerRow = BN / 16;
  for (int idx = sid; idx < t.rows * kPairsPerRow; idx += kStorers) {
    const int r = idx / kPairsPerRow, ch = idx % kPairsPerRow;
    const int feature = t.col_begin + ch * 8;
    if (feature >= f) continue;
    const uint4 av = *reinterpret_cast<const uint4*>(c_tile + r * kPitch + ch * 16);
    const uint4 bv =
        *reinterpret_cast<const uint4*>(c_tile + r * kPitch + (kPairsPerRow + ch) * 16);
    const int64_t row = t.row_begin + r;
    __nv_bfloat16* out = c + row * 2 * f + feature;
    *reinterpret_cast<uint4*>(out) = av;
    *reinterpret_cast<uint4*>(out + f) = bv;
    const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&av);
    const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&bv);
    uint32_t hw[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = __bfloat1622float2(a2[i]), b = __bfloat1622float2(b2[i]);
      const __nv_bfloat162 h2 =
          __floats2bfloat162_rn(SwiGluForwardElement(a.x, b.x), SwiGluForwardElement(a.y, b.y));
      hw[i] = *reinterpret_cast<const uint32_t*>(&h2);
    }
    *reinterpret_cast<uint4*>(h_out + row * f + feature) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
  }
}

// kSwiGluFwd (GroupedGemmArgs::swiglu_out; K-major W, bf16 out): the
// schedule tiles the f = n / 2 features in blocks of BN / 2, and a stage's
// W tile is two [BN / 2][BK] boxes, w1's rows of the block's features then
// w3's (tmap_w's box is BN / 2 rows), so accumulator columns 0..BN/2-1 are
// a and BN/2.. are b of the same features. The consumers' dump is the
// plain one (bf16); the storers write a and b where the unfused GEMM
// would (C columns feature and f + feature) and h = silu(a) * b from those
// bf16 values into h_out ([rows, f]), the arithmetic of
// SwiGluForwardPacked. Features past f (a partial last block) are computed
// from w3's rows or the rows past them and never stored.
// The SwiGLU backward's storers set its pace (docs/kernels.md): it runs a
// fourth warpgroup of storers (7 storer warps, not 3) at 128 registers a
// thread, which its 128 x 128 tiles' consumers (64 accumulators) can spare.
template <bool kSwiGluBwd>
__host__ __device__ constexpr int StagedThreads() { return kSwiGluBwd ? 512 : kThreads; }
template <bool kSwiGluBwd>
__host__ __device__ constexpr int StagedStorers() { return kSwiGluBwd ? 224 : kStorers; }

template <typename Cfg, bool kSwiGluBwd, bool kSwiGluFwd = false, bool kRope = false>
__global__ void __launch_bounds__(StagedThreads<kSwiGluBwd>(), 1)
    GroupedGemmWgmmaStagedKernel(const __grid_constant__ CUtensorMap tmap_a,
                                 const __grid_constant__ CUtensorMap tmap_w,
                                 const int32_t* __restrict__ offsets, int num_experts,
                                 int total_rows, int n, int k, int w_expert_rows,
                                 __nv_bfloat16* __restrict__ c,
                                 const __nv_bfloat16* __restrict__ ab,
                                 __nv_bfloat16* __restrict__ h_out, SwiGluBwdGate gate,
                                 RopeEpilogue rope = {}) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(int{kSwiGluBwd} + int{kSwiGluFwd} + int{kRope} <= 1);
  static_assert(!kSwiGluFwd || !Cfg::kWMnMajor, "the SwiGLU forward reads K-major w1|w3");
  constexpr int BN = Cfg::kBlockN;
  // Columns of the schedule's blocks: C's, or (kSwiGluFwd) features.
  constexpr int kTileCols = kSwiGluFwd ? BN / 2 : BN;
  const int sched_cols = kSwiGluFwd ? n / 2 : n;
  constexpr int kBlockK = Cfg::kBlockK;
  constexpr int kPitch = StagedTile<Cfg, kSwiGluBwd>::kPitchBytes;
  constexpr int kChunksPerRow = BN * 2 / 16;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Cfg::kBarrierOffset);
  uint64_t* empty_bar = full_bar + Cfg::kStages;
  uint64_t* c_full = empty_bar + Cfg::kStages;
  uint64_t* c_empty = c_full + 1;
  int* tile_prefix = reinterpret_cast<int*>(smem + Cfg::kPrefixOffset);
  uint8_t* c_tile = smem + StagedTile<Cfg, kSwiGluBwd>::kOffset;

  const int warpgroup = threadIdx.x / 128;
  const int n_tiles = (sched_cols + kTileCols - 1) / kTileCols;
  const int k_blocks = (k + kBlockK - 1) / kBlockK;

  if (threadIdx.x == 0) {
    ptx::prefetch_tensormap(&tmap_a);
    ptx::prefetch_tensormap(&tmap_w);
    for (int s = 0; s < Cfg::kStages; ++s) {
      ptx::mbarrier_init(&full_bar[s], 1);
      ptx::mbarrier_init(&empty_bar[s], 8);
    }
    ptx::mbarrier_init(c_full, 256);
    ptx::mbarrier_init(c_empty, StagedStorers<kSwiGluBwd>());
    ptx::fence_mbarrier_init();
  }
  if (threadIdx.x / 32 == 1) {
    BuildTilePrefix(offsets, num_experts, total_rows, kBlockM, n_tiles, tile_prefix);
  }
  __syncthreads();
  const int total_tiles = tile_prefix[num_experts];

  if (warpgroup == 0 || warpgroup == 3) {
    // The plain kernel moves registers to the consumers' 128 accumulators;
    // the SwiGLU one keeps the even split (168 each): its consumers hold 64,
    // its storers the loads in flight. kSwiGluFwd: the storers' h math gets
    // 56 (it spilled at 40 with the IEEE division); with the consumers' 224
    // the total stays 3 x 168.
    if constexpr (kRope) {  // a unit's angles a step ahead
      ptx::setmaxnreg_dec<80>();
    } else if constexpr (kSwiGluFwd) {
      ptx::setmaxnreg_dec<56>();
    } else if constexpr (!kSwiGluBwd) {
      ptx::setmaxnreg_dec<40>();
    }
    int expert_hint = 0;
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        const TileCoord t = LocateTile(tile, tile_prefix, offsets, total_rows, kBlockM, kTileCols,
                                       n_tiles, expert_hint);
        for (int kb = 0; kb < k_blocks; ++kb) {
          ptx::mbarrier_wait_parity(&empty_bar[stage], phase ^ 1);
          uint8_t* a_dst = smem + stage * Cfg::kStageBytes;
          uint8_t* w_dst = a_dst + Cfg::kABytes;
          ptx::mbarrier_arrive_expect_tx(&full_bar[stage], Cfg::StageBytes(n, t.col_begin));
          ptx::cp_async_bulk_tensor_2d_g2s(a_dst, &tmap_a, kb * kBlockK, t.row_begin,
                                           &full_bar[stage]);
          if constexpr (kSwiGluFwd) {
            const int w1_row = t.expert * w_expert_rows + t.col_begin;
            ptx::cp_async_bulk_tensor_2d_g2s(w_dst, &tmap_w, kb * kBlockK, w1_row,
                                             &full_bar[stage]);
            ptx::cp_async_bulk_tensor_2d_g2s(w_dst + Cfg::kBBytes / 2, &tmap_w, kb * kBlockK,
                                             w1_row + sched_cols, &full_bar[stage]);
          } else {
            Cfg::LoadW(w_dst, &tmap_w, t.expert, w_expert_rows, n, t.col_begin, kb,
                       &full_bar[stage]);
          }
          if (++stage == Cfg::kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    } else if (threadIdx.x >= 32) {
      // storers 0..95 in warpgroup 0, 96.. in warpgroup 3 (kSwiGluBwd)
      const int sid = warpgroup == 0 ? threadIdx.x - 32 : threadIdx.x - 3 * 128 + kStorers;
      uint32_t j = 0;
      for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x, ++j) {
        const TileCoord t = LocateTile(tile, tile_prefix, offsets, total_rows, kBlockM, kTileCols,
                                       n_tiles, expert_hint);
        if constexpr (kSwiGluFwd) {
          ptx::mbarrier_wait_parity(c_full, j & 1);
          StoreSwiGluFwdTile<BN, kPitch>(c_tile, c, h_out, sched_cols, t, sid);
        } else if constexpr (kSwiGluBwd) {
          StoreSwiGluBwdTile<BN, kPitch, StagedStorers<kSwiGluBwd>()>(c_tile, ab, c, n, t, sid, gate,
                                         [&] { ptx::mbarrier_wait_parity(c_full, j & 1); });
        } else if (kRope && t.col_begin < rope.columns) {
          ptx::mbarrier_wait_parity(c_full, j & 1);
          StoreRopeTile<BN, kPitch>(c_tile, c, n, t, sid, rope);
        } else {
          ptx::mbarrier_wait_parity(c_full, j & 1);
          for (int idx = sid; idx < t.rows * kChunksPerRow; idx += kStorers) {
            const int r = idx / kChunksPerRow, ch = idx % kChunksPerRow;
            const int col = t.col_begin + ch * 8;
            if (col < n) {
              const uint4 v = *reinterpret_cast<const uint4*>(c_tile + r * kPitch + ch * 16);
              *reinterpret_cast<uint4*>(c + static_cast<int64_t>(t.row_begin + r) * n + col) = v;
            }
          }
        }
        ptx::mbarrier_arrive(c_empty);
      }
    }
  } else {
    if constexpr (kRope) {
      ptx::setmaxnreg_inc<208>();
    } else if constexpr (kSwiGluFwd) {
      ptx::setmaxnreg_inc<224>();
    } else if constexpr (!kSwiGluBwd) {
      ptx::setmaxnreg_inc<232>();
    }
    const int consumer = warpgroup - 1;
    const int warp_in_group = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    int stage = 0;
    uint32_t phase = 0;
    int expert_hint = 0;
    uint32_t j = 0;
    float acc[BN / 2];
    for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x, ++j) {
      LocateTile(tile, tile_prefix, offsets, total_rows, kBlockM, kTileCols, n_tiles,
                 expert_hint);
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
          const int accumulate = (kb > 0 || kk > 0) ? 1 : 0;
          Cfg::template Mma<BN>(acc, Cfg::Desc(a_tile + kk * 16), Cfg::DescW(w_tile, kk),
                                accumulate);
        }
        ptx::wgmma_commit_group();
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

      // Dump: the previous tile must have left the buffer. Rows 528 bytes
      // apart put the 8 rows x 4 lanes of each store in 32 distinct banks
      // (fp32: 544 bytes, each half-warp's 4 rows x 4 lanes).
      if (j > 0) ptx::mbarrier_wait_parity(c_empty, (j - 1) & 1);
      const int r0 = consumer * 64 + warp_in_group * 16 + lane / 4;
#pragma unroll
      for (int i = 0; i < BN / 2; i += 4) {
        const int col = 8 * (i / 4) + 2 * (lane % 4);
        if constexpr (kSwiGluBwd) {
          *reinterpret_cast<float2*>(c_tile + r0 * kPitch + col * 4) =
              make_float2(acc[i], acc[i + 1]);
          *reinterpret_cast<float2*>(c_tile + (r0 + 8) * kPitch + col * 4) =
              make_float2(acc[i + 2], acc[i + 3]);
        } else {
          *reinterpret_cast<__nv_bfloat162*>(c_tile + r0 * kPitch + col * 2) =
              __floats2bfloat162_rn(acc[i], acc[i + 1]);
          *reinterpret_cast<__nv_bfloat162*>(c_tile + (r0 + 8) * kPitch + col * 2) =
              __floats2bfloat162_rn(acc[i + 2], acc[i + 3]);
        }
      }
      ptx::mbarrier_arrive(c_full);
    }
  }
#else
  __trap();
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
template <typename Cfg, typename OutT, bool kLogitStats = false>
__global__ void __launch_bounds__(kThreads, 1)
    GroupedGemmWgmmaPingpongKernel(const __grid_constant__ CUtensorMap tmap_a,
                                   const __grid_constant__ CUtensorMap tmap_w,
                                   const int32_t* __restrict__ offsets, int num_experts,
                                   int total_rows, int n, int k, int w_expert_rows,
                                   OutT* __restrict__ c, LogitStatsOut logit_out = {},
                                   bool rows_fastest = false) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = Cfg::kBlockN;
  constexpr int kBlockK = Cfg::kBlockK;
  static_assert(BN == 128, "two m64n128 accumulators per thread");
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
                                       n_tiles, expert_hint, rows_fastest);
        for (int kb = 0; kb < k_blocks; ++kb) {
          ptx::mbarrier_wait_parity(&empty_bar[stage], phase ^ 1);
          uint8_t* a_dst = smem + stage * Cfg::kStageBytes;
          uint8_t* w_dst = a_dst + Cfg::kABytes;
          ptx::mbarrier_arrive_expect_tx(&full_bar[stage], Cfg::StageBytes(n, t.col_begin));
          ptx::cp_async_bulk_tensor_2d_g2s(a_dst, &tmap_a, kb * kBlockK, t.row_begin,
                                           &full_bar[stage]);
          Cfg::LoadW(w_dst, &tmap_w, t.expert, w_expert_rows, n, t.col_begin, kb,
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
                                     n_tiles, expert_hint, rows_fastest);
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
          const uint64_t desc_w = Cfg::DescW(w_tile, kk);
          const int accumulate = (kb > 0 || kk > 0) ? 1 : 0;
          Cfg::template Mma<BN>(acc[0], Cfg::Desc(a_tile + kk * 16), desc_w, accumulate);
          Cfg::template Mma<BN>(acc[1], Cfg::Desc(a_tile + 64 * kBlockK + kk * 16), desc_w,
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
        const int row_off = half * 64 + warp_in_group * 16;
        if constexpr (kLogitStats) {
          static_assert(BN == kLogitBlockColumns, "a tile's columns are one logit block");
          LogitStatsEpilogue(acc[half], n, static_cast<int64_t>(t.row_begin) + row_off,
                             t.rows - row_off, t.col_begin, logit_out);
        }
        StoreWgmmaAccumulator(acc[half], c, n, static_cast<int64_t>(t.row_begin) + row_off,
                              t.rows - row_off, t.col_begin);
      }
    }
  }
#else
  __trap();
#endif
}

// The cluster variant: the cooperative kernel on clusters of 2 CTAs that
// take vertically adjacent 128-row blocks of the same expert and column
// block. Both need the same W tile, so each CTA loads half of it (BN / 2
// rows) with a multicast TMA into both CTAs' shared memory: W traffic from
// L2 per CTA halves (48 -> 32 KB a stage for BN = 256). The tile schedule
// counts 256-row pair blocks; when an expert's last pair has one real block,
// the second CTA computes rows of the next expert (or TMA zeros) and stores
// nothing. A stage may be overwritten by either CTA's multicast, so its
// "empty" barrier waits for the consumer warps of both CTAs (16 arrivals).
template <typename Cfg, typename OutT>
__global__ void __launch_bounds__(kThreads, 1)
    GroupedGemmWgmmaClusterKernel(const __grid_constant__ CUtensorMap tmap_a,
                                  const __grid_constant__ CUtensorMap tmap_w,
                                  const int32_t* __restrict__ offsets, int num_experts,
                                  int total_rows, int n, int k, int w_expert_rows,
                                  OutT* __restrict__ c) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = Cfg::kBlockN;
  constexpr int kBlockK = Cfg::kBlockK;
  constexpr int kHalfWBytes = Cfg::kBBytes / 2;
  static_assert(!Cfg::kWMnMajor, "the cluster kernel reads K-major weights only");
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Cfg::kBarrierOffset);
  uint64_t* empty_bar = full_bar + Cfg::kStages;
  int* tile_prefix = reinterpret_cast<int*>(smem + Cfg::kPrefixOffset);

  const uint32_t rank = ptx::cluster_ctarank();
  const uint32_t peer = rank ^ 1;
  const int cluster_id = blockIdx.x / 2;
  const int num_clusters = gridDim.x / 2;
  const int warpgroup = threadIdx.x / 128;
  const int n_tiles = (n + BN - 1) / BN;
  const int k_blocks = (k + kBlockK - 1) / kBlockK;

  if (threadIdx.x == 0) {
    ptx::prefetch_tensormap(&tmap_a);
    ptx::prefetch_tensormap(&tmap_w);
    for (int s = 0; s < Cfg::kStages; ++s) {
      ptx::mbarrier_init(&full_bar[s], 1);
      ptx::mbarrier_init(&empty_bar[s], 16);  // 8 consumer warps of each CTA
    }
    ptx::fence_mbarrier_init();
  }
  if (threadIdx.x / 32 == 1) {
    BuildTilePrefix(offsets, num_experts, total_rows, 2 * kBlockM, n_tiles, tile_prefix);
  }
  __syncthreads();
  ptx::cluster_sync();  // the peer's barriers exist before anyone signals them
  const int total_pairs = tile_prefix[num_experts];

  if (warpgroup == 0) {
    ptx::setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      int expert_hint = 0;
      for (int pair = cluster_id; pair < total_pairs; pair += num_clusters) {
        const TileCoord t = LocateTile(pair, tile_prefix, offsets, total_rows, 2 * kBlockM, BN,
                                       n_tiles, expert_hint);
        const int a_row = t.row_begin + static_cast<int>(rank) * kBlockM;
        const int w_row =
            t.expert * w_expert_rows + t.col_begin + static_cast<int>(rank) * (BN / 2);
        for (int kb = 0; kb < k_blocks; ++kb) {
          ptx::mbarrier_wait_parity(&empty_bar[stage], phase ^ 1);
          uint8_t* a_dst = smem + stage * Cfg::kStageBytes;
          uint8_t* w_dst = a_dst + Cfg::kABytes + rank * kHalfWBytes;
          ptx::mbarrier_arrive_expect_tx(&full_bar[stage], Cfg::kStageBytes);
          ptx::cp_async_bulk_tensor_2d_g2s(a_dst, &tmap_a, kb * kBlockK, a_row,
                                           &full_bar[stage]);
          ptx::cp_async_bulk_tensor_2d_g2s_multicast(w_dst, &tmap_w, kb * kBlockK, w_row,
                                                     &full_bar[stage], 0x3);
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
    int stage = 0;
    uint32_t phase = 0;
    int expert_hint = 0;
    float acc[BN / 2];
    for (int pair = cluster_id; pair < total_pairs; pair += num_clusters) {
      const TileCoord t = LocateTile(pair, tile_prefix, offsets, total_rows, 2 * kBlockM, BN,
                                     n_tiles, expert_hint);
      int prev_stage = -1;
      auto release = [&](int s) {
        if (lane == 0) {
          ptx::mbarrier_arrive(&empty_bar[s]);
          ptx::mbarrier_arrive_cluster(ptx::mapa_shared_cluster(&empty_bar[s], peer));
        }
      };
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
          const int accumulate = (kb > 0 || kk > 0) ? 1 : 0;
          Cfg::template Mma<BN>(acc, Cfg::Desc(a_tile + kk * 16), Cfg::DescW(w_tile, kk),
                                accumulate);
        }
        ptx::wgmma_commit_group();
        ptx::wgmma_wait_group<1>();
        if (prev_stage >= 0) release(prev_stage);
        prev_stage = stage;
        if (++stage == Cfg::kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      ptx::wgmma_wait_group<0>();
      if (prev_stage >= 0) release(prev_stage);

      const int row_off = static_cast<int>(rank) * kBlockM + consumer * 64 + warp_in_group * 16;
      StoreWgmmaAccumulator(acc, c, n, static_cast<int64_t>(t.row_begin) + row_off,
                            t.rows - row_off, t.col_begin);
    }
  }
  // No CTA may leave while its peer can still arrive on its barriers.
  ptx::cluster_sync();
#else
  __trap();
#endif
}

// Rows of the [rows, k] view of W that the tensor map covers: up to the
// last expert's n-th row.
uint64_t WeightRows(const GroupedGemmArgs& args) {
  return static_cast<uint64_t>(args.num_experts - 1) * args.w_expert_rows + args.n;
}

// The tensor map of W for a W tile of box_n output columns (BN, or BN / 2
// per CTA of a cluster pair; K-major only).
template <typename Cfg>
Status MakeWeightMap(const GroupedGemmArgs& args, uint32_t box_n, CUtensorMap* map) {
  if constexpr (Cfg::kWMnMajor) {
    return ptx::MakeTensorMap3dBf16Swizzled(
        map, args.w, static_cast<uint64_t>(args.num_experts), args.k, args.n, args.n,
        static_cast<uint64_t>(args.w_expert_rows) * args.n, Cfg::kBlockK, 64, 128);
  } else {
    return ptx::MakeTensorMap2dBf16Swizzled(map, args.w, WeightRows(args), args.k, args.k, box_n,
                                            Cfg::kBlockK, Cfg::kSwizzleBytes);
  }
}

template <typename Cfg, typename OutT, bool kPingpong, bool kLogitStats = false>
Status LaunchWgmma(const GroupedGemmArgs& args, const DeviceInfo& dev, cudaStream_t stream) {
  static_assert(!kLogitStats || std::is_same_v<OutT, __nv_bfloat16>);
  constexpr int BN = Cfg::kBlockN;
  CUtensorMap tmap_a, tmap_w;
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(
      &tmap_a, args.a, static_cast<uint64_t>(args.total_rows), args.k, args.k, kBlockM,
      Cfg::kBlockK, Cfg::kSwizzleBytes));
  GROVE_RETURN_IF_ERROR(MakeWeightMap<Cfg>(args, BN, &tmap_w));
  auto kernel = [] {
    if constexpr (kPingpong) {
      return GroupedGemmWgmmaPingpongKernel<Cfg, OutT, kLogitStats>;
    } else {
      return GroupedGemmWgmmaKernel<Cfg, OutT, kLogitStats>;
    }
  }();
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
      "wgmma grouped GEMM: shared memory attribute"));
  // Never more CTAs than tiles can exist (each expert adds at most one
  // partial row block).
  const int64_t n_tiles = (args.n + BN - 1) / BN;
  const int64_t max_tiles =
      (static_cast<int64_t>(args.total_rows) / kBlockM + args.num_experts) * n_tiles;
  const int grid =
      static_cast<int>(std::min<int64_t>(dev.sm_count, std::max<int64_t>(max_tiles, 1)));
  // Column by column when W[e] outweighs the expert's rows of A
  // (LocateTile): n above the average rows an expert has.
  const bool rows_fastest = int64_t{args.n} * args.num_experts > args.total_rows;
  kernel<<<grid, kThreads, Cfg::kSmemBytes, stream>>>(
      tmap_a, tmap_w, args.expert_offsets, args.num_experts, args.total_rows, args.n, args.k,
      args.w_expert_rows, static_cast<OutT*>(args.c),
      LogitStatsOut{args.logit_block_stats, args.logit_targets, args.logit_target}, rows_fastest);
  return CudaStatus(cudaGetLastError(), "wgmma grouped GEMM launch");
}

template <typename Cfg, typename OutT>
Status LaunchWgmmaCluster(const GroupedGemmArgs& args, const DeviceInfo& dev,
                          cudaStream_t stream) {
  constexpr int BN = Cfg::kBlockN;
  CUtensorMap tmap_a, tmap_w;
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(
      &tmap_a, args.a, static_cast<uint64_t>(args.total_rows), args.k, args.k, kBlockM,
      Cfg::kBlockK, Cfg::kSwizzleBytes));
  GROVE_RETURN_IF_ERROR(MakeWeightMap<Cfg>(args, BN / 2, &tmap_w));
  auto kernel = GroupedGemmWgmmaClusterKernel<Cfg, OutT>;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
      "wgmma cluster grouped GEMM: shared memory attribute"));
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = Cfg::kSmemBytes;
  config.stream = stream;
  // As many clusters as can be resident at once (GPCs need not hold an even
  // number of free SMs), and never more than pair tiles can exist.
  config.gridDim = dim3(2 * (dev.sm_count / 2));
  int max_clusters = 0;
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &config),
                                   "wgmma cluster grouped GEMM: cluster occupancy"));
  if (max_clusters < 1)
    return Status::FailedPrecondition("wgmma cluster grouped GEMM: no cluster of 2 fits");
  const int64_t n_tiles = (args.n + BN - 1) / BN;
  const int64_t max_pairs =
      (static_cast<int64_t>(args.total_rows) / (2 * kBlockM) + args.num_experts) * n_tiles;
  const int clusters =
      static_cast<int>(std::min<int64_t>(max_clusters, std::max<int64_t>(max_pairs, 1)));
  config.gridDim = dim3(2 * clusters);
  GROVE_RETURN_IF_ERROR(
      CudaStatus(cudaLaunchKernelEx(&config, kernel, tmap_a, tmap_w, args.expert_offsets,
                                    args.num_experts, args.total_rows, args.n, args.k,
                                    args.w_expert_rows, static_cast<OutT*>(args.c)),
                 "wgmma cluster grouped GEMM launch"));
  return CudaStatus(cudaGetLastError(), "wgmma cluster grouped GEMM launch");
}

template <typename Cfg, bool kSwiGluBwd, bool kSwiGluFwd = false, bool kRope = false>
Status LaunchWgmmaStaged(const GroupedGemmArgs& args, const DeviceInfo& dev,
                         cudaStream_t stream) {
  using Tile = StagedTile<Cfg, kSwiGluBwd>;
  static_assert(Tile::kSmemBytes <= 227 * 1024);
  constexpr int BN = Cfg::kBlockN;
  CUtensorMap tmap_a, tmap_w;
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(
      &tmap_a, args.a, static_cast<uint64_t>(args.total_rows), args.k, args.k, kBlockM,
      Cfg::kBlockK, Cfg::kSwizzleBytes));
  // kSwiGluFwd: a W tile is two boxes of BN / 2 rows (w1's, w3's).
  GROVE_RETURN_IF_ERROR(MakeWeightMap<Cfg>(args, kSwiGluFwd ? BN / 2 : BN, &tmap_w));
  auto kernel = GroupedGemmWgmmaStagedKernel<Cfg, kSwiGluBwd, kSwiGluFwd, kRope>;
  GROVE_RETURN_IF_ERROR(CudaStatus(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes),
      "wgmma staged grouped GEMM: shared memory attribute"));
  const int64_t n_tiles =
      kSwiGluFwd ? (args.n / 2 + BN / 2 - 1) / (BN / 2) : (args.n + BN - 1) / BN;
  const int64_t max_tiles =
      (static_cast<int64_t>(args.total_rows) / kBlockM + args.num_experts) * n_tiles;
  const int grid =
      static_cast<int>(std::min<int64_t>(dev.sm_count, std::max<int64_t>(max_tiles, 1)));
  kernel<<<grid, StagedThreads<kSwiGluBwd>(), Tile::kSmemBytes, stream>>>(
      tmap_a, tmap_w, args.expert_offsets, args.num_experts, args.total_rows, args.n, args.k,
      args.w_expert_rows, static_cast<__nv_bfloat16*>(args.c), args.swiglu_bwd_ab,
      args.swiglu_out,
      SwiGluBwdGate{args.swiglu_bwd_slot_of_row, args.swiglu_bwd_slot_gates, args.swiglu_bwd_h_gated,
                    args.swiglu_bwd_dgate_partial},
      RopeEpilogue{args.rope_table, args.rope_positions, args.rope_columns});
  return CudaStatus(cudaGetLastError(), "wgmma staged grouped GEMM launch");
}

template <typename Cfg, bool kPingpong>
Status LaunchWgmmaOut(const GroupedGemmArgs& args, const DeviceInfo& dev, cudaStream_t stream) {
  return args.out_type == GemmOutType::kF32
             ? LaunchWgmma<Cfg, float, kPingpong>(args, dev, stream)
             : LaunchWgmma<Cfg, __nv_bfloat16, kPingpong>(args, dev, stream);
}

// launch(Cfg{}) with the tiling's config for the args' weight layout.
template <int BN, int BK, int STAGES, typename Launch>
Status WithWeightLayout(const GroupedGemmArgs& args, Launch&& launch) {
  if (args.w_layout == GemmWeightLayout::kMnMajor)
    return launch(WgmmaConfig<BN, BK, STAGES, true>{});
  return launch(WgmmaConfig<BN, BK, STAGES, false>{});
}

}  // namespace

Status LaunchGroupedGemmWgmma(const GroupedGemmArgs& args, const DeviceInfo& dev,
                              WgmmaVariant variant, cudaStream_t stream) {
  const bool mn = args.w_layout == GemmWeightLayout::kMnMajor;
  auto cooperative = [&](auto cfg) {
    return LaunchWgmmaOut<decltype(cfg), false>(args, dev, stream);
  };
  // The log-prob head epilogue: bf16 out, K-major W (checked by GroupedGemm).
  if (args.logit_block_stats != nullptr) {
    if (mn) return Status::Internal("wgmma grouped GEMM: log-prob head epilogue with MN-major W");
    switch (variant) {
      case WgmmaVariant::kCooperativeBn128:
        return LaunchWgmma<WgmmaConfig<128, 64, 6>, __nv_bfloat16, false, true>(args, dev, stream);
      case WgmmaVariant::kCooperativeBn256:
        return LaunchWgmma<WgmmaConfig<256, 64, 4>, __nv_bfloat16, false, true>(args, dev, stream);
      case WgmmaVariant::kPingpongBn128:
        return LaunchWgmma<WgmmaConfig<128, 64, 6>, __nv_bfloat16, true, true>(args, dev, stream);
      default:
        return Status::Internal("wgmma grouped GEMM: no log-prob head epilogue in this variant");
    }
  }
  switch (variant) {
    case WgmmaVariant::kCooperativeBn128:
      return WithWeightLayout<128, 64, 6>(args, cooperative);
    case WgmmaVariant::kCooperativeBn256:
      return WithWeightLayout<256, 64, 4>(args, cooperative);
    case WgmmaVariant::kPingpongBn128:
      return WithWeightLayout<128, 64, 6>(
          args, [&](auto cfg) { return LaunchWgmmaOut<decltype(cfg), true>(args, dev, stream); });
    case WgmmaVariant::kStagedBn256:
      // The SwiGLU epilogue's fp32 tile: 128 x 128 tiles, 4-stage ring
      // (70 KB tile + 128 KB ring, where the plain one has 66 + 144).
      // The SwiGLU forward epilogue: the plain staged tiling (bf16 out,
      // K-major W: checked by GroupedGemm).
      if (args.swiglu_out != nullptr) {
        if (mn) return Status::Internal("wgmma grouped GEMM: SwiGLU forward with MN-major W");
        return LaunchWgmmaStaged<WgmmaConfig<256, 64, 3>, false, true>(args, dev, stream);
      }
      if (args.swiglu_bwd_ab != nullptr)  // bf16 out (checked by GroupedGemm)
        return WithWeightLayout<128, 64, 4>(
            args, [&](auto cfg) { return LaunchWgmmaStaged<decltype(cfg), true>(args, dev, stream); });
      // The staged epilogue holds a bf16 tile; fp32 output takes the
      // cooperative kernel's direct stores (already full sectors).
      if (args.out_type == GemmOutType::kF32)
        return WithWeightLayout<256, 64, 4>(args, cooperative);
      if (args.rope_table != nullptr)  // bf16 out (checked by GroupedGemm)
        return WithWeightLayout<256, 64, 3>(args, [&](auto cfg) {
          return LaunchWgmmaStaged<decltype(cfg), false, false, true>(args, dev, stream);
        });
      return WithWeightLayout<256, 64, 3>(
          args, [&](auto cfg) { return LaunchWgmmaStaged<decltype(cfg), false>(args, dev, stream); });
    case WgmmaVariant::kCooperativeBn256Bk32:
    case WgmmaVariant::kClusterBn256:
      break;
  }
  // K-major weights only (GroupedGemm refuses the rest before this).
  if (mn) return Status::Internal("wgmma grouped GEMM: this variant reads K-major weights only");
  if (variant == WgmmaVariant::kCooperativeBn256Bk32)
    return LaunchWgmmaOut<WgmmaConfig<256, 32, 8>, false>(args, dev, stream);
  if (variant == WgmmaVariant::kClusterBn256) {
    using Cfg = WgmmaConfig<256, 64, 4>;
    return args.out_type == GemmOutType::kF32
               ? LaunchWgmmaCluster<Cfg, float>(args, dev, stream)
               : LaunchWgmmaCluster<Cfg, __nv_bfloat16>(args, dev, stream);
  }
  return Status::Internal("unknown wgmma variant");
}

}  // namespace grove::kernels::detail
