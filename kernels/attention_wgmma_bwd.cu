// AttentionBackwardImpl::kWgmma: the main kernel of the causal GQA
// flash-attention backward of attention.h on sm_90a, head_dim 128
// (FlashAttention-3's structure). The pre-pass (D = rowsum(dO o O)) and the
// post-pass (dQ fp32 -> bf16, times scale) are attention.cu's, unchanged.
//
// One CTA = 128 keys of one KV head of one sequence, three warpgroups.
// Warpgroup 0 is the producer: its first warp loads K and V once (TMA, two
// [128 rows][64 columns] 128-byte-swizzled boxes each), then, for every query
// head of the group and every query tile of 64 from the key tile's first
// query to the sequence's end, the Q and dO tiles (two [64][64] boxes each,
// TMA) and the tile's lse (times log2 e) and D (plain loads, 0 past the
// sequence) into a ring of kStages stages.
//
// Warpgroups 1 and 2 (c = 0, 1) each own 64 keys (rows 64c.. of K and V) and
// keep dK and dV (64 keys x 128 dims, fp32) in registers. Per step:
//   S^T  = K_c Q^T            wgmma m64n64k16, both K-major in shared memory
//   dP^T = V_c dO^T           the same
//   P^T  = exp2(S^T scale log2e - lse log2e), dS^T = P^T (dP^T - D),
//          both set to 0 where key > query or query >= len
//   dV  += P^T dO             wgmma m64n128k16, P^T bf16 from registers,
//   dK  += dS^T Q             dO / Q [queries][dims] read MN-major
//   dS^T -> shared memory (bf16, [128 keys][64 queries], 128-byte swizzle),
//   dQ[:, 64c..64c+63] = dS K[:, 64c..]   wgmma m64n64k16 both MN-major
//          (dS^T rows are dS's K-rows; K [keys][dims] is [K][N]), over all
//          128 keys: both warpgroups' dS^T, so a 256-thread barrier between,
//   then dQ is added into the fp32 workspace: by default (kDqByTma) the
//   warpgroup writes it to its own shared-memory buffer and the producer
//   warpgroup's second warp adds the buffer with two TMA reductions
//   (cp.reduce.async.bulk.tensor .add: two bulk operations where the
//   atomics were 2048 float2 red.global per warpgroup), so the math
//   warpgroups neither issue nor wait on the global reduction;
//   GROVE_ATTENTION_BWD_DQ=atomic keeps red.global.add (float2) from the
//   math warpgroups (the first version).
// dS^T is double-buffered: a warpgroup writes buffer t % 2 at step t only
// after the barrier of step t - 1, which the other passed after its dQ
// wgmma of step t - 2 (the last reader of that buffer) had completed.
//
// Rows past the sequence's end (TMA boxes run into the next sequence, whose
// values may be anything, NaN included; past the tensor TMA reads zeros):
// P and dS are set (not multiplied) to 0 there, but 0 * NaN is NaN in the
// products that read those rows as the other operand, so
//   K rows past the end are zeroed once (dQ = dS K reads every key row),
//   Q and dO rows past the end are zeroed in the last query tile of each
//   head (dK += dS^T Q and dV += P^T dO read every query row),
// V rows need nothing (they only feed dP^T rows of keys past the end, whose
// dS is set to 0); dQ rows past the end are not added, dK / dV rows past
// the end are not stored. The TMA dQ reduction adds the whole 64-query box:
// its rows past the end are set to +0 in the buffer (selected: with a
// non-finite K row of this sequence, 0 * inf would make them NaN) and so
// leave the next sequence's rows as they are (x + 0 == x), or are dropped
// past the tensor.
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "kernels/attention_internal.h"
#include "kernels/attention_tile_order.cuh"
#include "kernels/attention_wgmma_common.cuh"
#include "kernels/rope_math.cuh"
#include "kernels/ptx/mbarrier.cuh"
#include "kernels/ptx/tensor_map.h"
#include "kernels/ptx/tma.cuh"
#include "kernels/ptx/wgmma.cuh"

namespace grove::kernels::detail {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kD = 128;       // head_dim
constexpr int kBlockN = 128;  // keys per CTA: two consumer warpgroups x 64
constexpr int kBlockM = 64;   // queries per step
constexpr int kStages = 3;
constexpr int kThreads = 384;
// TMA boxes are [rows][64 columns] bf16 (128-byte rows): K/V boxes of 128
// rows, Q/dO boxes of 64 rows; a tile is two boxes (dims 0..63, 64..127).
constexpr int kKvBoxBytes = kBlockN * 128;
constexpr int kQBoxBytes = kBlockM * 128;
constexpr int kKvTileBytes = 2 * kKvBoxBytes;
constexpr int kQTileBytes = 2 * kQBoxBytes;
constexpr int kDsBytes = kBlockN * kBlockM * 2;  // dS^T [128 keys][64 queries] bf16
// dQ partials for the TMA reduction: per consumer warpgroup [64 queries][64
// dims] fp32 as two [64][32] boxes (128-byte rows, 128-byte swizzle).
constexpr int kDqBoxBytes = kBlockM * 128;
constexpr int kDqWgBytes = 2 * kDqBoxBytes;
// Shared memory (every tile 1024-byte aligned, as the swizzle needs).
constexpr int kKOffset = 0;
constexpr int kVOffset = kKOffset + kKvTileBytes;
constexpr int kQOffset = kVOffset + kKvTileBytes;
constexpr int kDoOffset = kQOffset + kStages * kQTileBytes;
constexpr int kDsOffset = kDoOffset + kStages * kQTileBytes;
constexpr int kDqOffset = kDsOffset + 2 * kDsBytes;
constexpr int kLseOffset = kDqOffset + 2 * kDqWgBytes;          // [kStages][64] fp32
constexpr int kDvecOffset = kLseOffset + kStages * kBlockM * 4;  // [kStages][64] fp32
constexpr int kBarOffset = kDvecOffset + kStages * kBlockM * 4;
constexpr int kBarriers = 1 + 2 * kStages;  // kv_full, full[], empty[]
constexpr int kSmemBytes = kBarOffset + kBarriers * 8 + 1024;  // + alignment slack
static_assert(kSmemBytes <= 227 * 1024);

struct BwdArgs {
  const float* lse;   // [num_heads, total_tokens]
  const float* dvec;  // [num_heads, total_tokens]
  float* dq_accum;    // [total_tokens, num_heads, kD]
  bf16* dk;
  bf16* dv;
  const int32_t* cu_seqlens;
  int64_t kv_row_stride;
  int total_tokens, num_heads, num_kv_heads, group, batch;
  int tiles;        // key tiles of the longest sequence
  int chunk_pairs;  // see OrderTiles
  float scale;
  const float2* rope_table;  // AttentionShape's; null: dK as it is
  const int32_t* rope_positions;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Named barrier over both consumer warpgroups (id 1, 256 threads; 0 is
// __syncthreads').
__device__ __forceinline__ void ConsumersSync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// The dQ hand-over between consumer warpgroup c (128 threads) and the dQ
// writer warp (32): barrier 2 + c "buffer c full" (the warpgroup arrives,
// the writer waits), 4 + c "buffer c read" (the writer arrives, the
// warpgroup waits).
constexpr int kDqThreads = 128 + 32;
__device__ __forceinline__ void NamedBarrierSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// acc (64 keys x 64 queries) = rows 64c.. of a [128][128] K or V tile times
// the transpose of a [64][128] Q or dO tile: 8 k-slices of 16 dims, the first
// four in box 0.
__device__ __forceinline__ void IssueKeysTimesQueriesT(float (&acc)[32], const uint8_t* kv_tile,
                                                       int c, const uint8_t* q_tile) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const int col = (kk % 4) * 32;
    ptx::wgmma_m64n64k16_f32_bf16_ss(
        acc, ptx::make_wgmma_desc_k_sw128(kv_tile + (kk / 4) * kKvBoxBytes + c * 64 * 128 + col),
        ptx::make_wgmma_desc_k_sw128(q_tile + (kk / 4) * kQBoxBytes + col), 1 - (kk == 0));
  }
}

// acc (64 keys x 128 dims) += A (64 keys x 64 queries, bf16 registers) times
// a [64 queries][128 dims] tile read MN-major: k-slice kk is rows 16kk.. of
// both boxes, the second box one box further (leading byte offset).
__device__ __forceinline__ void IssueRegsTimesQueryTile(float (&acc)[64], const uint32_t (&a)[4][4],
                                                        const uint8_t* q_tile) {
#pragma unroll
  for (int kk = 0; kk < kBlockM / 16; ++kk)
    ptx::wgmma_m64n128k16_f32_bf16_rs_bmn(
        acc, a[kk], ptx::make_wgmma_desc_mn_sw128(q_tile + kk * 16 * 128, kQBoxBytes), 1);
}

// dq (64 queries x 64 dims 64c..) = dS (A: dS^T [128 keys][64 queries] read
// M-major) times K (B: box c of the K tile, [128 keys][64 dims] read
// N-major): 8 k-slices of 16 keys.
__device__ __forceinline__ void IssueDq(float (&dq)[32], const uint8_t* ds, const uint8_t* k_tile,
                                        int c) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk)
    ptx::wgmma_m64n64k16_f32_bf16_ss_mn(
        dq, ptx::make_wgmma_desc_mn_sw128(ds + kk * 16 * 128, kDsBytes),
        ptx::make_wgmma_desc_mn_sw128(k_tile + c * kKvBoxBytes + kk * 16 * 128, kKvBoxBytes),
        1 - (kk == 0));
}

// A fragments of a 64 x 64 accumulator: k-slice kk is registers 8kk..8kk+7 in pairs.
__device__ __forceinline__ void ToBf16(uint32_t (&a)[4][4], const float (&s)[32]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[kk][e] = PackBf16(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
}

// Stores a warpgroup's 64 x 128 accumulator (times scale) as bf16 rows
// row0 + r (r < valid) of dst, row_stride elements apart.
__device__ __forceinline__ void StoreRowsBf16(bf16* dst, int64_t row_stride, const float (&acc)[64],
                                              float scale, int valid, int tid) {
  const int warp = tid / 32, g = (tid % 32) / 4, qd = tid % 4;
#pragma unroll
  for (int i = 0; i < 64; i += 2) {
    const int row = 16 * warp + g + 8 * ((i >> 1) & 1);
    const int col = 8 * (i >> 2) + 2 * qd;
    if (row < valid)
      *reinterpret_cast<uint32_t*>(dst + row * row_stride + col) =
          PackBf16(acc[i] * scale, acc[i + 1] * scale);
  }
}

// StoreRowsBf16 of dK with the rotary embedding's backward
// (AttentionShape::rope_table): a thread's columns col and col + 64 (its
// registers i and i + 32) are one rotation pair; each is rounded to bf16
// first, as the unfused path stores it, then rotated by -angle as
// RopeBackward rotates it (RotatePair with -sin) and rounded again, so the
// bits are RopeBackward's. positions: the rows' positions (row 0 first).
__device__ __forceinline__ void StoreRowsBf16Rope(bf16* dst, int64_t row_stride, const float (&acc)[64],
                                                  float scale, int valid, int tid, const float2* table,
                                                  const int32_t* positions) {
  const int warp = tid / 32, g = (tid % 32) / 4, qd = tid % 4;
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int row = 16 * warp + g + 8 * ((i >> 1) & 1);
    const int col = 8 * (i >> 2) + 2 * qd;  // < 64; its partner col + 64 is register i + 32
    if (row >= valid) continue;
    const float2 lo = __bfloat1622float2(__floats2bfloat162_rn(acc[i] * scale, acc[i + 1] * scale));
    const float2 hi = __bfloat1622float2(__floats2bfloat162_rn(acc[i + 32] * scale, acc[i + 33] * scale));
    const float4 w = *reinterpret_cast<const float4*>(table + int64_t{positions[row]} * (kD / 2) + col);
    float x0, y0, x1, y1;
    RotatePair(lo.x, hi.x, w.x, -w.y, x0, y0);
    RotatePair(lo.y, hi.y, w.z, -w.w, x1, y1);
    *reinterpret_cast<uint32_t*>(dst + row * row_stride + col) = PackBf16(x0, x1);
    *reinterpret_cast<uint32_t*>(dst + row * row_stride + col + kD / 2) = PackBf16(y0, y1);
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <bool kDqByTma>
__global__ void __launch_bounds__(kThreads, 1)
    AttentionBackwardWgmmaKernel(const __grid_constant__ CUtensorMap tmap_q,
                                 const __grid_constant__ CUtensorMap tmap_k,
                                 const __grid_constant__ CUtensorMap tmap_v,
                                 const __grid_constant__ CUtensorMap tmap_do,
                                 const __grid_constant__ CUtensorMap tmap_dq, BwdArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const TileOrder order = OrderTiles(blockIdx.x, a.tiles, a.num_kv_heads * a.batch, a.chunk_pairs);
  const int kvh = order.pair % a.num_kv_heads, b = order.pair / a.num_kv_heads;
  const int n_block = order.tile;  // key tile 0 sees every query tile: the most work
  const int start = a.cu_seqlens[b], len = a.cu_seqlens[b + 1] - start;
  const int n0 = n_block * kBlockN;
  if (n0 >= len) return;  // the whole CTA, before any barrier
  // Query tiles of 64 from query n0 (the first that sees a key of the tile)
  // to the end, for each head of the group.
  const int per_head = (len - n0 + kBlockM - 1) / kBlockM;
  const int steps = a.group * per_head;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* k_tile = smem + kKOffset;
  uint8_t* v_tile = smem + kVOffset;
  float* s_lse = reinterpret_cast<float*>(smem + kLseOffset);
  float* s_dvec = reinterpret_cast<float*>(smem + kDvecOffset);
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem + kBarOffset);
  uint64_t* full = kv_full + 1;
  uint64_t* empty = full + kStages;
  auto q_tile = [&](int st) { return smem + kQOffset + st * kQTileBytes; };
  auto do_tile = [&](int st) { return smem + kDoOffset + st * kQTileBytes; };

  if (threadIdx.x == 0) {
    ptx::mbarrier_init(kv_full, 1);
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(&full[s], 1);
      ptx::mbarrier_init(&empty[s], 8);  // one arrival per consumer warp
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    ptx::setmaxnreg_dec<40>();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      if (lane == 0) {
        ptx::prefetch_tensormap(&tmap_q);
        ptx::prefetch_tensormap(&tmap_k);
        ptx::prefetch_tensormap(&tmap_v);
        ptx::prefetch_tensormap(&tmap_do);
        ptx::mbarrier_arrive_expect_tx(kv_full, 2 * kKvTileBytes);
        for (int box = 0; box < 2; ++box) {
          ptx::cp_async_bulk_tensor_2d_g2s(k_tile + box * kKvBoxBytes, &tmap_k,
                                           kvh * kD + box * 64, start + n0, kv_full);
          ptx::cp_async_bulk_tensor_2d_g2s(v_tile + box * kKvBoxBytes, &tmap_v,
                                           kvh * kD + box * 64, start + n0, kv_full);
        }
      }
      for (int t = 0; t < steps; ++t) {
        const int st = t % kStages;
        const int h = kvh * a.group + t / per_head, m0 = n0 + (t % per_head) * kBlockM;
        ptx::mbarrier_wait_parity(&empty[st], ((t / kStages) & 1) ^ 1);
        // lse (times log2 e) and D of the tile's 64 queries, 0 past the end
        // (those queries are masked; the reads would leave the sequence, and
        // past the last one the buffer).
        for (int i = lane; i < kBlockM; i += 32) {
          const bool ok = m0 + i < len;
          const int64_t at = int64_t{h} * a.total_tokens + start + m0 + i;
          s_lse[st * kBlockM + i] = ok ? a.lse[at] * kLog2e : 0.f;
          s_dvec[st * kBlockM + i] = ok ? a.dvec[at] : 0.f;
        }
        __syncwarp();  // orders the lanes' stores before lane 0's (releasing) arrival
        if (lane == 0) {
          ptx::mbarrier_arrive_expect_tx(&full[st], 2 * kQTileBytes);
          for (int box = 0; box < 2; ++box) {
            ptx::cp_async_bulk_tensor_2d_g2s(q_tile(st) + box * kQBoxBytes, &tmap_q,
                                             h * kD + box * 64, start + m0, &full[st]);
            ptx::cp_async_bulk_tensor_2d_g2s(do_tile(st) + box * kQBoxBytes, &tmap_do,
                                             h * kD + box * 64, start + m0, &full[st]);
          }
        }
      }
    } else if (kDqByTma && threadIdx.x < 64) {
      // The dQ writer: per step, each consumer warpgroup's buffer once it is
      // full, two TMA reductions (dims 64c .. 64c + 31, + 32 .. + 63), then
      // "read" once the TMA has read the buffer (not the last step: nobody
      // waits for it).
      const int lane = threadIdx.x % 32;
      if (lane == 0) ptx::prefetch_tensormap(&tmap_dq);
      for (int t = 0; t < steps; ++t) {
        const int h = kvh * a.group + t / per_head, m0 = n0 + (t % per_head) * kBlockM;
        for (int c = 0; c < 2; ++c) {
          NamedBarrierSync(2 + c, kDqThreads);
          if (lane == 0) {
            const uint8_t* buf = smem + kDqOffset + c * kDqWgBytes;
            for (int box = 0; box < 2; ++box)
              ptx::cp_reduce_async_bulk_tensor_2d_s2g_add(
                  &tmap_dq, h * kD + 64 * c + 32 * box, start + m0, buf + box * kDqBoxBytes);
            ptx::cp_async_bulk_commit_group();
            ptx::cp_async_bulk_wait_group_read<0>();
          }
          __syncwarp();
          if (t + 1 < steps) NamedBarrierArrive(4 + c, kDqThreads);
        }
      }
      if (lane == 0) ptx::cp_async_bulk_wait_group<0>();
    }
  } else {
    ptx::setmaxnreg_inc<232>();
    const int c = warpgroup - 1;  // keys n0 + 64c .. n0 + 64c + 63
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, qd = lane % 4;
    const float sl2 = a.scale * kLog2e;
    float dk[64], dv[64];
#pragma unroll
    for (int j = 0; j < 64; ++j) dk[j] = dv[j] = 0.f;

    // K rows past the end: zeroed before any dQ wgmma reads them (uniform
    // over the CTA, so both warpgroups reach the barrier).
    ptx::mbarrier_wait_parity(kv_full, 0);
    if (len - n0 < kBlockN) {
      ClearRowsFrom(k_tile, kBlockN, len - n0);
      ptx::fence_proxy_async_shared_cta();
      ConsumersSync();
    }

    for (int t = 0; t < steps; ++t) {
      const int st = t % kStages;
      const int h = kvh * a.group + t / per_head, m0 = n0 + (t % per_head) * kBlockM;
      uint8_t* qt = q_tile(st);
      uint8_t* dot = do_tile(st);
      uint8_t* ds_smem = smem + kDsOffset + (t % 2) * kDsBytes;
      ptx::mbarrier_wait_parity(&full[st], (t / kStages) & 1);
      if (m0 + kBlockM > len) {  // the head's last query tile runs past the end
        ClearRowsFrom(qt, kBlockM, len - m0);
        ClearRowsFrom(dot, kBlockM, len - m0);
        ptx::fence_proxy_async_shared_cta();
        ConsumersSync();
      }

      float s[32], dp[32];
      ptx::wgmma_fence();
      IssueKeysTimesQueriesT(s, k_tile, c, qt);
      ptx::wgmma_commit_group();
      IssueKeysTimesQueriesT(dp, v_tile, c, dot);
      ptx::wgmma_commit_group();
      ptx::wgmma_wait_group<1>();
      PinRegs(s);
      // Masking is needed on the tiles that reach the diagonal of the key
      // tile (queries before n0 + 128) and on the last one (past the end).
      const bool masked = m0 < n0 + kBlockN || m0 + kBlockM > len;
      const float* lse = s_lse + st * kBlockM;
      const float* dvec = s_dvec + st * kBlockM;
      const int key_base = n0 + 64 * c + 16 * warp + g;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int col = 8 * (i >> 2) + 2 * qd + (i & 1);
        const int key = key_base + 8 * ((i >> 1) & 1), query = m0 + col;
        const float pv = exp2f(fmaf(s[i], sl2, -lse[col]));
        s[i] = (masked && (key > query || query >= len)) ? 0.f : pv;
      }
      ptx::wgmma_wait_group<0>();
      PinRegs(dp);
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int col = 8 * (i >> 2) + 2 * qd + (i & 1);
        // Selected, not multiplied: dp is NaN in rows of keys past the end
        // when the next sequence's V is (s is 0 there, masked).
        const float d = s[i] * (dp[i] - dvec[col]);
        dp[i] = s[i] == 0.f ? 0.f : d;
      }
      uint32_t p_bf[4][4], ds_bf[4][4];
      ToBf16(p_bf, s);
      ToBf16(ds_bf, dp);
      ptx::wgmma_fence();
      IssueRegsTimesQueryTile(dv, p_bf, dot);
      IssueRegsTimesQueryTile(dk, ds_bf, qt);
      ptx::wgmma_commit_group();

      // dS^T to shared memory: row = key (64c + r), 16-byte chunk (query / 8)
      // XORed with row % 8 (the 128-byte swizzle the descriptor expects).
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 64 * c + 16 * warp + g + 8 * (e & 1);
          const int col = 16 * kk + 8 * (e >> 1) + 2 * qd;
          *reinterpret_cast<uint32_t*>(ds_smem + row * 128 + (((col / 8) ^ (row % 8)) * 16) +
                                       (col % 8) * 2) = ds_bf[kk][e];
        }
      ptx::fence_proxy_async_shared_cta();
      ConsumersSync();
      float dq[32];
      ptx::wgmma_fence();
      IssueDq(dq, ds_smem, k_tile, c);
      ptx::wgmma_commit_group();
      ptx::wgmma_wait_group<0>();
      PinRegs(dk);
      PinRegs(dv);
      PinRegs(p_bf);
      PinRegs(ds_bf);
      PinRegs(dq);
      if (lane == 0) ptx::mbarrier_arrive(&empty[st]);

      // dQ rows (queries) 16 warp + g (+8), dims 64c + 8 (i / 4) + 2 qd.
      if constexpr (kDqByTma) {
        // Into box j / 4 of this warpgroup's buffer (fp32 columns 8 (j % 4) +
        // 2 qd: 16-byte chunk 2 (j % 4) + qd / 2, XORed with row % 8), once
        // the writer has read step t - 1's; then hand it over.
        uint8_t* buf = smem + kDqOffset + c * kDqWgBytes;
        if (t > 0) NamedBarrierSync(4 + c, kDqThreads);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 16 * warp + g + 8 * r;
          const bool past_end = m0 + row >= len;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int chunk = 2 * (j % 4) + qd / 2;
            *reinterpret_cast<float2*>(buf + (j / 4) * kDqBoxBytes + row * 128 +
                                       ((chunk ^ (row % 8)) * 16) + (qd % 2) * 8) =
                past_end ? make_float2(0.f, 0.f)
                         : make_float2(dq[4 * j + 2 * r], dq[4 * j + 2 * r + 1]);
          }
        }
        ptx::fence_proxy_async_shared_cta();
        NamedBarrierArrive(2 + c, kDqThreads);
        continue;
      }
      const int64_t q_pitch = int64_t{a.num_heads} * kD;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int query = m0 + 16 * warp + g + 8 * r;
        if (query >= len) continue;
        float* row = a.dq_accum + int64_t{start + query} * q_pitch + h * kD + 64 * c + 2 * qd;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          atomicAdd(reinterpret_cast<float2*>(row + 8 * j),
                    make_float2(dq[4 * j + 2 * r], dq[4 * j + 2 * r + 1]));
      }
    }

    const int valid = len - n0 - 64 * c;
    const int64_t row0 = int64_t{start + n0 + 64 * c} * a.kv_row_stride + kvh * kD;
    if (a.rope_table != nullptr) {
      StoreRowsBf16Rope(a.dk + row0, a.kv_row_stride, dk, a.scale, valid, tid, a.rope_table,
                        a.rope_positions + start + n0 + 64 * c);
    } else {
      StoreRowsBf16(a.dk + row0, a.kv_row_stride, dk, a.scale, valid, tid);
    }
    StoreRowsBf16(a.dv + row0, a.kv_row_stride, dv, 1.f, valid, tid);
  }
#else
  __trap();  // built for a device without wgmma; the host never launches this
#endif
}

Status CudaError(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string("attention wgmma backward: ") + what + ": " +
                          cudaGetErrorString(err));
}

}  // namespace

Status LaunchAttentionBackwardWgmma(const AttentionShape& shape, const bf16* q, const bf16* k,
                                    const bf16* v, const bf16* dout, const float* lse,
                                    const float* dvec, float* dq_accum, bf16* dk, bf16* dv,
                                    int64_t q_row_stride, int64_t kv_row_stride, float scale,
                                    cudaStream_t stream) {
  if (shape.head_dim != kD)
    return Status::InvalidArgument("attention wgmma backward: head_dim must be 128");
  const uint64_t tokens = static_cast<uint64_t>(shape.total_tokens);
  const uint64_t q_cols = uint64_t(shape.num_heads) * kD, kv_cols = uint64_t(shape.num_kv_heads) * kD;
  CUtensorMap tmap_q, tmap_k, tmap_v, tmap_do, tmap_dq;
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(&tmap_q, q, tokens, q_cols, q_row_stride,
                                                         kBlockM, 64, 128));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(&tmap_do, dout, tokens, q_cols, q_cols,
                                                         kBlockM, 64, 128));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(&tmap_k, k, tokens, kv_cols,
                                                         kv_row_stride, kBlockN, 64, 128));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(&tmap_v, v, tokens, kv_cols,
                                                         kv_row_stride, kBlockN, 64, 128));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dF32Swizzled(&tmap_dq, dq_accum, tokens, q_cols,
                                                        q_cols, kBlockM, 32, 128));
  // GROVE_ATTENTION_BWD_DQ=atomic|tma (default tma): how dQ reaches the
  // workspace (see the header comment).
  bool dq_by_tma = true;
  GROVE_RETURN_IF_ERROR(ReadPathChoice("GROVE_ATTENTION_BWD_DQ", "atomic", "tma", &dq_by_tma));
  BwdArgs args{};
  args.lse = lse;
  args.dvec = dvec;
  args.dq_accum = dq_accum;
  args.dk = dk;
  args.dv = dv;
  args.cu_seqlens = shape.cu_seqlens;
  args.kv_row_stride = kv_row_stride;
  args.total_tokens = shape.total_tokens;
  args.num_heads = shape.num_heads;
  args.num_kv_heads = shape.num_kv_heads;
  args.group = shape.num_heads / shape.num_kv_heads;
  args.batch = shape.batch;
  args.tiles = (shape.max_seqlen + kBlockN - 1) / kBlockN;
  args.chunk_pairs = std::max(1, kAttentionResidentCtas / args.tiles);
  args.scale = scale;
  args.rope_table = shape.rope_table;
  args.rope_positions = shape.rope_positions;
  const int64_t ctas = int64_t{args.tiles} * shape.num_kv_heads * shape.batch;
  if (ctas > INT32_MAX) return Status::InvalidArgument("attention: too many key tiles");
  auto* kernel = dq_by_tma ? AttentionBackwardWgmmaKernel<true> : AttentionBackwardWgmmaKernel<false>;
  GROVE_RETURN_IF_ERROR(CudaError(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
      "shared memory attribute"));
  kernel<<<unsigned(ctas), kThreads, kSmemBytes, stream>>>(tmap_q, tmap_k, tmap_v, tmap_do,
                                                            tmap_dq, args);
  return CudaError(cudaGetLastError(), "launch");
}

}  // namespace grove::kernels::detail
