// AttentionForwardImpl::kWgmma: the causal GQA flash-attention forward of
// attention.h on sm_90a, head_dim 128 (FlashAttention-3's structure: a TMA
// producer, wgmma consumers, P kept in registers).
//
// One CTA = 128 queries of one head of one sequence, three warpgroups.
// Warpgroup 0 is the producer: one thread loads the Q tile and then the
// K and V tiles of 128 keys, from the diagonal tile down to key 0, into a
// ring of kStages shared-memory stages with TMA (each tile two boxes of
// [128 rows][64 columns], 128-byte swizzled; the tensor maps' row pitch is
// the q / kv row stride, their width the heads' columns, so padding columns
// of strided rows are never read). K and V of a stage complete on separate
// "full" mbarriers, so S can start before V lands.
//
// Warpgroups 1 and 2 each own 64 query rows and, per key tile,
//   S = Q K^T               wgmma m64n128k16, Q and K K-major in shared memory
//   online softmax on S     fp32 in registers, exp2 with scale * log2(e) folded
//   O += P V                wgmma m64n128k16 with P (bf16) from registers and
//                           V [keys][dims] an MN-major B (transpose bit),
// with S of tile i issued together with P.V of tile i - 1 and the softmax
// of tile i written between the waits for the two (only after the second
// are O rescaled and P overwritten). The overlap inside a warpgroup that
// this order is meant for does not survive ptxas: the SASS (cuobjdump on
// the H100, 2026-11-23) has the wait for P.V hoisted to just after the
// row-max shuffles, so the exponentials run once P.V is done; only the
// other consumer warpgroup's wgmmas can fill that gap (not profiled).
// Two variants were built, tested and timed against this one (H100, same
// run, kernel_bench --attention): O rescaled under the next S before P.V
// is issued, with ex2.approx.ftz: within 2% at 512-1024 keys, 3% slower at
// 2048; the same with the P.V wait predicated on the softmax's row sums
// (to pin it after the exponentials): ptxas then serialized every wgmma
// (a wait after each), 3-11% slower. Neither was kept.
//
// The diagonal tile (first processed) is the only one masked; tiles wholly
// after the queries are never loaded.
//
// Rows past the sequence's end: the TMA boxes of the last query and key
// tiles run past it into the next sequence's rows (or TMA zeros past the
// tensor). A key there is after every real query of the tile, so causality
// sets its S to -inf and P = 0 exactly; but 0 * NaN is NaN, so the diagonal
// tile's V rows past the end are zeroed before P.V reads them (a non-finite
// value in the next sequence would otherwise reach this one's O). A query
// row there only feeds its own row of S, P and O, which is never stored.
//
// The epilogue normalizes O, rounds it to bf16 into the warpgroup's own Q
// rows of shared memory (same swizzle), and stores whole 16-byte chunks of
// the rows inside the sequence; lse goes straight from registers.
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "kernels/attention_internal.h"
#include "kernels/attention_tile_order.cuh"
#include "kernels/attention_wgmma_common.cuh"
#include "kernels/ptx/mbarrier.cuh"
#include "kernels/ptx/tensor_map.h"
#include "kernels/ptx/tma.cuh"
#include "kernels/ptx/wgmma.cuh"

namespace grove::kernels::detail {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kD = 128;       // head_dim
constexpr int kBlockM = 128;  // queries per CTA: two consumer warpgroups x 64 rows
constexpr int kBlockN = 128;  // keys per step
constexpr int kStages = 3;
constexpr int kThreads = 384;
// A [128 rows][64 columns] bf16 box, and a [128][128] tile of two of them.
constexpr int kBoxBytes = 128 * 128;
constexpr int kTileBytes = 2 * kBoxBytes;
static_assert(kBlockM == 128 && kBlockN == 128, "the tiles are two [128][64] TMA boxes");
// Shared memory: the Q tile, kStages K tiles, kStages V tiles, barriers.
constexpr int kKOffset = kTileBytes;
constexpr int kVOffset = kKOffset + kStages * kTileBytes;
constexpr int kBarOffset = kVOffset + kStages * kTileBytes;
constexpr int kBarriers = 1 + 3 * kStages;  // q_full, k_full[], v_full[], empty[]
constexpr int kSmemBytes = kBarOffset + kBarriers * 8 + 1024;  // + 1024-byte alignment slack
static_assert(kSmemBytes <= 227 * 1024);

struct FwdArgs {
  bf16* o;
  float* lse;
  const int32_t* cu_seqlens;
  int total_tokens, num_heads, group, batch;
  int tiles;        // query tiles of the longest sequence
  int chunk_pairs;  // see OrderTiles
  float scale;
};

// The device helpers exist in the sm_90a pass only (the compute_90 pass
// compiles the kernel's body out).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Named barrier over the 128 threads of consumer warpgroup c (ids 1, 2; 0
// is __syncthreads').
__device__ __forceinline__ void WarpgroupSync(int c) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c) : "memory");
}

// Named barrier over both consumer warpgroups (id 3, 256 threads).
__device__ __forceinline__ void ConsumersSync() { asm volatile("bar.sync 3, 256;\n" ::: "memory"); }

// S (64 x 128 keys, fp32 accumulators) = Q rows of warpgroup c times K^T:
// 8 k-slices of 16 head dims, the first four in box 0 of each tile.
__device__ __forceinline__ void IssueQK(float (&s)[64], const uint8_t* q_tile, int c,
                                        const uint8_t* k_tile) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const int box = (kk / 4) * kBoxBytes, col = (kk % 4) * 32;
    ptx::wgmma_m64n128k16_f32_bf16_ss(
        s, ptx::make_wgmma_desc_k_sw128(q_tile + box + c * 64 * 128 + col),
        ptx::make_wgmma_desc_k_sw128(k_tile + box + col), kk > 0 ? 1 : 0);
  }
}

// O (64 x 128 dims) (+)= P (64 x 128 keys, registers) V: k-slice kk is keys
// 16kk.. = rows 16kk.. of both V boxes, the second box (dims 64..127) one
// box further (the descriptor's leading byte offset).
__device__ __forceinline__ void IssuePV(float (&o)[64], const uint32_t (&p)[8][4],
                                        const uint8_t* v_tile, bool accumulate) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk)
    ptx::wgmma_m64n128k16_f32_bf16_rs_bmn(
        o, p[kk], ptx::make_wgmma_desc_mn_sw128(v_tile + kk * 16 * 128, kBoxBytes),
        (accumulate || kk > 0) ? 1 : 0);
}

// Online softmax of one tile: updates the thread's two rows' running max
// (of raw scores) and partial sum (its own columns only; the quad's are
// added at the end), turns s into exp2(s * sl2 - max * sl2) in place and
// returns in corr the factor the old O and sums take.
__device__ __forceinline__ void Softmax(float (&s)[64], float (&row_max)[2], float (&row_sum)[2],
                                        float (&corr)[2], float sl2) {
  float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
  for (int i = 0; i < 64; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    base[r] = (mx[r] == -INFINITY ? 0.f : mx[r]) * sl2;
    corr[r] = exp2f(row_max[r] * sl2 - base[r]);
    row_max[r] = mx[r];
    row_sum[r] *= corr[r];
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const int r = (i >> 1) & 1;
    s[i] = exp2f(fmaf(s[i], sl2, -base[r]));
    row_sum[r] += s[i];
  }
}

// P's A fragments: k-slice kk is accumulator registers 8kk..8kk+7 in pairs.
__device__ __forceinline__ void ToBf16(uint32_t (&p)[8][4], const float (&s)[64]) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e) p[kk][e] = PackBf16(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

__global__ void __launch_bounds__(kThreads, 1)
    AttentionForwardWgmmaKernel(const __grid_constant__ CUtensorMap tmap_q,
                                const __grid_constant__ CUtensorMap tmap_k,
                                const __grid_constant__ CUtensorMap tmap_v, FwdArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const TileOrder order = OrderTiles(blockIdx.x, a.tiles, a.num_heads * a.batch, a.chunk_pairs);
  const int h = order.pair % a.num_heads, b = order.pair / a.num_heads;
  const int m_block = a.tiles - 1 - order.tile;  // the last query tiles have the most keys
  const int start = a.cu_seqlens[b], len = a.cu_seqlens[b + 1] - start;
  const int m0 = m_block * kBlockM;
  if (m0 >= len) return;  // the whole CTA, before any barrier
  // kBlockN == kBlockM: key tile m_block is the diagonal, the last with a
  // key at or before some query of the tile.
  const int n_blocks = m_block + 1;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* q_tile = smem;
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + kBarOffset);
  uint64_t* k_full = q_full + 1;
  uint64_t* v_full = k_full + kStages;
  uint64_t* empty = v_full + kStages;
  auto k_tile = [&](int st) { return smem + kKOffset + st * kTileBytes; };
  auto v_tile = [&](int st) { return smem + kVOffset + st * kTileBytes; };

  if (threadIdx.x == 0) {
    ptx::mbarrier_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(&k_full[s], 1);
      ptx::mbarrier_init(&v_full[s], 1);
      ptx::mbarrier_init(&empty[s], 8);  // one arrival per consumer warp
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    ptx::setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      ptx::prefetch_tensormap(&tmap_q);
      ptx::prefetch_tensormap(&tmap_k);
      ptx::prefetch_tensormap(&tmap_v);
      const int kvh = h / a.group;
      ptx::mbarrier_arrive_expect_tx(q_full, kTileBytes);
      for (int box = 0; box < 2; ++box)
        ptx::cp_async_bulk_tensor_2d_g2s(q_tile + box * kBoxBytes, &tmap_q, h * kD + box * 64,
                                         start + m0, q_full);
      for (int i = 0; i < n_blocks; ++i) {
        const int st = i % kStages;
        const uint32_t phase = (i / kStages) & 1;
        const int row = start + (n_blocks - 1 - i) * kBlockN;
        ptx::mbarrier_wait_parity(&empty[st], phase ^ 1);
        ptx::mbarrier_arrive_expect_tx(&k_full[st], kTileBytes);
        for (int box = 0; box < 2; ++box)
          ptx::cp_async_bulk_tensor_2d_g2s(k_tile(st) + box * kBoxBytes, &tmap_k,
                                           kvh * kD + box * 64, row, &k_full[st]);
        ptx::mbarrier_arrive_expect_tx(&v_full[st], kTileBytes);
        for (int box = 0; box < 2; ++box)
          ptx::cp_async_bulk_tensor_2d_g2s(v_tile(st) + box * kBoxBytes, &tmap_v,
                                           kvh * kD + box * 64, row, &v_full[st]);
      }
    }
  } else {
    ptx::setmaxnreg_inc<240>();
    const int c = warpgroup - 1;  // rows 64c .. 64c + 63 of the tile
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, qd = lane % 4;
    const float sl2 = a.scale * kLog2e;
    float o[64], s[64];
    uint32_t p[8][4];
#pragma unroll
    for (int j = 0; j < 64; ++j) o[j] = 0.f;  // overwritten by the first P.V (accumulate 0)
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, corr[2];
    // The diagonal tile (stage 0, walked first) is the only one with keys
    // past the sequence's end: the next sequence's rows, or TMA's zero fill
    // past the tensor. Their P is 0, but 0 * NaN is NaN, so a non-finite
    // value there would leak into this sequence's O: those V rows are zeroed
    // before P.V reads the tile (K needs nothing: masked S is set, not
    // scaled). Uniform over the CTA, so both warpgroups reach the barrier.
    const int keys_in_diagonal = len - m0;
    auto clear_diagonal_v_tail = [&] {
      if (keys_in_diagonal >= kBlockN) return;
      ClearRowsFrom(v_tile(0), kBlockN, keys_in_diagonal);
      ptx::fence_proxy_async_shared_cta();
      ConsumersSync();
    };

    // Tile 0 of the walk: the diagonal, masked (key > query), no O yet.
    ptx::mbarrier_wait_parity(q_full, 0);
    ptx::mbarrier_wait_parity(&k_full[0], 0);
    ptx::wgmma_fence();
    IssueQK(s, q_tile, c, k_tile(0));
    ptx::wgmma_commit_group();
    ptx::wgmma_wait_group<0>();
    PinRegs(s);
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const int row = 64 * c + 16 * warp + g + 8 * ((i >> 1) & 1);
      const int col = 8 * (i >> 2) + 2 * qd + (i & 1);
      if (col > row) s[i] = -INFINITY;
    }
    Softmax(s, row_max, row_sum, corr, sl2);
    ToBf16(p, s);

    for (int i = 1; i < n_blocks; ++i) {
      const int st = i % kStages, prev = (i - 1) % kStages;
      ptx::mbarrier_wait_parity(&k_full[st], (i / kStages) & 1);
      ptx::mbarrier_wait_parity(&v_full[prev], ((i - 1) / kStages) & 1);
      if (i == 1) clear_diagonal_v_tail();
      ptx::wgmma_fence();
      IssueQK(s, q_tile, c, k_tile(st));
      ptx::wgmma_commit_group();
      IssuePV(o, p, v_tile(prev), i > 1);
      ptx::wgmma_commit_group();
      ptx::wgmma_wait_group<1>();  // S done; P.V still in flight (o, p untouched)
      PinRegs(s);
      Softmax(s, row_max, row_sum, corr, sl2);
      ptx::wgmma_wait_group<0>();
      PinRegs(o);
      PinRegs(p);
      if (lane == 0) ptx::mbarrier_arrive(&empty[prev]);
#pragma unroll
      for (int j = 0; j < 64; ++j) o[j] *= corr[(j >> 1) & 1];
      ToBf16(p, s);
    }
    const int last = (n_blocks - 1) % kStages;
    ptx::mbarrier_wait_parity(&v_full[last], ((n_blocks - 1) / kStages) & 1);
    if (n_blocks == 1) clear_diagonal_v_tail();
    ptx::wgmma_fence();
    IssuePV(o, p, v_tile(last), n_blocks > 1);
    ptx::wgmma_commit_group();
    ptx::wgmma_wait_group<0>();
    PinRegs(o);
    PinRegs(p);

    // Epilogue. Every wgmma of this warpgroup is done: its 64 Q rows (both
    // boxes) are free to stage O.
    float inv[2];
    const int row_base = m0 + 64 * c + 16 * warp + g;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv[r] = 1.f / sum;
      const int row = row_base + 8 * r;
      if (qd == 0 && row < len)
        a.lse[int64_t{h} * a.total_tokens + start + row] = row_max[r] * a.scale + logf(sum);
    }
    // Element (row, col) of the tile sits in box col / 64 at row * 128 bytes,
    // its 16-byte chunk (col % 64) / 8 XORed with row % 8 (TMA's 128-byte
    // swizzle, as Q arrived).
#pragma unroll
    for (int i = 0; i < 64; i += 2) {
      const int r = (i >> 1) & 1;
      const int row = 64 * c + 16 * warp + g + 8 * r;
      const int col = 8 * (i >> 2) + 2 * qd;
      const int chunk = ((col % 64) / 8) ^ (row % 8);
      *reinterpret_cast<uint32_t*>(q_tile + (col / 64) * kBoxBytes + row * 128 + chunk * 16 +
                                   (col % 8) * 2) = PackBf16(o[i] * inv[r], o[i + 1] * inv[r]);
    }
    WarpgroupSync(c);
    const int64_t o_stride = int64_t{a.num_heads} * kD;
    bf16* out = a.o + int64_t{start + m0 + 64 * c} * o_stride + h * kD;
#pragma unroll
    for (int k = 0; k < 64 * 16 / 128; ++k) {
      const int idx = tid + 128 * k, row = idx / 16, ch = idx % 16;
      if (m0 + 64 * c + row < len) {
        const int lrow = 64 * c + row;
        const uint4 val = *reinterpret_cast<const uint4*>(
            q_tile + (ch / 8) * kBoxBytes + lrow * 128 + (((ch % 8) ^ (lrow % 8)) * 16));
        *reinterpret_cast<uint4*>(out + row * o_stride + ch * 8) = val;
      }
    }
  }
#else
  __trap();  // built for a device without wgmma; the host never launches this
#endif
}

Status CudaError(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string("attention wgmma forward: ") + what + ": " +
                          cudaGetErrorString(err));
}

}  // namespace

Status LaunchAttentionForwardWgmma(const AttentionShape& shape, const bf16* q, const bf16* k,
                                   const bf16* v, bf16* out, float* lse, int64_t q_row_stride,
                                   int64_t kv_row_stride, float scale, cudaStream_t stream) {
  if (shape.head_dim != kD)
    return Status::InvalidArgument("attention wgmma forward: head_dim must be 128");
  const uint64_t tokens = static_cast<uint64_t>(shape.total_tokens);
  CUtensorMap tmap_q, tmap_k, tmap_v;
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(
      &tmap_q, q, tokens, uint64_t(shape.num_heads) * kD, q_row_stride, kBlockM, 64, 128));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(
      &tmap_k, k, tokens, uint64_t(shape.num_kv_heads) * kD, kv_row_stride, kBlockN, 64, 128));
  GROVE_RETURN_IF_ERROR(ptx::MakeTensorMap2dBf16Swizzled(
      &tmap_v, v, tokens, uint64_t(shape.num_kv_heads) * kD, kv_row_stride, kBlockN, 64, 128));
  FwdArgs args{};
  args.o = out;
  args.lse = lse;
  args.cu_seqlens = shape.cu_seqlens;
  args.total_tokens = shape.total_tokens;
  args.num_heads = shape.num_heads;
  args.group = shape.num_heads / shape.num_kv_heads;
  args.batch = shape.batch;
  args.tiles = (shape.max_seqlen + kBlockM - 1) / kBlockM;
  args.chunk_pairs = std::max(1, kAttentionResidentCtas / args.tiles);
  args.scale = scale;
  const int64_t ctas = int64_t{args.tiles} * shape.num_heads * shape.batch;
  if (ctas > INT32_MAX) return Status::InvalidArgument("attention: too many query tiles");
  GROVE_RETURN_IF_ERROR(CudaError(
      cudaFuncSetAttribute(AttentionForwardWgmmaKernel,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
      "shared memory attribute"));
  AttentionForwardWgmmaKernel<<<unsigned(ctas), kThreads, kSmemBytes, stream>>>(tmap_q, tmap_k,
                                                                                tmap_v, args);
  return CudaError(cudaGetLastError(), "launch");
}

}  // namespace grove::kernels::detail
