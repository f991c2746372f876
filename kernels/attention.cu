// Causal grouped-query flash attention (see attention.h), mma.sync m16n8k16
// bf16 -> fp32 with ldmatrix / stmatrix / cp.async from kernels/ptx.
//
// Forward (one CTA = 128 queries of one head, 4 warps x 32 rows): K/V tiles
// of 64 keys stream through a 2-stage cp.async ring; each warp keeps its
// rows' running max and sum (online softmax) and the O accumulator,
// rescaling it when the max grows. P goes from the S accumulator straight
// into the A fragment of P.V (same register layout). Key tiles wholly after
// a warp's rows are skipped; only tiles that cross the diagonal are masked.
//
// Backward (one CTA = 64 keys of one KV head, 4 warps x 16 keys): dK and dV
// live in registers while the CTA walks every query tile at or after its
// keys, for every query head of the group, recomputing
//   P^T = exp(scale K Q^T - lse),  dV += P^T dO,  dP^T = V dO^T,
//   dS^T = P^T (dP^T - rowsum(dO o O)),  dK += dS^T Q,  dQ += dS K
// dS^T goes through shared memory (bf16) so each warp can own 16 query rows
// for dQ, which is added into an fp32 buffer with float2 atomics and
// converted (times scale) at the end.
//
// Shared tiles are [rows][head_dim] bf16 with 16-byte chunks XOR-swizzled by
// row % 8, so the 8 row addresses of every ldmatrix/stmatrix hit 8 distinct
// bank groups. Rows past a sequence's end are zero-filled by cp.async: their
// keys are masked by causality (a key past the end is after every real
// query) and their queries have dO = 0 and rowsum = 0, so they add nothing.
#include "kernels/attention.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <string>

#include "kernels/attention_internal.h"
#include "kernels/attention_tile_order.cuh"
#include "kernels/ptx/cp_async.cuh"
#include "kernels/ptx/ldmatrix.cuh"
#include "kernels/ptx/mma.cuh"
#include "kernels/rope.h"
#include "kernels/rope_math.cuh"

namespace grove::kernels {
namespace {

using bf16 = __nv_bfloat16;
using ptx::cp_async_ca_4_zfill;
using ptx::cp_async_cg_16_zfill;
using ptx::cp_async_commit_group;
using ptx::cp_async_wait_group;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::mma_m16n8k16_bf16_f32;
using ptx::stmatrix_x4;
using detail::OrderTiles;
using detail::TileOrder;

constexpr int kTile = 64;  // queries per forward CTA, keys per backward CTA, and the step
constexpr int kThreads = 128;
// Forward: 128 queries per CTA, 32 per warp (two m16 tiles share every K / V
// fragment, halving the shared-memory reads per mma against 16 rows a warp).
constexpr int kFwdRowsPerWarp = 32;
constexpr int kFwdBlockM = 4 * kFwdRowsPerWarp;
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const bf16* out;
  const bf16* dout;
  bf16* o;  // forward output
  float* lse;
  const float* lse_in;
  float* dq_accum;
  float* dvec;  // [num_heads, total_tokens]
  bf16* dk;
  bf16* dv;
  const int32_t* cu_seqlens;
  // Row strides in elements: q and dq; k, v, dk, dv (AttentionShape's, 0
  // resolved to packed). out, dout and the dQ accumulator are packed rows of
  // num_heads * D. CheckShape bounds them by INT_MAX.
  int q_rs, kv_rs;
  int total_tokens, num_heads, num_kv_heads, group, batch;
  int tiles;        // query (forward) or key (backward) tiles of the longest sequence
  int chunk_pairs;  // see OrderTiles
  float scale;
};

// Element offset of (row, col) in a swizzled [rows][D] bf16 tile. A row of
// D >= 64 spans all 8 16-byte bank groups of a 128-byte line: its chunks are
// XORed with row % 8. A row of 32 is 4 chunks, two rows to a line (odd rows
// in the upper half): its chunks are XORed with (row / 2) % 4, which keeps the
// chunk index below 4 and still sends rows r..r+7 (r % 8 == 0) of one chunk
// column to 8 distinct bank groups.
template <int D>
__device__ __forceinline__ int Swz(int row, int col) {
  static_assert(D == 32 || D % 64 == 0, "the swizzle covers head_dim 32 and multiples of 64");
  const int mask = D == 32 ? ((row >> 1) & 3) : (row & 7);
  return row * D + (((col >> 3) ^ mask) << 3) + (col & 7);
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// cp.async a [ROWS][D] tile whose row r is at src + r * stride; rows >=
// valid are zero-filled (their source is not read).
template <int D, int ROWS = kTile>
__device__ __forceinline__ void LoadTile(bf16* dst, const bf16* src, int64_t stride, int valid,
                                         int tid) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int c = tid; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, ch = c % kChunks;
    const bool ok = r < valid;
    cp_async_cg_16_zfill(dst + Swz<D>(r, ch * 8), ok ? src + r * stride + ch * 8 : src,
                         ok ? 16 : 0);
  }
}

// Lane address offsets for ldmatrix x4 of the four 8x8 matrices:
// "A order" (rows +0/+8 first, then cols +8), used for A fragments and for
// trans B fragments; "B order" (cols +8 first, then rows +8) for non-trans B.
__device__ __forceinline__ int RowA(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int ColA(int lane) { return (lane >> 4) * 8; }
__device__ __forceinline__ int RowB(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int ColB(int lane) { return ((lane >> 3) & 1) * 8; }

// acc[16 x 64] += A(16 x D, fragments from a swizzled [*, D] tile at row a_row0)
// times B^T where B is a swizzled [64][D] tile (rows are the 64 output columns).
template <int D>
__device__ __forceinline__ void MmaRowsTimesTileT(float (&acc)[8][4], const bf16* a_tile,
                                                  int a_row0, const bf16* b_tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a[0], a[1], a[2], a[3], a_tile + Swz<D>(a_row0 + RowA(lane), kk * 16 + ColA(lane)));
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b0[2], b1[2];
      ldmatrix_x4(b0[0], b0[1], b1[0], b1[1],
                  b_tile + Swz<D>(np * 16 + RowB(lane), kk * 16 + ColB(lane)));
      mma_m16n8k16_bf16_f32(acc[2 * np], a, b0);
      mma_m16n8k16_bf16_f32(acc[2 * np + 1], a, b1);
    }
  }
}

// acc[16 x D] += P(16 x 64, in S-accumulator layout) times a swizzled [64][D] tile.
template <int D>
__device__ __forceinline__ void MmaAccTimesTile(float (&acc)[D / 8][4], const float (&p)[8][4],
                                                const bf16* tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {PackBf16(p[2 * kk][0], p[2 * kk][1]),
                           PackBf16(p[2 * kk][2], p[2 * kk][3]),
                           PackBf16(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                           PackBf16(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b0[2], b1[2];
      ldmatrix_x4_trans(b0[0], b0[1], b1[0], b1[1],
                        tile + Swz<D>(kk * 16 + RowA(lane), dp * 16 + ColA(lane)));
      mma_m16n8k16_bf16_f32(acc[2 * dp], a, b0);
      mma_m16n8k16_bf16_f32(acc[2 * dp + 1], a, b1);
    }
  }
}

// Writes a warp's 16 x D accumulator (times row_scale[0] for rows g, [1] for
// g + 8) as bf16 into rows row0.. of a swizzled tile.
template <int D>
__device__ __forceinline__ void StoreAccToTile(bf16* tile, int row0, const float (&acc)[D / 8][4],
                                               float s0, float s1, int lane) {
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp)
    stmatrix_x4(tile + Swz<D>(row0 + RowA(lane), dp * 16 + ColA(lane)),
                PackBf16(acc[2 * dp][0] * s0, acc[2 * dp][1] * s0),
                PackBf16(acc[2 * dp][2] * s1, acc[2 * dp][3] * s1),
                PackBf16(acc[2 * dp + 1][0] * s0, acc[2 * dp + 1][1] * s0),
                PackBf16(acc[2 * dp + 1][2] * s1, acc[2 * dp + 1][3] * s1));
}

// Copies a warp's ROWS rows of a swizzled tile to global rows (row0 + r) *
// stride, 16-byte stores, rows >= valid skipped.
template <int D, int ROWS = 16>
__device__ __forceinline__ void StoreRows(bf16* dst, int64_t stride, const bf16* tile, int row0,
                                          int valid, int lane) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int c = lane; c < ROWS * kChunks; c += 32) {
    const int r = c / kChunks, ch = c % kChunks;
    if (r < valid)
      *reinterpret_cast<uint4*>(dst + r * stride + ch * 8) =
          *reinterpret_cast<const uint4*>(tile + Swz<D>(row0 + r, ch * 8));
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) AttentionForwardKernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* s_q = reinterpret_cast<bf16*>(smem_raw);  // [kFwdBlockM][D]
  bf16* s_k = s_q + kFwdBlockM * D;                // 2 stages of [64][D]
  bf16* s_v = s_k + 2 * kTile * D;                 // 2 stages
  const TileOrder order = OrderTiles(blockIdx.x, p.tiles, p.num_heads * p.batch, p.chunk_pairs);
  const int h = order.pair % p.num_heads, b = order.pair / p.num_heads;
  const int m_block = p.tiles - 1 - order.tile;  // the last query tiles have the most keys
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;
  const int m0 = m_block * kFwdBlockM;
  if (m0 >= len) return;
  const int kvh = h / p.group;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
  const int wrow = warp * kFwdRowsPerWarp;  // the warp's first row in the tile
  const int64_t q_stride = p.q_rs, kv_stride = p.kv_rs, o_stride = int64_t{p.num_heads} * D;
  const bf16* g_k = p.k + int64_t{start} * kv_stride + kvh * D;
  const bf16* g_v = p.v + int64_t{start} * kv_stride + kvh * D;

  LoadTile<D, kFwdBlockM>(s_q, p.q + int64_t{start + m0} * q_stride + h * D, q_stride, len - m0,
                          tid);
  LoadTile<D>(s_k, g_k, kv_stride, len, tid);
  LoadTile<D>(s_v, g_v, kv_stride, len, tid);
  cp_async_commit_group();

  const float sl2 = p.scale * kLog2e;
  float o[2][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  float row_max[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
  float row_sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  const int n_blocks = min((m0 + kFwdBlockM) / kTile, (len + kTile - 1) / kTile);
  for (int j = 0; j < n_blocks; ++j) {
    cp_async_wait_group<0>();
    __syncthreads();
    if (j + 1 < n_blocks) {
      const int st = (j + 1) & 1, n1 = (j + 1) * kTile;
      LoadTile<D>(s_k + st * kTile * D, g_k + n1 * kv_stride, kv_stride, len - n1, tid);
      LoadTile<D>(s_v + st * kTile * D, g_v + n1 * kv_stride, kv_stride, len - n1, tid);
    }
    cp_async_commit_group();
    const int n0 = j * kTile;
    if (n0 > m0 + wrow + kFwdRowsPerWarp - 1) continue;  // every key after every row of the warp
    const bf16* k_tile = s_k + (j & 1) * kTile * D;
    const bf16* v_tile = s_v + (j & 1) * kTile * D;
    float s[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                    s_q + Swz<D>(wrow + mt * 16 + RowA(lane), kk * 16 + ColA(lane)));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b0[2], b1[2];
        ldmatrix_x4(b0[0], b0[1], b1[0], b1[1],
                    k_tile + Swz<D>(np * 16 + RowB(lane), kk * 16 + ColB(lane)));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_m16n8k16_bf16_f32(s[mt][2 * np], a[mt], b0);
          mma_m16n8k16_bf16_f32(s[mt][2 * np + 1], a[mt], b1);
        }
      }
    }
    if (n0 + kTile - 1 > m0 + wrow) {  // some key after some row: mask key > query
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (n0 + nt * 8 + 2 * q + (e & 1) > m0 + wrow + mt * 16 + g + (e >> 1) * 8)
              s[mt][nt][e] = -INFINITY;
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base = (mx == -INFINITY ? 0.f : mx) * sl2;
        const float corr = exp2f(row_max[mt][r] * sl2 - base);
        row_max[mt][r] = mx;
        row_sum[mt][r] *= corr;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[mt][i][2 * r] *= corr;
          o[mt][i][2 * r + 1] *= corr;
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          s[mt][nt][2 * r] = exp2f(s[mt][nt][2 * r] * sl2 - base);
          s[mt][nt][2 * r + 1] = exp2f(s[mt][nt][2 * r + 1] * sl2 - base);
          row_sum[mt][r] += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
      }
    // O += P V; each V fragment serves both 16-row halves of the warp.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        a[mt][0] = PackBf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = PackBf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = PackBf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = PackBf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b0[2], b1[2];
        ldmatrix_x4_trans(b0[0], b0[1], b1[0], b1[1],
                          v_tile + Swz<D>(kk * 16 + RowA(lane), dp * 16 + ColA(lane)));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_m16n8k16_bf16_f32(o[mt][2 * dp], a[mt], b0);
          mma_m16n8k16_bf16_f32(o[mt][2 * dp + 1], a[mt], b1);
        }
      }
    }
  }
  cp_async_wait_group<0>();
  __syncwarp();  // the warp's Q rows (read only by this warp) become the O staging area
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv[r] = 1.f / sum;
      const int row = m0 + wrow + mt * 16 + g + r * 8;
      if (q == 0 && row < len)
        p.lse[int64_t{h} * p.total_tokens + start + row] = row_max[mt][r] * p.scale + logf(sum);
    }
    StoreAccToTile<D>(s_q, wrow + mt * 16, o[mt], inv[0], inv[1], lane);
  }
  __syncwarp();
  StoreRows<D, kFwdRowsPerWarp>(p.o + int64_t{start + m0 + wrow} * o_stride + h * D, o_stride,
                                s_q, wrow, len - m0 - wrow, lane);
}

// dvec[h, t] = sum_d dO[t, h, d] * O[t, h, d]; one warp per (token, head).
template <int D>
__global__ void AttentionRowDotKernel(Params p) {
  const int64_t rows = int64_t{p.total_tokens} * p.num_heads;
  const int lane = threadIdx.x & 31;
  for (int64_t w = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5; w < rows;
       w += (int64_t{gridDim.x} * blockDim.x) >> 5) {
    const bf16* o = p.out + w * D;
    const bf16* d = p.dout + w * D;
    float acc = 0.f;
#pragma unroll
    for (int i = lane * 2; i < D; i += 64) {
      const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + i));
      const float2 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(d + i));
      acc += a.x * c.x + a.y * c.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      const int64_t t = w / p.num_heads, h = w % p.num_heads;
      p.dvec[h * p.total_tokens + t] = acc;
    }
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) AttentionBackwardKernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* s_k = reinterpret_cast<bf16*>(smem_raw);
  bf16* s_v = s_k + kTile * D;
  bf16* s_q = s_v + kTile * D;         // 2 stages
  bf16* s_do = s_q + 2 * kTile * D;    // 2 stages
  bf16* s_ds = s_do + 2 * kTile * D;   // [64 keys][64 queries]
  float* s_lse = reinterpret_cast<float*>(s_ds + kTile * kTile);  // 2 stages
  float* s_dvec = s_lse + 2 * kTile;                              // 2 stages
  const TileOrder order =
      OrderTiles(blockIdx.x, p.tiles, p.num_kv_heads * p.batch, p.chunk_pairs);
  const int kvh = order.pair % p.num_kv_heads, b = order.pair / p.num_kv_heads;
  const int n_block = order.tile;  // key tile 0 sees every query tile: the most work
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;
  const int n0 = n_block * kTile;
  if (n0 >= len) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
  const int per_head = (len + kTile - 1) / kTile - n_block;
  const int steps = p.group * per_head;

  auto load_step = [&](int t, int st) {
    const int h = kvh * p.group + t / per_head, m0 = (n_block + t % per_head) * kTile;
    const int64_t row = start + m0;
    LoadTile<D>(s_q + st * kTile * D, p.q + row * p.q_rs + h * D, p.q_rs, len - m0, tid);
    LoadTile<D>(s_do + st * kTile * D, p.dout + (row * p.num_heads + h) * D, p.num_heads * D,
                len - m0, tid);
    if (tid < kTile) {
      const bool ok = m0 + tid < len;
      const int64_t i = int64_t{h} * p.total_tokens + start + (ok ? m0 + tid : 0);
      cp_async_ca_4_zfill(s_lse + st * kTile + tid, p.lse_in + i, ok ? 4 : 0);
      cp_async_ca_4_zfill(s_dvec + st * kTile + tid, p.dvec + i, ok ? 4 : 0);
    }
  };
  const int64_t kv_off = int64_t{start + n0} * p.kv_rs + kvh * D;
  LoadTile<D>(s_k, p.k + kv_off, p.kv_rs, len - n0, tid);
  LoadTile<D>(s_v, p.v + kv_off, p.kv_rs, len - n0, tid);
  load_step(0, 0);
  cp_async_commit_group();

  const float sl2 = p.scale * kLog2e;
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  for (int t = 0; t < steps; ++t) {
    cp_async_wait_group<0>();
    __syncthreads();
    if (t + 1 < steps) load_step(t + 1, (t + 1) & 1);
    cp_async_commit_group();
    const int st = t & 1;
    const int h = kvh * p.group + t / per_head, m_block = n_block + t % per_head;
    const int m0 = m_block * kTile;
    const bf16* q_tile = s_q + st * kTile * D;
    const bf16* do_tile = s_do + st * kTile * D;
    const float* lse = s_lse + st * kTile;
    const float* dvec = s_dvec + st * kTile;

    float s[8][4];  // S^T, then P^T: rows = the warp's 16 keys, cols = 64 queries
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    MmaRowsTimesTileT<D>(s, s_k, warp * 16, q_tile, lane);
    const bool diagonal = m_block == n_block;
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = mt * 8 + 2 * q + (e & 1), n = warp * 16 + g + (e >> 1) * 8;
        s[mt][e] = (diagonal && m < n) ? 0.f : exp2f(s[mt][e] * sl2 - lse[m] * kLog2e);
      }
    MmaAccTimesTile<D>(dv, s, do_tile, lane);

    float ds[8][4];  // dP^T, then dS^T
#pragma unroll
    for (int i = 0; i < 8; ++i) ds[i][0] = ds[i][1] = ds[i][2] = ds[i][3] = 0.f;
    MmaRowsTimesTileT<D>(ds, s_v, warp * 16, do_tile, lane);
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[mt][e] = s[mt][e] * (ds[mt][e] - dvec[mt * 8 + 2 * q + (e & 1)]);
    MmaAccTimesTile<D>(dk, ds, q_tile, lane);

#pragma unroll
    for (int mp = 0; mp < 4; ++mp)
      stmatrix_x4(s_ds + Swz<kTile>(warp * 16 + RowA(lane), mp * 16 + ColA(lane)),
                  PackBf16(ds[2 * mp][0], ds[2 * mp][1]), PackBf16(ds[2 * mp][2], ds[2 * mp][3]),
                  PackBf16(ds[2 * mp + 1][0], ds[2 * mp + 1][1]),
                  PackBf16(ds[2 * mp + 1][2], ds[2 * mp + 1][3]));
    __syncthreads();
    // dQ rows warp*16.. of this query tile: dS (the transpose of s_ds) times K.
    uint32_t af[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      ldmatrix_x4_trans(af[kk][0], af[kk][1], af[kk][2], af[kk][3],
                        s_ds + Swz<kTile>(kk * 16 + RowB(lane), warp * 16 + ColB(lane)));
    float* dq_rows = p.dq_accum + (int64_t{start + m0 + warp * 16 + g} * p.num_heads + h) * D;
    const bool row_ok[2] = {m0 + warp * 16 + g < len, m0 + warp * 16 + g + 8 < len};
#pragma unroll
    for (int dc = 0; dc < D / 32; ++dc) {
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int d2 = 0; d2 < 2; ++d2) {
          uint32_t b0[2], b1[2];
          ldmatrix_x4_trans(b0[0], b0[1], b1[0], b1[1],
                            s_k + Swz<D>(kk * 16 + RowA(lane), (dc * 2 + d2) * 16 + ColA(lane)));
          mma_m16n8k16_bf16_f32(acc[2 * d2], af[kk], b0);
          mma_m16n8k16_bf16_f32(acc[2 * d2 + 1], af[kk], b1);
        }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int d = dc * 32 + nt * 8 + 2 * q;
#pragma unroll
        for (int r = 0; r < 2; ++r)
          if (row_ok[r])
            atomicAdd(reinterpret_cast<float2*>(dq_rows + r * 8 * (int64_t{p.num_heads} * D) + d),
                      make_float2(acc[nt][2 * r], acc[nt][2 * r + 1]));
      }
    }
  }
  cp_async_wait_group<0>();
  __syncthreads();  // every warp is done with the Q / dO stages: reuse them for dK / dV
  StoreAccToTile<D>(s_q, warp * 16, dk, p.scale, p.scale, lane);
  StoreAccToTile<D>(s_do, warp * 16, dv, 1.f, 1.f, lane);
  __syncwarp();
  const int valid = len - n0 - warp * 16;
  const int64_t row_off = int64_t{start + n0 + warp * 16} * p.kv_rs + kvh * D;
  StoreRows<D>(p.dk + row_off, p.kv_rs, s_q, warp * 16, valid, lane);
  StoreRows<D>(p.dv + row_off, p.kv_rs, s_do, warp * 16, valid, lane);
}

// dq = bf16(dq_accum * scale), 4 elements per thread: quad i is column quad
// i % row_quads of row i / row_quads, whose dq row starts row_stride
// elements after the previous one (a multiple of 4: 8-byte stores).
__global__ void AttentionDqConvertKernel(const float* __restrict__ acc, bf16* __restrict__ dq,
                                         int64_t quads, int row_quads, int64_t row_stride,
                                         float scale) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < quads;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float4 v = reinterpret_cast<const float4*>(acc)[i];
    uint2 out;
    out.x = PackBf16(v.x * scale, v.y * scale);
    out.y = PackBf16(v.z * scale, v.w * scale);
    const int64_t row = i / row_quads;
    *reinterpret_cast<uint2*>(dq + row * row_stride + (i - row * row_quads) * 4) = out;
  }
}

// The same with the rotary embedding's backward (AttentionShape::
// rope_table): a unit is one quad of a head's first half (columns 4 j ..
// 4 j + 3) and its partner quad half a head later; each value is rounded to
// bf16 as above, then rotated by -angle as RopeBackward rotates the stored
// dq (RotatePair with -sin) and rounded again: RopeBackward's bits.
__global__ void AttentionDqConvertRopeKernel(const float* __restrict__ acc, bf16* __restrict__ dq, int64_t units,
                                             int heads, int head_dim, int64_t row_stride, float scale,
                                             const float2* __restrict__ table,
                                             const int32_t* __restrict__ positions) {
  const int half = head_dim / 2, per_head = half / 4, per_row = heads * per_head;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < units; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / per_row;
    const int rem = int(i - row * per_row), h = rem / per_head, j = rem % per_head;
    const float* src = acc + (row * heads + h) * head_dim + 4 * j;
    const float4 a = *reinterpret_cast<const float4*>(src);
    const float4 b = *reinterpret_cast<const float4*>(src + half);
    const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
    const float2* w = table + int64_t{positions[row]} * half + 4 * j;
    float x[4], y[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float lo = __bfloat162float(__float2bfloat16_rn(av[e] * scale));
      const float hi = __bfloat162float(__float2bfloat16_rn(bv[e] * scale));
      const float2 cs = w[e];
      RotatePair(lo, hi, cs.x, -cs.y, x[e], y[e]);
    }
    bf16* out = dq + row * row_stride + int64_t{h} * head_dim + 4 * j;
    *reinterpret_cast<uint2*>(out) = make_uint2(PackBf16(x[0], x[1]), PackBf16(x[2], x[3]));
    *reinterpret_cast<uint2*>(out + half) = make_uint2(PackBf16(y[0], y[1]), PackBf16(y[2], y[3]));
  }
}

bool Aligned(const void* ptr, uintptr_t to) {
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % to == 0;
}

Status CheckShape(const AttentionShape& s) {
  auto bad = [](const std::string& what) {
    return Status::InvalidArgument("attention: " + what);
  };
  if (s.batch < 0 || s.batch > 65535) return bad("batch must be in [0, 65535]");
  if (s.total_tokens < 0) return bad("total_tokens must be >= 0");
  if (s.head_dim != 32 && s.head_dim != 64 && s.head_dim != 128)
    return bad("head_dim must be 32, 64 or 128, got " + std::to_string(s.head_dim));
  if (s.num_heads <= 0 || s.num_kv_heads <= 0 || s.num_heads % s.num_kv_heads != 0)
    return bad("num_kv_heads (" + std::to_string(s.num_kv_heads) +
               ") must be positive and divide num_heads (" + std::to_string(s.num_heads) + ")");
  if (s.num_heads > 65535) return bad("num_heads must be <= 65535");
  if (!(std::isfinite(s.softmax_scale) && s.softmax_scale >= 0.f))
    return bad("softmax_scale must be finite and >= 0 (0: 1/sqrt(head_dim))");
  auto check_stride = [&](int64_t stride, int heads, const char* which) -> Status {
    const int64_t packed = int64_t{heads} * s.head_dim;
    if (stride != 0 && (stride < packed || stride % 8 != 0 || stride > INT_MAX))
      return bad(std::string(which) + " must be 0 (packed) or a multiple of 8 (16-byte rows) in [" +
                 std::to_string(packed) + ", INT_MAX], got " + std::to_string(stride));
    return Status::OK();
  };
  GROVE_RETURN_IF_ERROR(check_stride(s.q_row_stride, s.num_heads, "q_row_stride"));
  GROVE_RETURN_IF_ERROR(check_stride(s.kv_row_stride, s.num_kv_heads, "kv_row_stride"));
  if ((s.rope_table == nullptr) != (s.rope_positions == nullptr))
    return bad("rope_table and rope_positions go together");
  if (s.batch > 0 && s.total_tokens > 0) {
    if (s.max_seqlen <= 0) return bad("max_seqlen must be positive");
    if (s.cu_seqlens == nullptr || !Aligned(s.cu_seqlens, 4)) return bad("cu_seqlens is null");
  }
  return Status::OK();
}

bool Empty(const AttentionShape& s) { return s.batch == 0 || s.total_tokens == 0; }

Params MakeParams(const AttentionShape& s) {
  Params p{};
  p.cu_seqlens = s.cu_seqlens;
  p.total_tokens = s.total_tokens;
  p.num_heads = s.num_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.group = s.num_heads / s.num_kv_heads;
  p.q_rs = int(s.q_row_stride > 0 ? s.q_row_stride : int64_t{s.num_heads} * s.head_dim);
  p.kv_rs = int(s.kv_row_stride > 0 ? s.kv_row_stride : int64_t{s.num_kv_heads} * s.head_dim);
  p.batch = s.batch;
  p.scale = s.softmax_scale > 0.f ? s.softmax_scale : 1.f / std::sqrt(float(s.head_dim));
  return p;
}

Status LaunchStatus(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string("attention: ") + what + ": " + cudaGetErrorString(err));
}

constexpr size_t ForwardSmem(int d) { return (size_t{kFwdBlockM} + 4 * kTile) * d * sizeof(bf16); }
constexpr size_t BackwardSmem(int d) {
  return (size_t{6} * kTile * d + kTile * kTile) * sizeof(bf16) + 4 * kTile * sizeof(float);
}

template <int D>
Status LaunchForward(const AttentionShape& s, const Params& p, cudaStream_t stream) {
  const size_t smem = ForwardSmem(D);
  cudaError_t err = cudaFuncSetAttribute(AttentionForwardKernel<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess)
    return Status::Internal(std::string("attention: smem attribute: ") + cudaGetErrorString(err));
  Params args = p;
  args.tiles = (s.max_seqlen + kFwdBlockM - 1) / kFwdBlockM;
  args.chunk_pairs = std::max(1, detail::kAttentionResidentCtas / args.tiles);
  const int64_t ctas = int64_t{args.tiles} * s.num_heads * s.batch;
  if (ctas > INT32_MAX) return Status::InvalidArgument("attention: too many query tiles");
  AttentionForwardKernel<D><<<unsigned(ctas), kThreads, smem, stream>>>(args);
  return LaunchStatus("forward launch");
}

template <int D>
Status LaunchBackwardMain(const AttentionShape& s, const Params& p, cudaStream_t stream) {
  const size_t smem = BackwardSmem(D);
  cudaError_t err = cudaFuncSetAttribute(AttentionBackwardKernel<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess)
    return Status::Internal(std::string("attention: smem attribute: ") + cudaGetErrorString(err));
  Params args = p;
  args.tiles = (s.max_seqlen + kTile - 1) / kTile;
  args.chunk_pairs = std::max(1, detail::kAttentionResidentCtas / args.tiles);
  const int64_t ctas = int64_t{args.tiles} * s.num_kv_heads * s.batch;
  if (ctas > INT32_MAX) return Status::InvalidArgument("attention: too many key tiles");
  AttentionBackwardKernel<D><<<unsigned(ctas), kThreads, smem, stream>>>(args);
  return LaunchStatus("backward launch");
}

}  // namespace

bool AttentionForwardWgmmaSupported(int head_dim) {
  int dev = 0, major = 0, minor = 0;
  if (head_dim != 128 || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;  // sm_90a machine code runs on 9.0 only
}

namespace {

// kAuto's kernel: the environment variable `var` (mma | wgmma) where set,
// else wgmma where it runs (sm_90, head_dim 128; measured faster there in
// both directions, docs/kernels.md), else mma.sync.
Status AutoChoosesWgmma(const char* var, int head_dim, bool* wgmma) {
  *wgmma = AttentionForwardWgmmaSupported(head_dim);
  return detail::ReadPathChoice(var, "mma", "wgmma", wgmma);
}

}  // namespace

namespace detail {

Status ReadPathChoice(const char* var, const char* first, const char* second, bool* chose_second) {
  const char* env = std::getenv(var);
  if (env == nullptr || *env == '\0') return Status::OK();
  const std::string choice = env;
  if (choice != first && choice != second)
    return Status::InvalidArgument(std::string(var) + " must be " + first + " or " + second + ", got " + choice);
  *chose_second = choice == second;
  return Status::OK();
}

}  // namespace detail

Status AttentionForwardWith(AttentionForwardImpl impl, const AttentionShape& shape,
                            const __nv_bfloat16* q, const __nv_bfloat16* k,
                            const __nv_bfloat16* v, __nv_bfloat16* out, float* lse,
                            cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape(shape));
  if (Empty(shape)) return Status::OK();
  if (!Aligned(q, 16) || !Aligned(k, 16) || !Aligned(v, 16) || !Aligned(out, 16) ||
      !Aligned(lse, 4))
    return Status::InvalidArgument(
        "attention forward: q, k, v, out must be non-null and 16-byte aligned, lse non-null");
  if (impl == AttentionForwardImpl::kAuto) {
    bool wgmma = false;
    GROVE_RETURN_IF_ERROR(AutoChoosesWgmma("GROVE_ATTENTION_FWD", shape.head_dim, &wgmma));
    impl = wgmma ? AttentionForwardImpl::kWgmma : AttentionForwardImpl::kMmaSync;
  }
  Params p = MakeParams(shape);
  if (impl == AttentionForwardImpl::kWgmma) {
    if (!AttentionForwardWgmmaSupported(shape.head_dim))
      return Status::FailedPrecondition(
          "attention forward: the wgmma kernel needs an sm_90 GPU and head_dim 128");
    return detail::LaunchAttentionForwardWgmma(shape, q, k, v, out, lse, p.q_rs, p.kv_rs, p.scale,
                                               stream);
  }
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = out;
  p.lse = lse;
  switch (shape.head_dim) {
    case 32: return LaunchForward<32>(shape, p, stream);
    case 64: return LaunchForward<64>(shape, p, stream);
    default: return LaunchForward<128>(shape, p, stream);  // CheckShape allows only these three
  }
}

Status AttentionForward(const AttentionShape& shape, const __nv_bfloat16* q,
                        const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out,
                        float* lse, cudaStream_t stream) {
  return AttentionForwardWith(AttentionForwardImpl::kAuto, shape, q, k, v, out, lse, stream);
}

size_t AttentionBackwardWorkspaceBytes(const AttentionShape& shape) {
  if (shape.total_tokens <= 0 || shape.num_heads <= 0 || shape.head_dim <= 0) return 0;
  const size_t rows = size_t(shape.total_tokens) * shape.num_heads;
  return rows * shape.head_dim * sizeof(float) + (rows * sizeof(float) + 15) / 16 * 16;
}

Status AttentionBackwardWith(AttentionBackwardImpl impl, const AttentionShape& shape,
                             const __nv_bfloat16* q, const __nv_bfloat16* k,
                             const __nv_bfloat16* v, const __nv_bfloat16* out,
                             const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq,
                             __nv_bfloat16* dk, __nv_bfloat16* dv, void* workspace,
                             cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape(shape));
  if (Empty(shape)) return Status::OK();
  const void* tensors[] = {q, k, v, out, dout, dq, dk, dv, workspace};
  for (const void* ptr : tensors)
    if (!Aligned(ptr, 16))
      return Status::InvalidArgument(
          "attention backward: tensors and workspace must be non-null and 16-byte aligned");
  if (!Aligned(lse, 4)) return Status::InvalidArgument("attention backward: lse is null");
  if (impl == AttentionBackwardImpl::kAuto) {
    bool wgmma = false;
    GROVE_RETURN_IF_ERROR(AutoChoosesWgmma("GROVE_ATTENTION_BWD", shape.head_dim, &wgmma));
    impl = wgmma ? AttentionBackwardImpl::kWgmma : AttentionBackwardImpl::kMmaSync;
  }
  if (impl == AttentionBackwardImpl::kWgmma && !AttentionForwardWgmmaSupported(shape.head_dim))
    return Status::FailedPrecondition(
        "attention backward: the wgmma kernel needs an sm_90 GPU and head_dim 128");
  Params p = MakeParams(shape);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.dout = dout;
  p.lse_in = lse;
  p.dk = dk;
  p.dv = dv;
  p.dq_accum = static_cast<float*>(workspace);
  const size_t acc_bytes = size_t(shape.total_tokens) * shape.num_heads * shape.head_dim * 4;
  p.dvec = reinterpret_cast<float*>(static_cast<char*>(workspace) + acc_bytes);
  cudaError_t err = cudaMemsetAsync(p.dq_accum, 0, acc_bytes, stream);
  if (err != cudaSuccess)
    return Status::Internal(std::string("attention: memset: ") + cudaGetErrorString(err));
  switch (shape.head_dim) {
    case 32: AttentionRowDotKernel<32><<<1024, 256, 0, stream>>>(p); break;
    case 64: AttentionRowDotKernel<64><<<1024, 256, 0, stream>>>(p); break;
    default: AttentionRowDotKernel<128><<<1024, 256, 0, stream>>>(p); break;
  }
  GROVE_RETURN_IF_ERROR(LaunchStatus("row-dot launch"));
  if (impl == AttentionBackwardImpl::kWgmma) {
    GROVE_RETURN_IF_ERROR(detail::LaunchAttentionBackwardWgmma(
        shape, q, k, v, dout, lse, p.dvec, p.dq_accum, dk, dv, p.q_rs, p.kv_rs, p.scale, stream));
  } else {
    switch (shape.head_dim) {
      case 32: GROVE_RETURN_IF_ERROR(LaunchBackwardMain<32>(shape, p, stream)); break;
      case 64: GROVE_RETURN_IF_ERROR(LaunchBackwardMain<64>(shape, p, stream)); break;
      default: GROVE_RETURN_IF_ERROR(LaunchBackwardMain<128>(shape, p, stream)); break;
    }
  }
  const int64_t quads = int64_t{shape.total_tokens} * shape.num_heads * shape.head_dim / 4;
  if (shape.rope_table != nullptr) {
    if (impl != AttentionBackwardImpl::kWgmma) {  // the wgmma kernel rotates dK as it stores it
      GROVE_RETURN_IF_ERROR(RopeBackwardFromTable(dk, shape.rope_positions, shape.total_tokens, shape.num_kv_heads,
                                                  shape.head_dim, shape.rope_table, stream, p.kv_rs));
    }
    AttentionDqConvertRopeKernel<<<1024, 256, 0, stream>>>(p.dq_accum, dq, quads / 2, shape.num_heads,
                                                           shape.head_dim, p.q_rs, p.scale, shape.rope_table,
                                                           shape.rope_positions);
    return LaunchStatus("dq convert launch");
  }
  AttentionDqConvertKernel<<<1024, 256, 0, stream>>>(p.dq_accum, dq, quads,
                                                     shape.num_heads * shape.head_dim / 4, p.q_rs,
                                                     p.scale);
  return LaunchStatus("dq convert launch");
}

Status AttentionBackward(const AttentionShape& shape, const __nv_bfloat16* q,
                         const __nv_bfloat16* k, const __nv_bfloat16* v,
                         const __nv_bfloat16* out, const __nv_bfloat16* dout, const float* lse,
                         __nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv,
                         void* workspace, cudaStream_t stream) {
  return AttentionBackwardWith(AttentionBackwardImpl::kAuto, shape, q, k, v, out, dout, lse, dq,
                               dk, dv, workspace, stream);
}

}  // namespace grove::kernels
