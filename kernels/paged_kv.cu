#include "kernels/paged_kv.h"

#include "kernels/launch.cuh"
#include "kernels/paged_kv_device.cuh"
#include "kernels/paged_kv_internal.h"
#include "kernels/ptx/cp_async.cuh"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/ptx/prefetch.cuh"
#include "kernels/softmax_merge.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace grove::kernels {
namespace {

// Query heads per kv head up to which the attention kernels size their
// per-head registers for 4 instead of kPagedMaxGroup (gpu-ref: 8 / 2 = 4).
constexpr int kSmallGroup = 4;
bool SmallGroup(const PagedKvCache& c, int heads) { return heads / c.kv_heads <= kSmallGroup; }

using namespace paged_device;

constexpr int kAppendThreads = 256;

// One block per row. Work items: rope pairs of the q heads and the k heads
// ((heads + kv_heads) * half), then the v elements (kv_heads * head_dim).
__global__ void AppendKernel(PagedKvCache c, PagedRows rows, int heads, const float* qkv, int64_t ld,
                             const float* rope_cos, const float* rope_sin, __nv_bfloat16* q_out) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  const int r = blockIdx.x;
  const int slot = rows.slot[r], p = rows.pos[r];
  const int hd = c.head_dim, half = hd / 2;
  const float* row = qkv + int64_t(r) * ld;
  __nv_bfloat16* qo = q_out + int64_t(r) * heads * hd;
  const int pairs = (heads + c.kv_heads) * half;
  const int vcount = c.kv_heads * hd;
  for (int i = threadIdx.x; i < pairs + vcount; i += blockDim.x) {
    if (i < pairs) {
      const int head = i / half, j = i % half;  // head < heads: q, else k head (head - heads)
      const float* x = row + int64_t(head) * hd;    // q heads then k heads are contiguous in qkv
      float cs = 0.f, sn = 0.f;
      if (slot >= 0) {
        cs = rope_cos[int64_t(p) * half + j];
        sn = rope_sin[int64_t(p) * half + j];
      }
      float y0, y1;
      RopePair(x[j], x[j + half], cs, sn, y0, y1);
      if (head < heads) {
        qo[head * hd + j] = __float2bfloat16(y0);
        qo[head * hd + j + half] = __float2bfloat16(y1);
      } else if (slot >= 0) {
        const int64_t off = CacheOffset(c, slot, p, head - heads);
        if (off >= 0) {
          c.k[off + j] = __float2bfloat16(y0);
          c.k[off + j + half] = __float2bfloat16(y1);
        }
      }
    } else if (slot >= 0) {
      const int e = i - pairs, kh = e / hd, d = e % hd;
      const int64_t off = CacheOffset(c, slot, p, kh);
      if (off >= 0) c.v[off + d] = __float2bfloat16(row[int64_t(heads + c.kv_heads) * hd + e]);
    }
  }
}

// One block of kAttnWarps warps per (row, kv head): all keys 0..pos, the
// warps' states merged and normalized.
template <int HD, int kG>
__global__ void __launch_bounds__(kAttnWarps * 32)
    AttentionKernel(PagedKvCache c, PagedRows rows, int heads, const __nv_bfloat16* q, __nv_bfloat16* out,
                    float scale) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  const int r = blockIdx.x, kh = blockIdx.y;
  const int G = heads / c.kv_heads;
  const int slot = rows.slot[r], p = rows.pos[r];
  __nv_bfloat16* o = out + int64_t(r) * heads * HD + int64_t(kh) * G * HD;
  if (!RowValid(c, slot, p)) {
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) o[i] = __float2bfloat16(0.f);
    return;
  }
  __shared__ WarpStates<HD, kG> st;
  AttendKeys<HD, kG>(c, slot, kh, G, q + int64_t(r) * heads * HD + int64_t(kh) * G * HD, 0, p, scale, st);
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int g = i / HD, d = i % HD;
    float M, num, den;
    MergeSoftmaxStates(kAttnWarps, &st.m[0][g], &st.l[0][g], &st.acc[0][g][d], kG, kG * HD, &M, &num, &den);
    o[i] = __float2bfloat16(den > 0.f ? num / den : 0.f);
  }
}

// With the fused append the split pass may read its cached keys, the page
// table and the rows before griddepcontrol.wait (PagedFusedAppend's
// contract); without it an append kernel ahead writes the keys.
__device__ inline bool KeysFinalBeforeWait(const PagedFusedAppend& app) { return app.qkv != nullptr; }

// L2 prefetch of the cached K and V rows of keys lo .. min(lo + T, p) - 1
// of (slot, kv head kh): the chunk's keys but the row's own (position p,
// written by the pass). A hint, by the block's threads.
__device__ inline void PrefetchChunkKeysL2(const PagedKvCache& c, int slot, int p, int kh, int lo, int T) {
  if (!RowValid(c, slot, p) || lo >= p) return;
  const int n = min(T, p - lo);
  const int lines = c.head_dim * 2 > 128 ? c.head_dim * 2 / 128 : 1;  // 128-byte lines of a key's row
  for (int i = threadIdx.x; i < n * lines; i += blockDim.x) {
    const int j = i / lines, line = i % lines;
    const int64_t off = CacheOffset(c, slot, lo + j, kh);
    if (off < 0) continue;
    ptx::prefetch_global_L2(c.k + off + line * 64);
    ptx::prefetch_global_L2(c.v + off + line * 64);
  }
}

// Grid (rows * kv_heads, chunks): chunk c of (row, kv head) attends keys
// [c * T, min((c + 1) * T - 1, pos)] and writes its merged, unnormalized
// state per query head. Chunks past pos (and invalid rows) write nothing:
// the combine reads only chunks 0..pos / T of a valid row.
// With an append (app.qkv non-null): the rows' q, k, v are still fp32 in
// app.qkv; each block ropes its G query heads into shared memory, and the
// block whose chunk holds the row's position first appends k, v of its kv
// head (the position only it reads) -- AppendKernel's arithmetic (RopePair,
// bf16 rounding), so the same bits as appending first.
template <int HD, int kG>
__global__ void __launch_bounds__(kAttnWarps * 32)
    SplitAttentionKernel(PagedKvCache c, PagedRows rows, int heads, const __nv_bfloat16* q, float scale,
                         int chunk_tokens, int chunks, SplitWorkspace ws, PagedFusedAppend app) {
  // With the fused append the chunk's cached keys are final before the
  // step's kernels run (KeysFinalBeforeWait): pull them into L2 while the
  // QKV linear ahead finishes, so the walk's loads after the wait hit L2.
  if (KeysFinalBeforeWait(app)) {
    const int r = blockIdx.x / c.kv_heads, kh = blockIdx.x % c.kv_heads;
    PrefetchChunkKeysL2(c, rows.slot[r], rows.pos[r], kh, blockIdx.y * chunk_tokens, chunk_tokens);
  }
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  SplitAttendChunk<HD, kG>(c, rows, heads, q, scale, chunk_tokens, chunks, ws, app, blockIdx.x / c.kv_heads,
                       blockIdx.x % c.kv_heads, blockIdx.y);
}

// ---- The tiled chunk kernel (chunks of 32, 64 or 128 keys) ----
// The warp walk above spends ~150 instructions a key (each of G heads: a
// 5-step shuffle tree for q.k, two exps) and keeps only a few keys' bytes
// in flight, so long contexts ran at ~0.6 TB/s of KV (H100). Here a block
// copies its chunk's K and V rows into shared memory with cp.async (every
// 16-byte piece of the chunk in flight at once, K and V as two groups so
// q.k starts when K is in), then a thread per key (or 2 / 4 threads
// splitting its dims for shorter chunks) takes the whole q.k for every
// head against q in shared memory, one exp per (head, key) for a softmax
// over the chunk, and a thread per (dim pair, key range) accumulates P V.
// The same fp32 arithmetic as the warp walk in another summation order.
constexpr int kTiledThreads = 128;

template <int HD, int kG, int T>
struct TiledLayout {
  static constexpr int kOct = HD / 8;                     // 16-byte pieces of a key row
  static constexpr int kSub = kTiledThreads / T;          // threads per key in q.k
  static constexpr int kPairs = HD / 2;                   // P V: a thread per dim pair ...
  static constexpr int kParts = kTiledThreads / kPairs;   // ... and key range
  static_assert(T == 32 || T == 64 || T == 128, "tiled chunks hold 32, 64 or 128 keys");
  static_assert(kOct % kSub == 0 && T % kParts == 0, "shapes");
  static constexpr size_t kK = 0;                                       // bf16 [T][HD], 16-byte pieces swizzled
  static constexpr size_t kV = kK + size_t(T) * HD * 2;                 // bf16 [T][HD]
  static constexpr size_t kQ = kV + size_t(T) * HD * 2;                 // fp32 [kG][HD]
  static constexpr size_t kP = kQ + size_t(kG) * HD * 4;                // fp32 [kG][T]: scores, then exps
  static constexpr size_t kRed = kP + size_t(kG) * T * 4;               // fp32 [kParts - 1][kG][HD]
  static constexpr size_t kOff = kRed + size_t(kParts - 1) * kG * HD * 4;  // int64 [T]: cache offsets
  static constexpr size_t kM = kOff + size_t(T) * 8;                    // fp32 [kG]
  static constexpr size_t kL = kM + size_t(kG) * 4;                     // fp32 [kG]
  static constexpr size_t kBytes = kL + size_t(kG) * 4;
  // Key j's piece o sits at piece o ^ Swizzle(j) of its row, so the 8 keys
  // that one phase of a 16-byte shared load serves read 8 different banks.
  __device__ static int Swizzle(int j) { return j % (kOct < 8 ? kOct : 8); }
};

template <int HD, int kG, int T>
__global__ void __launch_bounds__(kTiledThreads)
    SplitTiledKernel(PagedKvCache c, PagedRows rows, int heads, const __nv_bfloat16* q, float scale, int chunks,
                     SplitWorkspace ws, PagedFusedAppend app) {
  using L = TiledLayout<HD, kG, T>;
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* k_s = reinterpret_cast<uint4*>(smem + L::kK);
  uint4* v_s = reinterpret_cast<uint4*>(smem + L::kV);
  float* q_s = reinterpret_cast<float*>(smem + L::kQ);
  float* p_s = reinterpret_cast<float*>(smem + L::kP);
  float* red_s = reinterpret_cast<float*>(smem + L::kRed);
  int64_t* off_s = reinterpret_cast<int64_t*>(smem + L::kOff);
  float* m_s = reinterpret_cast<float*>(smem + L::kM);
  float* l_s = reinterpret_cast<float*>(smem + L::kL);
  // With the fused append (decode steps) the offsets and the copies of the
  // chunk's cached keys go out before griddepcontrol.wait, overlapping the
  // QKV linear ahead (KeysFinalBeforeWait says why that is safe); without it
  // an append kernel ahead writes keys this chunk reads, so the wait is first.
  const bool copies_before_wait = KeysFinalBeforeWait(app);
  if (!copies_before_wait) {
    ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
    ptx::griddepcontrol_launch_dependents();
  }
  const int r = blockIdx.x / c.kv_heads, kh = blockIdx.x % c.kv_heads, chunk = blockIdx.y;
  const int G = heads / c.kv_heads;
  const int slot = rows.slot[r], p = rows.pos[r];
  const int lo = chunk * T;
  if (!RowValid(c, slot, p) || lo > p) return;
  const int n = min(T, p - lo + 1);
  const int tid = threadIdx.x;
  // With a fused append the row's own key (position p, this chunk's last)
  // is computed here, not read: it goes to the cache and to shared memory.
  const int own = app.qkv != nullptr && p / T == chunk ? p - lo : -1;
  for (int j = tid; j < n; j += kTiledThreads) off_s[j] = CacheOffset(c, slot, lo + j, kh);
  __syncthreads();
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int i = tid; i < n * L::kOct; i += kTiledThreads) {
    const int j = i / L::kOct, o = i % L::kOct;
    uint4* dst = &k_s[j * L::kOct + (o ^ L::Swizzle(j))];
    if (j == own) continue;
    if (off_s[j] < 0) *dst = zero;  // no page: the key is skipped (its score -inf), its row only needs to be finite
    else ptx::cp_async_cg_16(dst, c.k + off_s[j] + o * 8);
  }
  ptx::cp_async_commit_group();
  for (int i = tid; i < n * L::kOct; i += kTiledThreads) {
    const int j = i / L::kOct, o = i % L::kOct;
    uint4* dst = &v_s[j * L::kOct + o];
    if (j == own) continue;
    if (off_s[j] < 0) *dst = zero;
    else ptx::cp_async_cg_16(dst, c.v + off_s[j] + o * 8);
  }
  ptx::cp_async_commit_group();
  if (copies_before_wait) {
    ptx::griddepcontrol_wait();  // the qkv row (and the cache write below) only from here
    ptx::griddepcontrol_launch_dependents();
  }
  // q (and the fused append) while the copies fly.
  if (app.qkv == nullptr) {
    const __nv_bfloat16* qr = q + (int64_t(r) * heads + int64_t(kh) * G) * HD;
    for (int i = tid; i < kG * HD; i += kTiledThreads) q_s[i] = i < G * HD ? __bfloat162float(qr[i]) : 0.f;
  } else {
    // The bf16 q the separate append would have written, back in fp32.
    FusedRopeQueryHeads<HD>(app, r, p, kh, G, kG,
                            [&](int g, int d, __nv_bfloat16 b) { q_s[g * HD + d] = __bfloat162float(b); });
    if (own >= 0 && off_s[own] >= 0) {
      __nv_bfloat16* k_row = reinterpret_cast<__nv_bfloat16*>(k_s + own * L::kOct);
      __nv_bfloat16* v_row = reinterpret_cast<__nv_bfloat16*>(v_s + own * L::kOct);
      FusedAppendOwnKeyValue<HD>(
          app, c, heads, r, p, kh, off_s[own],
          [&](int d, __nv_bfloat16 b) { k_row[((d >> 3) ^ L::Swizzle(own)) * 8 + (d & 7)] = b; },
          [&](int d, __nv_bfloat16 b) { v_row[d] = b; });
    } else if (own >= 0) {
      for (int i = tid; i < L::kOct; i += kTiledThreads) k_s[own * L::kOct + i] = v_s[own * L::kOct + i] = zero;
    }
  }
  ptx::cp_async_wait_group<1>();  // this thread's K pieces
  __syncthreads();                // everyone's K pieces, q_s, off_s
  {
    // q.k: threads tid / kSub's key, tid % kSub its share of the pieces
    // (kSub adjacent lanes, summed by a shuffle tree).
    constexpr int kPieces = L::kOct / L::kSub;
    const int j = tid / L::kSub, part = tid % L::kSub;
    const float4* q4 = reinterpret_cast<const float4*>(q_s);
    float s[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) s[g] = 0.f;
#pragma unroll 4
    for (int pi = 0; pi < kPieces; ++pi) {
      const int o = part * kPieces + pi;
      const uint4 raw = k_s[j * L::kOct + (o ^ L::Swizzle(j))];
      const __nv_bfloat162* kb = reinterpret_cast<const __nv_bfloat162*>(&raw);
      float kf[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(kb[e]);
        kf[2 * e] = f.x;
        kf[2 * e + 1] = f.y;
      }
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        if (g >= G) break;
        const float4 a = q4[(g * HD + o * 8) / 4], b = q4[(g * HD + o * 8) / 4 + 1];
        s[g] = fmaf(a.x, kf[0], s[g]);
        s[g] = fmaf(a.y, kf[1], s[g]);
        s[g] = fmaf(a.z, kf[2], s[g]);
        s[g] = fmaf(a.w, kf[3], s[g]);
        s[g] = fmaf(b.x, kf[4], s[g]);
        s[g] = fmaf(b.y, kf[5], s[g]);
        s[g] = fmaf(b.z, kf[6], s[g]);
        s[g] = fmaf(b.w, kf[7], s[g]);
      }
    }
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int d = L::kSub / 2; d > 0; d /= 2) s[g] += __shfl_xor_sync(0xffffffffu, s[g], d);
    }
    const bool valid = j < n && off_s[j] >= 0;
    if (part == 0) {
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        if (g >= G) break;
        p_s[g * T + j] = valid ? s[g] * scale : -INFINITY;
      }
    }
  }
  __syncthreads();
  // Softmax over the chunk: a warp per head, max then exps and their sum.
  {
    const int warp = tid / 32, lane = tid % 32;
    for (int g = warp; g < G; g += kTiledThreads / 32) {
      float* sg = p_s + g * T;
      float mx = -INFINITY;
      for (int j = lane; j < T; j += 32) mx = fmaxf(mx, sg[j]);
#pragma unroll
      for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, d));
      float sum = 0.f;
      for (int j = lane; j < T; j += 32) {
        const float e = mx == -INFINITY ? 0.f : expf(sg[j] - mx);
        sg[j] = e;
        sum += e;
      }
#pragma unroll
      for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
      if (lane == 0) {
        m_s[g] = mx;
        l_s[g] = sum;
      }
    }
  }
  ptx::cp_async_wait_group<0>();  // this thread's V pieces
  __syncthreads();
  // P V: thread (dim pair dp, key range part).
  const int dp = tid % L::kPairs, part = tid / L::kPairs;
  constexpr int kRange = T / L::kParts;
  float acc[kG][2];
#pragma unroll
  for (int g = 0; g < kG; ++g) acc[g][0] = acc[g][1] = 0.f;
  const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(v_s);
  const int j0 = part * kRange, j1 = min(j0 + kRange, n);
  for (int j = j0; j < j1; ++j) {
    const float2 vv = __bfloat1622float2(v2[j * L::kPairs + dp]);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (g >= G) break;
      const float pj = p_s[g * T + j];
      acc[g][0] = fmaf(pj, vv.x, acc[g][0]);
      acc[g][1] = fmaf(pj, vv.y, acc[g][1]);
    }
  }
  if (part > 0) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (g >= G) break;
      float* dst = red_s + (size_t(part - 1) * kG + g) * HD + 2 * dp;
      dst[0] = acc[g][0];
      dst[1] = acc[g][1];
    }
  }
  __syncthreads();
  if (part == 0) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (g >= G) break;
      float a0 = acc[g][0], a1 = acc[g][1];
      for (int k = 1; k < L::kParts; ++k) {
        const float* src = red_s + (size_t(k - 1) * kG + g) * HD + 2 * dp;
        a0 += src[0];
        a1 += src[1];
      }
      const int64_t state = (int64_t(r) * heads + kh * G + g) * chunks + chunk;
      ws.acc[state * HD + 2 * dp] = a0;  // two stores: the workspace is only 4-byte aligned
      ws.acc[state * HD + 2 * dp + 1] = a1;
      if (dp == 0) {
        ws.m[state] = m_s[g];
        ws.l[state] = l_s[g];
      }
    }
  }
}

// One block of HD threads per (row, query head): merges the row's chunks
// 0..min(pos / T, chunks - 1) in chunk order and normalizes, with
// MergeSoftmaxStates's arithmetic (its MergeFactor and MergeAdd in chunk
// order, states with l == 0 skipped), but not its serial
// loop: the chunks' factors are computed in parallel a tile of HD chunks at
// a time, and a thread's acc loads of 8 chunks are issued together, so a
// row of n chunks waits on ~n / 8 dependent L2 round trips instead of ~n.
template <int HD>
__global__ void __launch_bounds__(HD)
    SplitCombineKernel(PagedKvCache c, PagedRows rows, int heads, __nv_bfloat16* out, int chunk_tokens, int chunks,
                       SplitWorkspace ws) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int slot = rows.slot[r], p = rows.pos[r];
  __nv_bfloat16* o = out + (int64_t(r) * heads + h) * HD;
  if (!RowValid(c, slot, p)) {
    o[d] = __float2bfloat16(0.f);
    return;
  }
  const int n = min(p / chunk_tokens + 1, chunks);
  const int64_t first = (int64_t(r) * heads + h) * chunks;
  __shared__ float warp_max[HD / 32];
  __shared__ float f_s[HD], l_s[HD];
  float mx = -INFINITY;
  for (int i = d; i < n; i += HD) mx = fmaxf(mx, ws.m[first + i]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (d % 32 == 0) warp_max[d / 32] = mx;
  __syncthreads();
  float M = warp_max[0];
#pragma unroll
  for (int w = 1; w < HD / 32; ++w) M = fmaxf(M, warp_max[w]);
  float num = 0.f, den = 0.f;
  constexpr int kBatch = 8;
  for (int t0 = 0; t0 < n; t0 += HD) {
    const int count = min(HD, n - t0);
    __syncthreads();  // the previous tile's factors are read
    if (d < count) {
      const float li = ws.l[first + t0 + d];
      l_s[d] = li;
      f_s[d] = MergeFactor(ws.m[first + t0 + d], li, M);
    }
    __syncthreads();
    const float* acc = ws.acc + (first + t0) * HD + d;
    for (int i = 0; i < count; i += kBatch) {
      float a[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) a[u] = i + u < count ? acc[int64_t(i + u) * HD] : 0.f;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (i + u >= count || l_s[i + u] == 0.f) continue;
        MergeAdd(a[u], l_s[i + u], f_s[i + u], &num, &den);
      }
    }
  }
  o[d] = __float2bfloat16(den > 0.f ? num / den : 0.f);
}

Status CheckCache(const PagedKvCache& c, int heads, const char* who) {
  const std::string w = who;
  if (c.head_dim != 32 && c.head_dim != 64 && c.head_dim != 128)
    return Status::InvalidArgument(w + ": head_dim must be 32, 64 or 128");
  if (c.kv_heads < 1 || heads < 1 || heads % c.kv_heads != 0 || heads / c.kv_heads > kPagedMaxGroup)
    return Status::InvalidArgument(w + ": heads must be a multiple of kv_heads, at most " +
                                   std::to_string(kPagedMaxGroup) + " per kv head");
  if (c.page_tokens < 1 || c.max_pages_per_seq < 1 || c.num_pages < 1)
    return Status::InvalidArgument(w + ": page_tokens, max_pages_per_seq and num_pages must be >= 1");
  if (!c.k || !c.v || !c.page_table) return Status::InvalidArgument(w + ": null cache pointer");
  return Status::OK();
}

// The fp32 q | k | v input of an append (PagedKvAppend, or the split pass's
// fused append).
Status CheckAppendInput(const PagedKvCache& c, int heads, const float* qkv, int64_t ld, const float* rope_cos,
                        const float* rope_sin, const char* who) {
  const std::string w = who;
  if (ld < int64_t(heads + 2 * c.kv_heads) * c.head_dim)
    return Status::InvalidArgument(w + ": ld smaller than the q, k, v columns");
  if (!qkv || !rope_cos || !rope_sin) return Status::InvalidArgument(w + ": null pointer");
  return Status::OK();
}

Status LaunchStatus(const char* who, cudaError_t launch = cudaSuccess) {
  const cudaError_t err = launch != cudaSuccess ? launch : cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string(who) + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

template <int HD, int kG, int T>
cudaError_t LaunchTiled(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                        float scale, int chunks, const SplitWorkspace& ws, dim3 grid, const PagedFusedAppend& app,
                        cudaStream_t stream) {
  constexpr size_t smem = TiledLayout<HD, kG, T>::kBytes;
  const cudaError_t err =
      cudaFuncSetAttribute(SplitTiledKernel<HD, kG, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  return LaunchKernel(SplitTiledKernel<HD, kG, T>, grid, dim3(kTiledThreads), smem, stream, cache, rows, heads, q,
                      scale, chunks, ws, app);
}

template <int HD, int kG>
cudaError_t LaunchTiledAt(int chunk_tokens, const PagedKvCache& cache, const PagedRows& rows, int heads,
                          const __nv_bfloat16* q, float scale, int chunks, const SplitWorkspace& ws, dim3 grid,
                          const PagedFusedAppend& app, cudaStream_t stream) {
  switch (chunk_tokens) {
    case 32: return LaunchTiled<HD, kG, 32>(cache, rows, heads, q, scale, chunks, ws, grid, app, stream);
    case 64: return LaunchTiled<HD, kG, 64>(cache, rows, heads, q, scale, chunks, ws, grid, app, stream);
    default: return LaunchTiled<HD, kG, 128>(cache, rows, heads, q, scale, chunks, ws, grid, app, stream);
  }
}

// The split-KV pass and its combine (HD threads per (row, head)).
template <int HD>
Status LaunchSplit(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                   __nv_bfloat16* out, float scale, int chunk_tokens, PagedChunkKernel chunk_kernel, int chunks,
                   const SplitWorkspace& ws, dim3 grid, dim3 combine_grid, const PagedFusedAppend& app,
                   cudaStream_t stream) {
  const bool small = SmallGroup(cache, heads);
  cudaError_t err;
  if (chunk_kernel == PagedChunkKernel::kTiled) {
    err = small ? LaunchTiledAt<HD, kSmallGroup>(chunk_tokens, cache, rows, heads, q, scale, chunks, ws, grid, app,
                                                 stream)
                : LaunchTiledAt<HD, kPagedMaxGroup>(chunk_tokens, cache, rows, heads, q, scale, chunks, ws, grid, app,
                                                    stream);
  } else {
    auto kernel = small ? SplitAttentionKernel<HD, kSmallGroup> : SplitAttentionKernel<HD, kPagedMaxGroup>;
    err = LaunchKernel(kernel, grid, dim3(kAttnWarps * 32), 0, stream, cache, rows, heads, q, scale, chunk_tokens,
                       chunks, ws, app);
  }
  GROVE_RETURN_IF_ERROR(LaunchStatus("PagedAttentionSplit", err));
  return LaunchStatus("PagedAttentionSplit combine",
                      LaunchKernel(SplitCombineKernel<HD>, combine_grid, dim3(HD), 0, stream, cache, rows, heads, out,
                                   chunk_tokens, chunks, ws));
}

}  // namespace

Status PagedKvAppend(const PagedKvCache& cache, const PagedRows& rows, int heads, const float* qkv, int64_t ld,
                     const float* rope_cos, const float* rope_sin, __nv_bfloat16* q_out, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedKvAppend"));
  if (rows.rows < 0) return Status::InvalidArgument("PagedKvAppend: rows < 0");
  if (rows.rows == 0) return Status::OK();
  GROVE_RETURN_IF_ERROR(CheckAppendInput(cache, heads, qkv, ld, rope_cos, rope_sin, "PagedKvAppend"));
  if (!q_out || !rows.slot || !rows.pos) return Status::InvalidArgument("PagedKvAppend: null pointer");
  return LaunchStatus("PagedKvAppend", LaunchKernel(AppendKernel, dim3(rows.rows), dim3(kAppendThreads), 0, stream,
                                                    cache, rows, heads, qkv, ld, rope_cos, rope_sin, q_out));
}

Status PagedAttention(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                      __nv_bfloat16* out, float scale, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedAttention"));
  if (rows.rows < 0) return Status::InvalidArgument("PagedAttention: rows < 0");
  if (rows.rows == 0) return Status::OK();
  if (!q || !out || !rows.slot || !rows.pos) return Status::InvalidArgument("PagedAttention: null pointer");
  if (scale == 0.f) scale = float(1.0 / std::sqrt(double(cache.head_dim)));
  const dim3 grid(rows.rows, cache.kv_heads);
  const bool small = SmallGroup(cache, heads);
  auto kernel = cache.head_dim == 32   ? (small ? AttentionKernel<32, kSmallGroup> : AttentionKernel<32, kPagedMaxGroup>)
                : cache.head_dim == 64 ? (small ? AttentionKernel<64, kSmallGroup> : AttentionKernel<64, kPagedMaxGroup>)
                                       : (small ? AttentionKernel<128, kSmallGroup> : AttentionKernel<128, kPagedMaxGroup>);
  return LaunchStatus("PagedAttention",
                      LaunchKernel(kernel, grid, dim3(kAttnWarps * 32), 0, stream, cache, rows, heads, q, out, scale));
}

size_t PagedAttentionSplitWorkspaceBytesAt(const PagedKvCache& cache, int rows, int heads, int max_pos,
                                           int chunk_tokens) {
  if (rows <= 0 || heads <= 0 || chunk_tokens <= 0) return 0;
  return size_t(rows) * size_t(heads) * size_t(PagedAttentionSplitChunks(cache, max_pos, chunk_tokens)) *
         size_t(cache.head_dim + 2) * sizeof(float);
}

size_t PagedAttentionSplitWorkspaceBytes(const PagedKvCache& cache, int rows, int heads, int max_pos) {
  if (rows <= 0 || heads <= 0) return 0;
  // The most states of a launch of r <= rows rows under either policy:
  // r = rows, or the most rows that still count as few.
  const int kv = std::max(1, cache.kv_heads);
  size_t most = 0;
  for (int r : {rows, std::min(rows, std::max(1, kPagedSplitFewPairs / kv))})
    most = std::max(most, PagedAttentionSplitWorkspaceBytesAt(cache, r, heads, max_pos,
                                                              PagedAttentionSplitChunkTokens(r, kv, max_pos)));
  for (int r : {rows, std::min(rows, std::max(1, kPagedWalkFewPairs / kv))})
    most = std::max(most, PagedAttentionSplitWorkspaceBytesAt(cache, r, heads, max_pos,
                                                              PagedAttentionSplitWalkChunkTokens(r, kv, max_pos)));
  return most;
}

Status PagedAttentionSplitAt(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                             __nv_bfloat16* out, float scale, int max_pos, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream, const PagedFusedAppend* append, int chunk_tokens,
                             PagedChunkKernel chunk_kernel) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedAttentionSplit"));
  if (rows.rows < 0) return Status::InvalidArgument("PagedAttentionSplit: rows < 0");
  if (max_pos < 0) return Status::InvalidArgument("PagedAttentionSplit: max_pos < 0");
  if (chunk_kernel == PagedChunkKernel::kTiled ? chunk_tokens != 32 && chunk_tokens != 64 && chunk_tokens != 128
                                               : chunk_tokens < 1)
    return Status::InvalidArgument("PagedAttentionSplit: " + std::to_string(chunk_tokens) +
                                   "-key chunks (tiled: 32, 64 or 128; warp walk: >= 1)");
  if (rows.rows == 0) return Status::OK();
  PagedFusedAppend app;
  if (append != nullptr) {
    GROVE_RETURN_IF_ERROR(CheckAppendInput(cache, heads, append->qkv, append->ld, append->rope_cos,
                                           append->rope_sin, "PagedAttentionSplit (fused append)"));
    app = *append;
  } else if (!q) {
    return Status::InvalidArgument("PagedAttentionSplit: null q");
  }
  if (!out || !rows.slot || !rows.pos || !workspace)
    return Status::InvalidArgument("PagedAttentionSplit: null pointer");
  if (reinterpret_cast<uintptr_t>(workspace) % alignof(float) != 0)
    return Status::InvalidArgument("PagedAttentionSplit: workspace not 4-byte aligned");
  const size_t need = PagedAttentionSplitWorkspaceBytesAt(cache, rows.rows, heads, max_pos, chunk_tokens);
  if (workspace_bytes < need)
    return Status::InvalidArgument("PagedAttentionSplit: workspace of " + std::to_string(workspace_bytes) +
                                   " bytes, needs " + std::to_string(need));
  const int chunks = PagedAttentionSplitChunks(cache, max_pos, chunk_tokens);
  if (chunks > 65535) return Status::InvalidArgument("PagedAttentionSplit: more than 65535 chunks");
  if (int64_t(rows.rows) * cache.kv_heads > 0x7fffffff)
    return Status::InvalidArgument("PagedAttentionSplit: rows * kv_heads too large");
  if (scale == 0.f) scale = float(1.0 / std::sqrt(double(cache.head_dim)));
  const SplitWorkspace ws = SplitLayout(workspace, int64_t(rows.rows) * heads * chunks);
  const dim3 grid(rows.rows * cache.kv_heads, chunks), combine_grid(rows.rows, heads);
  switch (cache.head_dim) {
    case 32:
      return LaunchSplit<32>(cache, rows, heads, q, out, scale, chunk_tokens, chunk_kernel, chunks, ws, grid,
                             combine_grid, app, stream);
    case 64:
      return LaunchSplit<64>(cache, rows, heads, q, out, scale, chunk_tokens, chunk_kernel, chunks, ws, grid,
                             combine_grid, app, stream);
    default:
      return LaunchSplit<128>(cache, rows, heads, q, out, scale, chunk_tokens, chunk_kernel, chunks, ws, grid,
                              combine_grid, app, stream);
  }
}

namespace {

// PagedAttentionSplit's and PagedAttentionSplitWalk's own contract: a
// workspace of PagedAttentionSplitWorkspaceBytes, whichever length they pick.
Status CheckPolicyWorkspace(const PagedKvCache& cache, const PagedRows& rows, int heads, int max_pos,
                            size_t workspace_bytes) {
  GROVE_RETURN_IF_ERROR(CheckCache(cache, heads, "PagedAttentionSplit"));
  const size_t need = PagedAttentionSplitWorkspaceBytes(cache, rows.rows, heads, max_pos);
  if (rows.rows > 0 && workspace_bytes < need)
    return Status::InvalidArgument("PagedAttentionSplit: workspace of " + std::to_string(workspace_bytes) +
                                   " bytes, needs " + std::to_string(need));
  return Status::OK();
}

}  // namespace

Status PagedAttentionSplit(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                           __nv_bfloat16* out, float scale, int max_pos, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream, const PagedFusedAppend* append) {
  GROVE_RETURN_IF_ERROR(CheckPolicyWorkspace(cache, rows, heads, max_pos, workspace_bytes));
  const int chunk_tokens = PagedAttentionSplitChunkTokens(rows.rows, cache.kv_heads, max_pos);
  return PagedAttentionSplitAt(cache, rows, heads, q, out, scale, max_pos, workspace, workspace_bytes, stream, append,
                               chunk_tokens, PagedAttentionSplitKernelFor(chunk_tokens));
}

Status PagedAttentionSplitWalk(const PagedKvCache& cache, const PagedRows& rows, int heads, const __nv_bfloat16* q,
                               __nv_bfloat16* out, float scale, int max_pos, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream, const PagedFusedAppend* append) {
  GROVE_RETURN_IF_ERROR(CheckPolicyWorkspace(cache, rows, heads, max_pos, workspace_bytes));
  return PagedAttentionSplitAt(cache, rows, heads, q, out, scale, max_pos, workspace, workspace_bytes, stream, append,
                               PagedAttentionSplitWalkChunkTokens(rows.rows, cache.kv_heads, max_pos),
                               PagedChunkKernel::kWarpWalk);
}

}  // namespace grove::kernels
