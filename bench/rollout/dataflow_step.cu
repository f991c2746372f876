#include "bench/rollout/dataflow_step.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "bench/rollout/bulk_read_ring.cuh"
#include "bench/support/bench_util.h"
#include "bench/support/timed_stream.h"
#include "kernels/ptx/grid_sync.cuh"
#include "kernels/ptx/mbarrier.cuh"
#include "kernels/ptx/tma.cuh"

namespace grove::bench {
namespace {

using bf16 = __nv_bfloat16;

// gpu-ref's shapes (configs/model/gpu-ref.toml), every layer an MoE layer.
constexpr int kH = 1024, kQkv = 1536, kQd = 1024, kHd = 128, kKvHeads = 2, kGroup = 4;
constexpr int kExperts = 64, kTopK = 6, kShared = 2, kEh = 512, kLayers = 16, kVocab = 32768;
constexpr int kMoeSlots = kTopK + kShared;
constexpr int kRsRows = kExperts + 2 * kShared * kEh;  // router rows, then each shared expert's W1 rows and W3 rows
constexpr int kUpRows = kTopK * 2 * kEh;              // each routed expert's W1 rows and W3 rows
constexpr int kCtx = 96, kCtxChunk = 16, kCtxChunks = kCtx / kCtxChunk;
constexpr int kAttItems = kKvHeads * kCtxChunks;
constexpr int kConsumers = 256;  // 8 warps; one more warp produces
constexpr int kConsumerWarps = kConsumers / 32;
constexpr int kThreads = kConsumers + 32;
constexpr int kChunkRows = 8;                      // rows of a chunk (one bulk copy; one warp reads it)
constexpr int kRingSlots = 12;
constexpr int kSlotBytes = kChunkRows * kH * 2;    // 8 bf16 rows of k = 1024
constexpr int kXinValues = kMoeSlots * kEh;        // the largest stage input (the down's 8 x 512)
enum Stage { kQkvS, kAttS, kWoS, kRsS, kUpS, kDownS, kStages };

struct Args {
  const bf16 *qkv, *wo, *rs, *w13, *w2, *lm, *kc, *vc;
  float* x;       // [kH]: the residual in (and out); each owner block keeps its rows in registers meanwhile
  float* logits;  // [kVocab] out
  // Stage outputs as tagged words (value bits | (step + 1) << 32), one
  // array a layer: qkv [kQkv], the attention chunks [kCtxChunks][kQd], the
  // residual after wo (xw) and after the down (xd) [kH], the router logits
  // + shared up [kRsRows], the routed up [kUpRows].
  uint64_t *aqkv, *attn, *xw, *xd, *ars, *up;
  uint32_t* counters;  // [kLayers][kStages]: items done, monotonic over launches
  uint32_t step;       // launches before this one
  uint32_t route_seed;  // RouteBias's
  // [blocks][kProbes]: cycles thread 0 / the producer's lane 0 spent in each
  // kind of wait during the last launch (where the step's time goes).
  unsigned long long* probes;
  // Diagnostic cuts (0 in the real structure): kNoRouteWait lets the
  // producer fetch the routed experts without waiting for the logits (a
  // stale route); kNoInputWait drops every consumer wait as well (the
  // structure's streaming rate with no dependency at all).
  int cuts;
  // Bulk copies in flight per block at most (<= kRingSlots): every copy
  // in flight queues ahead of the stage heads' loads in the memory system,
  // so more than the bandwidth needs only adds latency.
  int in_flight;
};
constexpr int kNoRouteWait = 1, kNoInputWait = 2;

__device__ __forceinline__ uint32_t Tag(const Args& a) { return a.step + 1; }
__device__ __forceinline__ uint64_t LoadRelaxed64(const uint64_t* p) {
  uint64_t w;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
  return w;
}
// A wait that never ends is a bug in the probe's protocol: after 2 s of
// spinning, say which wait and trap (the launch fails instead of hanging).
__device__ __forceinline__ uint64_t GlobalNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
struct Watchdog {
  const char* what;
  uint64_t start = 0;
  uint32_t polls = 0;
  __device__ void Poll() {
    if ((++polls & 1023u) != 0) return;
    const uint64_t now = GlobalNs();
    if (start == 0) start = now;
    else if (now - start > 2000000000ull) {
      printf("dataflow probe: block %d thread %d stuck in %s\n", int(blockIdx.x), int(threadIdx.x), what);
      __trap();
    }
  }
};
__device__ __forceinline__ void WaitParity(uint64_t* bar, uint32_t parity, const char* what) {
  Watchdog dog{what};
  while (!ptx::mbarrier_try_wait_parity(bar, parity)) dog.Poll();
}

// One 8-byte store: a reader sees the old word or the new one, never a mix,
// so the tag tells it whether the value is this step's.
__device__ __forceinline__ void StoreTagged(uint64_t* p, float v, uint32_t tag) {
  const uint64_t w = (uint64_t(tag) << 32) | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}
// N words at base[first + i * stride], all loads in flight at once; with
// `spin`, each re-read until it carries `tag`.
template <int N>
__device__ __forceinline__ void LoadTagged(const uint64_t* base, int first, int stride, uint32_t tag, bool spin,
                                           float (&out)[N]) {
  uint64_t w[N];
#pragma unroll
  for (int i = 0; i < N; ++i) w[i] = LoadRelaxed64(base + first + i * stride);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    Watchdog dog{"a tagged word"};
    while (spin && uint32_t(w[i] >> 32) != tag) {
      w[i] = LoadRelaxed64(base + first + i * stride);
      dog.Poll();
    }
    out[i] = __uint_as_float(uint32_t(w[i]));
  }
}
enum Probe { kTotal, kInputWait, kFullWait, kEmptyWait, kRouteWait, kProbes };

__device__ __forceinline__ int RowsPerBlock(int n) {
  const int per = (n + int(gridDim.x) - 1) / int(gridDim.x);
  return (per + kChunkRows - 1) / kChunkRows * kChunkRows;
}
__device__ __forceinline__ int Items(int n) {
  const int r = RowsPerBlock(n);
  return (n + r - 1) / r;
}
__device__ __forceinline__ uint32_t Target(const Args& a, int items) { return (a.step + 1) * uint32_t(items); }
__device__ __forceinline__ uint32_t* Counter(const Args& a, int l, Stage s) { return a.counters + l * kStages + s; }

// A pseudo-random per-(layer, seed, expert) bias in [0, 4): with constant
// weights every logit is equal, so this decides the route, and it changes
// from step to step as real routing does.
__device__ __forceinline__ float RouteBias(int l, uint32_t seed, int e) {
  uint32_t h = uint32_t(l) * 2654435761u ^ seed * 40503u ^ uint32_t(e) * 2246822519u;
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  return float(h & 0xffffu) * (4.f / 65536.f);
}

// Top-k of the layer's router logits by one warp (every lane gets the same
// ids and gates, normalized over the k).
__device__ void RouteWarp(const Args& a, int l, bool spin, int* ids, float* gates) {
  const int lane = threadIdx.x % 32;
  float lg[2], v[2];
  LoadTagged<2>(a.ars + size_t(l) * kRsRows, lane, 32, Tag(a), spin, lg);
  for (int i = 0; i < 2; ++i) v[i] = 1.f / (1.f + expf(-lg[i])) + RouteBias(l, a.route_seed, lane + 32 * i);
  float sum = 0.f;
  for (int t = 0; t < kTopK; ++t) {
    const int mine = v[0] >= v[1] ? 0 : 1;
    float best = v[mine];
    int arg = lane + 32 * mine;
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
      if (ob > best || (ob == best && oa < arg)) {
        best = ob;
        arg = oa;
      }
    }
    ids[t] = arg;
    gates[t] = best;
    sum += best;
    if (arg % 32 == lane) v[arg / 32] = -INFINITY;
  }
  for (int t = 0; t < kTopK; ++t) gates[t] /= sum;
}

__device__ __forceinline__ void ConsumerSync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

// The producer warp: every weight chunk the block's consumers will read,
// in their order, into the ring; lane 0 issues.
template <bool kTagged>
__device__ void Produce(const Args& a, uint8_t* ring, uint64_t* full, uint64_t* empty) {
  const int lane = threadIdx.x % 32;
  uint32_t chunk = 0;
  long long empty_wait = 0, route_wait = 0;
  auto issue = [&](const bf16* src, int k) {
    const uint32_t slot = chunk % kRingSlots, use = chunk / kRingSlots;
    if (lane == 0) {
      const long long t = clock64();
      WaitParity(&empty[slot], (use & 1u) ^ 1u, "the producer's free-slot wait");
      if (chunk >= uint32_t(a.in_flight)) {  // chunk - in_flight has landed
        const uint32_t back = chunk - uint32_t(a.in_flight);
        WaitParity(&full[back % kRingSlots], (back / kRingSlots) & 1u, "the producer's in-flight cap");
      }
      empty_wait += clock64() - t;
      const uint32_t bytes = uint32_t(kChunkRows) * k * 2;
      ptx::mbarrier_arrive_expect_tx(&full[slot], bytes);
      ptx::cp_async_bulk_g2s(ring + size_t(slot) * kSlotBytes, src, bytes, &full[slot]);
    }
    ++chunk;
  };
  auto linear = [&](const bf16* w, int n, int k) {  // w: row 0 of this layer's matrix
    const int rpb = RowsPerBlock(n), r0 = int(blockIdx.x) * rpb, r1 = min(n, r0 + rpb);
    for (int r = r0; r < r1; r += kChunkRows) issue(w + size_t(r) * k, k);
  };
  int ids[kTopK];
  float gates[kTopK];
  for (int l = 0; l < kLayers; ++l) {
    linear(a.qkv + size_t(l) * kQkv * kH, kQkv, kH);
    linear(a.wo + size_t(l) * kH * kQd, kH, kQd);
    linear(a.rs + size_t(l) * kRsRows * kH, kRsRows, kH);
    // The routed experts' rows only once the logits are final: their
    // counter, or (tagged) the logits themselves.
    const long long t = clock64();
    if (!kTagged && lane == 0)
      for (Watchdog dog{"the producer's router counter"};
           !(a.cuts & kNoRouteWait) && ptx::ld_acquire_gpu(Counter(a, l, kRsS)) < Target(a, Items(kRsRows));)
        dog.Poll();
    __syncwarp();
    RouteWarp(a, l, kTagged && !(a.cuts & kNoRouteWait), ids, gates);
    if (lane == 0) route_wait += clock64() - t;
    {
      const int rpb = RowsPerBlock(kUpRows), r0 = int(blockIdx.x) * rpb, r1 = min(kUpRows, r0 + rpb);
      for (int r = r0; r < r1; r += kChunkRows) {
        const int j = r / (2 * kEh), rr = r % (2 * kEh);
        issue(a.w13 + ((size_t(l) * kExperts + ids[j]) * 2 * kEh + rr) * kH, kH);
      }
    }
    {
      const int rpb = RowsPerBlock(kH), r0 = int(blockIdx.x) * rpb, r1 = min(kH, r0 + rpb);
      for (int r = r0; r < r1; r += kChunkRows)
        for (int j = 0; j < kMoeSlots; ++j) {
          const int e = j < kTopK ? ids[j] : kExperts + (j - kTopK);
          issue(a.w2 + ((size_t(l) * (kExperts + kShared) + e) * kH + r) * kEh, kEh);
        }
    }
  }
  linear(a.lm, kVocab, kH);
  if (lane == 0) {
    a.probes[blockIdx.x * kProbes + kEmptyWait] = empty_wait;
    a.probes[blockIdx.x * kProbes + kRouteWait] = route_wait;
  }
}

template <bool kTagged>
struct ConsumerState {
  const Args& a;
  const uint8_t* ring;
  uint64_t* full;
  uint64_t* empty;
  bf16* xin;   // [kXinValues]: the stage's input row(s), bf16 as the engine stages them
  float* red;  // [8]
  uint32_t chunk = 0;
  long long input_wait = 0, full_wait = 0;

  // Tagged words spin on their tags unless the counters order the stage
  // (or the diagnostic cut drops every wait).
  __device__ bool Spin() const { return kTagged && !(a.cuts & kNoInputWait); }
  // Counter mode: the stage's input is complete once the producing stage's
  // counter reaches its target (thread 0 acquires, the named barrier
  // orders the rest). Tagged mode: nothing to wait for here.
  __device__ void Wait(uint32_t* c, uint32_t target) {
    if (!kTagged && threadIdx.x == 0) {
      const long long t = clock64();
      for (Watchdog dog{"a consumer's stage counter"}; !(a.cuts & kNoInputWait) && ptx::ld_acquire_gpu(c) < target;)
        dog.Poll();
      input_wait += clock64() - t;
    }
    ConsumerSync();
  }
  // The stage's items done: consumers meet, then thread 0's release add
  // (cumulative through the named barrier). Tagged mode still counts, for
  // the host's check, but nobody waits on it.
  __device__ void Signal(uint32_t* c) {
    ConsumerSync();
    if (threadIdx.x == 0) ptx::red_release_gpu_add(c, 1u);
  }
  // N tagged words per thread at base[threadIdx.x + i * kConsumers].
  template <int N>
  __device__ void Gather(const uint64_t* base, float (&out)[N]) {
    const long long t = clock64();
    LoadTagged<N>(base, threadIdx.x, kConsumers, Tag(a), Spin(), out);
    if (threadIdx.x == 0) input_wait += clock64() - t;
  }
  // xin = RMSNorm(row) (unit weights); the row is the tagged src, or the
  // plain a.x for the first layer.
  __device__ void NormInput(const uint64_t* src) {
    constexpr int kPer = kH / kConsumers;
    float v[kPer], ss = 0.f;
    if (src) {
      Gather<kPer>(src, v);
    } else {
      for (int i = 0; i < kPer; ++i) v[i] = a.x[threadIdx.x + i * kConsumers];
    }
    for (int i = 0; i < kPer; ++i) ss += v[i] * v[i];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
    ConsumerSync();
    float t = 0.f;
    for (int w = 0; w < kConsumers / 32; ++w) t += red[w];
    const float rstd = rsqrtf(t / kH + 1e-6f);
    for (int i = 0; i < kPer; ++i) xin[threadIdx.x + i * kConsumers] = __float2bfloat16(v[i] * rstd);
    ConsumerSync();
  }
  // Chunk `c` of the block's sequence once landed, by warp c % 8 alone:
  // its 8 rows against x_s (K bf16 values); lane r < 8 gets row r's dot.
  // Frees the slot. Eight warps thus work on eight chunks at once.
  template <int K>
  __device__ float TakeChunk(uint32_t c, const bf16* x_s) {
    constexpr int kIters = K / 8 / 32;
    const int lane = threadIdx.x % 32;
    const uint32_t slot = c % kRingSlots, use = c / kRingSlots;
    const long long t = clock64();
    WaitParity(&full[slot], use & 1u, "a consumer's landed-chunk wait");
    if (threadIdx.x == 0) full_wait += clock64() - t;
    uint4 xv[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) xv[i] = reinterpret_cast<const uint4*>(x_s)[lane + 32 * i];
    float mine = 0.f;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      uint4 w[4][kIters];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int i = 0; i < kIters; ++i)
          w[r][i] = reinterpret_cast<const uint4*>(ring + size_t(slot) * kSlotBytes + size_t(half * 4 + r) * K * 2)[lane + 32 * i];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
          const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&w[r][i]);
          const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&xv[i]);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 wf = __bfloat1622float2(wp[e]), xf = __bfloat1622float2(xp[e]);
            acc = fmaf(wf.x, xf.x, acc);
            acc = fmaf(wf.y, xf.y, acc);
          }
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == half * 4 + r) mine = acc;
      }
    }
    __syncwarp();
    if (lane == 0) ptx::mbarrier_arrive(&empty[slot]);
    return mine;
  }
  // A linear stage into tagged words: out[r] = row r . xin for this block's
  // rows, its chunks dealt to the warps in turn.
  template <int K>
  __device__ void Linear(int n, uint64_t* out) {
    const int rpb = RowsPerBlock(n), r0 = int(blockIdx.x) * rpb, r1 = min(n, r0 + rpb);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = (r1 - r0 + kChunkRows - 1) / kChunkRows;
    for (int i = 0; i < chunks; ++i)
      if ((chunk + i) % kConsumerWarps == uint32_t(warp)) {
        const float v = TakeChunk<K>(chunk + i, xin);
        if (lane < kChunkRows) StoreTagged(out + r0 + i * kChunkRows + lane, v, Tag(a));
      }
    chunk += chunks;
  }
};

__device__ float Silu(float g) { return g / (1.f + expf(-g)); }

// Attention item (kv head kh, context chunk c): the group's 4 query heads
// against 16 cached keys, softmax-free; warp w takes head w % 4 and half of
// the keys, lane l dims [4 l, 4 l + 4).
template <bool kTagged>
__device__ void AttendItem(ConsumerState<kTagged>& cs, int l, int kh, int c, float* scratch) {
  const Args& a = cs.a;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = warp % kGroup, half = warp / kGroup;
  float qv[4], acc[4] = {0.f, 0.f, 0.f, 0.f};
  LoadTagged<4>(a.aqkv + size_t(l) * kQkv + (kh * kGroup + g) * kHd + 4 * lane, 0, 1, Tag(a), cs.Spin(), qv);
  const size_t base = (size_t(l) * kKvHeads + kh) * kCtx;
  for (int t = c * kCtxChunk + half * (kCtxChunk / 2); t < c * kCtxChunk + (half + 1) * (kCtxChunk / 2); ++t) {
    const uint2 kr = *reinterpret_cast<const uint2*>(a.kc + (base + t) * kHd + 4 * lane);
    const uint2 vr = *reinterpret_cast<const uint2*>(a.vc + (base + t) * kHd + 4 * lane);
    const float2 k0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kr.x));
    const float2 k1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kr.y));
    float s = qv[0] * k0.x + qv[1] * k0.y + qv[2] * k1.x + qv[3] * k1.y;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float2 v0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&vr.x));
    const float2 v1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&vr.y));
    acc[0] = fmaf(s, v0.x, acc[0]);
    acc[1] = fmaf(s, v0.y, acc[1]);
    acc[2] = fmaf(s, v1.x, acc[2]);
    acc[3] = fmaf(s, v1.y, acc[3]);
  }
  if (half == 1)
    for (int e = 0; e < 4; ++e) scratch[g * kHd + 4 * lane + e] = acc[e];
  ConsumerSync();
  if (half == 0) {
    uint64_t* out = a.attn + (size_t(l) * kCtxChunks + c) * kQd + (kh * kGroup + g) * kHd + 4 * lane;
    for (int e = 0; e < 4; ++e) StoreTagged(out + e, acc[e] + scratch[g * kHd + 4 * lane + e], Tag(a));
  }
}

template <bool kTagged>
__device__ void Consume(const Args& a, const uint8_t* ring, uint64_t* full, uint64_t* empty, bf16* xin, float* red,
                        float* gates, float* partial) {
  ConsumerState<kTagged> cs{a, ring, full, empty, xin, red};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool has_qkv = int(blockIdx.x) < Items(kQkv), has_wo = int(blockIdx.x) < Items(kH);
  const bool has_rs = int(blockIdx.x) < Items(kRsRows), has_up = int(blockIdx.x) < Items(kUpRows);
  // The residual rows this block owns (wo and the down add into them; the
  // host checks there are 8 a block): row r0 + t in consumer thread t < 8.
  const bool owner = has_wo && threadIdx.x < kChunkRows;
  const int own = int(blockIdx.x) * kChunkRows + int(threadIdx.x);
  float x_own = owner ? a.x[own] : 0.f;
  for (int l = 0; l < kLayers; ++l) {
    if (has_qkv) {
      if (l > 0) cs.Wait(Counter(a, l - 1, kDownS), Target(a, Items(kH)));
      cs.NormInput(l > 0 ? a.xd + size_t(l - 1) * kH : nullptr);
      cs.template Linear<kH>(kQkv, a.aqkv + size_t(l) * kQkv);
      cs.Signal(Counter(a, l, kQkvS));
    }
    if (int(blockIdx.x) < kAttItems) {
      cs.Wait(Counter(a, l, kQkvS), Target(a, Items(kQkv)));
      AttendItem(cs, l, int(blockIdx.x) % kKvHeads, int(blockIdx.x) / kKvHeads, reinterpret_cast<float*>(xin));
      cs.Signal(Counter(a, l, kAttS));
    }
    if (has_wo) {
      cs.Wait(Counter(a, l, kAttS), Target(a, kAttItems));
      constexpr int kPer = kQd / kConsumers;
      float p[kCtxChunks * kPer];
      cs.template Gather<kCtxChunks * kPer>(a.attn + size_t(l) * kCtxChunks * kQd, p);  // chunk c at i / kPer
      for (int i = 0; i < kPer; ++i) {
        float s = 0.f;
        for (int c = 0; c < kCtxChunks; ++c) s += p[c * kPer + i];
        xin[threadIdx.x + i * kConsumers] = __float2bfloat16(s);
      }
      ConsumerSync();
      if (cs.chunk % kConsumerWarps == uint32_t(warp)) {
        const float v = cs.template TakeChunk<kQd>(cs.chunk, xin);
        if (lane < kChunkRows) partial[lane] = v;
      }
      ++cs.chunk;
      ConsumerSync();
      if (owner) {
        x_own += partial[threadIdx.x];
        StoreTagged(a.xw + size_t(l) * kH + own, x_own, Tag(a));
      }
      cs.Signal(Counter(a, l, kWoS));
    }
    if (has_rs || has_up) {
      cs.Wait(Counter(a, l, kWoS), Target(a, Items(kH)));
      cs.NormInput(a.xw + size_t(l) * kH);  // the up's input too: x is final until the down
    }
    if (has_rs) {
      cs.template Linear<kH>(kRsRows, a.ars + size_t(l) * kRsRows);
      cs.Signal(Counter(a, l, kRsS));
    }
    if (has_up) {
      cs.template Linear<kH>(kUpRows, a.up + size_t(l) * kUpRows);
      cs.Signal(Counter(a, l, kUpS));
    }
    if (has_wo) {  // the down: the same rows as wo
      cs.Wait(Counter(a, l, kUpS), Target(a, Items(kUpRows)));
      if (warp == 0) {
        int wid[kTopK];
        float wg[kTopK];
        RouteWarp(a, l, cs.Spin(), wid, wg);
        if (lane < kTopK) gates[lane] = wg[lane];
        if (lane < kShared) gates[kTopK + lane] = 1.f;
      }
      // h = silu(W1 x) * (W3 x) of every slot: routed slot j's W1 rows at
      // up[j * 2 kEh], W3 rows kEh after; shared s's in ars after the
      // logits. Two gathers with every load in flight: word t + i * 256 is
      // slot i / 4's W1 (i % 4 < 2) or W3 value, its partner 512 words on.
      constexpr int kPer = 2 * kEh / kConsumers;  // words of a slot a thread
      float hr[kTopK * kPer], hs[kShared * kPer];
      cs.template Gather<kTopK * kPer>(a.up + size_t(l) * kUpRows, hr);
      cs.template Gather<kShared * kPer>(a.ars + size_t(l) * kRsRows + kExperts, hs);
      for (int i = 0; i < kMoeSlots * kPer; ++i) {
        if (i % kPer >= kPer / 2) continue;
        const float* h = i < kTopK * kPer ? hr + i : hs + (i - kTopK * kPer);
        xin[(i / kPer) * kEh + (i % kPer) * kConsumers + threadIdx.x] = __float2bfloat16(Silu(h[0]) * h[kPer / 2]);
      }
      ConsumerSync();
      for (int j = 0; j < kMoeSlots; ++j)  // chunk j: slot j's 8 rows
        if ((cs.chunk + j) % kConsumerWarps == uint32_t(warp)) {
          const float v = cs.template TakeChunk<kEh>(cs.chunk + j, xin + j * kEh);
          if (lane < kChunkRows) partial[j * kChunkRows + lane] = v;
        }
      cs.chunk += kMoeSlots;
      ConsumerSync();
      if (owner) {
        float acc = 0.f;
        for (int j = 0; j < kMoeSlots; ++j) acc = fmaf(gates[j], partial[j * kChunkRows + threadIdx.x], acc);
        x_own += acc;
        StoreTagged(a.xd + size_t(l) * kH + own, x_own, Tag(a));
      }
      cs.Signal(Counter(a, l, kDownS));
    }
  }
  cs.Wait(Counter(a, kLayers - 1, kDownS), Target(a, Items(kH)));
  cs.NormInput(a.xd + size_t(kLayers - 1) * kH);
  {
    const int rpb = RowsPerBlock(kVocab), r0 = int(blockIdx.x) * rpb, r1 = min(kVocab, r0 + rpb);
    const int chunks = (r1 - r0 + kChunkRows - 1) / kChunkRows;
    for (int i = 0; i < chunks; ++i)
      if ((cs.chunk + i) % kConsumerWarps == uint32_t(warp)) {
        const float v = cs.template TakeChunk<kH>(cs.chunk + i, xin);
        if (lane < kChunkRows) a.logits[r0 + i * kChunkRows + lane] = v;
      }
    cs.chunk += chunks;
  }
  if (owner) a.x[own] = x_own;
  if (threadIdx.x == 0) {
    a.probes[blockIdx.x * kProbes + kInputWait] = cs.input_wait;
    a.probes[blockIdx.x * kProbes + kFullWait] = cs.full_wait;
  }
}

template <bool kTagged>
__global__ void __launch_bounds__(kThreads, 1) DataflowStepKernel(Args a) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ uint64_t full[kRingSlots], empty[kRingSlots];
  __shared__ float red[kConsumers / 32];
  __shared__ float gates[kMoeSlots];
  __shared__ float partial[kMoeSlots * kChunkRows];  // a stage's per-chunk row sums, for the owner threads
  uint8_t* ring = smem;
  bf16* xin = reinterpret_cast<bf16*>(smem + size_t(kRingSlots) * kSlotBytes);
  if (threadIdx.x == 0) {
    for (int i = 0; i < kRingSlots; ++i) {
      ptx::mbarrier_init(&full[i], 1);
      ptx::mbarrier_init(&empty[i], 1);  // the one warp that read the chunk
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  const long long t0 = clock64();
  if (threadIdx.x >= kConsumers) Produce<kTagged>(a, ring, full, empty);
  else Consume<kTagged>(a, ring, full, empty, xin, red, gates, partial);
  if (threadIdx.x == 0) a.probes[blockIdx.x * kProbes + kTotal] = clock64() - t0;
}

// ---- The latency of one dependent L2 load while the SMs stream HBM ----
// Lane 0 of warp 8 of every block chases a chain of indices through a
// 1 MB array that L2 holds (ld.relaxed.gpu, as the step's polls and stage
// heads read), while warps 0-7 stream a buffer far larger than L2: with
// 16-byte loads (mode 1) or with 16 KB bulk copies, `copies` in flight a
// block (mode 2). The step above depends on exactly such loads while its
// weights stream.
constexpr int kChainWords = 1 << 18;  // 1 MB of uint32
constexpr int kHops = 2000;

struct ChaseArgs {
  const uint32_t* chain;
  const uint4* stream;  // stream_words uint4
  size_t stream_words;
  int mode, copies;
  unsigned long long* hop_cycles;   // [blocks]
  unsigned long long* bytes;        // [blocks]
};

__global__ void __launch_bounds__(kThreads, 1) ChaseUnderStreamKernel(ChaseArgs c) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ uint64_t bars[kRingSlots];
  __shared__ volatile int stop;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  BulkReadRing<kRingSlots> reader{smem, bars, kSlotBytes, uint32_t(c.copies)};
  if (threadIdx.x == 0) {
    stop = 0;
    reader.Init();
  }
  __syncthreads();
  if (warp == kConsumerWarps) {
    if (lane == 0) {
      uint32_t idx = (blockIdx.x * 977u) % kChainWords;
      const long long t0 = clock64();
      for (int h = 0; h < kHops; ++h) {
        asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(idx) : "l"(c.chain + idx) : "memory");
      }
      c.hop_cycles[blockIdx.x] = (clock64() - t0) / kHops + (idx == 0xffffffffu);
      stop = 1;
    }
    return;
  }
  unsigned long long bytes = 0;
  const size_t per_block = c.stream_words / gridDim.x;
  const uint4* mine = c.stream + per_block * blockIdx.x;
  if (c.mode == 1) {
    uint32_t x = 0;
    size_t at = threadIdx.x;
    while (!stop) {
      uint4 v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = __ldg(mine + (at + i * kConsumers) % per_block);
#pragma unroll
      for (int i = 0; i < 4; ++i) x ^= v[i].x ^ v[i].w;
      at += 4 * kConsumers;
      bytes += 4 * 16;
    }
    if (x == 0x12345678u) c.bytes[gridDim.x] = x;  // keeps the loads
  } else if (c.mode == 2 && threadIdx.x == 0) {
    const size_t chunk_words = kSlotBytes / 16;
    while (!stop) {
      reader.Read(mine + (size_t(reader.issued) * chunk_words) % (per_block - chunk_words));
      bytes += kSlotBytes;
    }
    reader.Drain();
  }
  if (c.mode == 1) {
    __shared__ unsigned long long sum;
    if (threadIdx.x == 0) sum = 0;
    asm volatile("bar.sync 1, 256;" ::: "memory");
    atomicAdd(&sum, bytes);
    asm volatile("bar.sync 1, 256;" ::: "memory");
    if (threadIdx.x == 0) c.bytes[blockIdx.x] = sum;
  } else if (threadIdx.x == 0) {
    c.bytes[blockIdx.x] = bytes;
  }
}

void ChaseUnderStreamTable(int sms) {
  uint32_t* chain = nullptr;
  uint4* streamed = nullptr;
  const size_t stream_bytes = size_t(2) << 30;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&chain, sizeof(uint32_t) * kChainWords));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&streamed, stream_bytes));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(streamed, 1, stream_bytes));
  // One cycle through every 32nd word (a new 128-byte line each hop), in a
  // scrambled order so that no prefetcher helps.
  std::vector<uint32_t> h(kChainWords, 0);
  const uint32_t lines = kChainWords / 32;
  std::vector<uint32_t> order(lines);
  for (uint32_t i = 0; i < lines; ++i) order[i] = i;
  uint64_t r = 88172645463325252ull;
  for (uint32_t i = lines - 1; i > 0; --i) {
    r ^= r << 13;
    r ^= r >> 7;
    r ^= r << 17;
    std::swap(order[i], order[r % (i + 1)]);
  }
  for (uint32_t i = 0; i < lines; ++i) h[order[i] * 32] = order[(i + 1) % lines] * 32;
  for (uint32_t i = 0; i < kChainWords; ++i)
    if (i % 32) h[i] = h[i - i % 32];
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(chain, h.data(), sizeof(uint32_t) * kChainWords, cudaMemcpyHostToDevice));
  unsigned long long *hops = nullptr, *bytes = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&hops, sizeof(unsigned long long) * sms));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&bytes, sizeof(unsigned long long) * (sms + 1)));
  const size_t smem = size_t(kRingSlots) * kSlotBytes;
  GROVE_BENCH_CUDA_CHECK(cudaFuncSetAttribute(ChaseUnderStreamKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int device = 0, clock_khz = 0;
  GROVE_BENCH_CUDA_CHECK(cudaGetDevice(&device));
  GROVE_BENCH_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  TimedStream timed;
  std::printf("\none dependent L2 load (ld.relaxed.gpu, a 1 MB chain L2 holds) while every SM streams a 2 GB buffer:\n");
  const struct {
    int mode, copies;
    const char* name;
  } rows[] = {{0, 0, "nothing streaming"},
              {1, 0, "8 warps of 16-byte loads, 4 in flight a thread"},
              {2, 1, "bulk copies of 16 KB, 1 in flight a block"},
              {2, 2, "bulk copies, 2 in flight a block"},
              {2, 4, "bulk copies, 4 in flight a block"},
              {2, 12, "bulk copies, 12 in flight a block"}};
  for (const auto& row : rows) {
    ChaseArgs c{chain, streamed, stream_bytes / 16, row.mode, row.copies, hops, bytes};
    float ms = 0.f;
    for (int rep = 0; rep < 2; ++rep) {  // the first run warms L2 with the chain
      timed.Start();
      ChaseUnderStreamKernel<<<sms, kThreads, smem, timed.stream()>>>(c);
      GROVE_BENCH_CUDA_CHECK(cudaGetLastError());
      ms = timed.StopMs();
    }
    std::vector<unsigned long long> hh(sms), bb(sms + 1);
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(hh.data(), hops, sizeof(unsigned long long) * sms, cudaMemcpyDeviceToHost));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(bb.data(), bytes, sizeof(unsigned long long) * (sms + 1), cudaMemcpyDeviceToHost));
    double hop = 0.0, total = 0.0;
    for (int b = 0; b < sms; ++b) {
      hop += double(hh[b]) / sms;
      total += double(bb[b]);
    }
    std::printf("  %-48s %7.0f cycles = %5.2f us a load; streaming %6.0f GB/s\n", row.name, hop, hop / clock_khz * 1e3,
                row.mode ? total / (ms * 1e-3) / 1e9 : 0.0);
  }
  cudaFree(chain);
  cudaFree(streamed);
  cudaFree(hops);
  cudaFree(bytes);
}

}  // namespace

void DataflowStepTable(double read_gbs, int reps) {
  int device = 0, sms = 0;
  GROVE_BENCH_CUDA_CHECK(cudaGetDevice(&device));
  GROVE_BENCH_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if ((kH + sms - 1) / sms > kChunkRows || sms < kAttItems) {  // a block owns at most one chunk of residual rows
    std::printf("dataflow step probe: needs at least %d SMs (has %d)\n", kH / kChunkRows, sms);
    return;
  }
  const size_t qkv = size_t(kLayers) * kQkv * kH, wo = size_t(kLayers) * kH * kQd, rs = size_t(kLayers) * kRsRows * kH;
  const size_t w13 = size_t(kLayers) * kExperts * 2 * kEh * kH, w2 = size_t(kLayers) * (kExperts + kShared) * kH * kEh;
  const size_t lm = size_t(kVocab) * kH, kv = size_t(kLayers) * kKvHeads * kCtx * kHd;
  const size_t weights = qkv + wo + rs + w13 + w2 + lm + 2 * kv;
  bf16* w = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&w, weights * sizeof(bf16)));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(w, 0x3c, weights * sizeof(bf16)));  // every weight bf16 0x3c3c ~ 0.0115
  Args a{};
  a.qkv = w;
  a.wo = a.qkv + qkv;
  a.rs = a.wo + wo;
  a.w13 = a.rs + rs;
  a.w2 = a.w13 + w13;
  a.lm = a.w2 + w2;
  a.kc = a.lm + lm;
  a.vc = a.kc + kv;
  float* f = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&f, sizeof(float) * (kH + kVocab)));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(f, 0, sizeof(float) * (kH + kVocab)));
  a.x = f;
  a.logits = f + kH;
  const size_t tagged = size_t(kLayers) * (kQkv + kCtxChunks * kQd + 2 * kH + kRsRows + kUpRows);
  uint64_t* words = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&words, sizeof(uint64_t) * tagged));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(words, 0, sizeof(uint64_t) * tagged));  // tag 0: no step's
  a.aqkv = words;
  a.attn = a.aqkv + size_t(kLayers) * kQkv;
  a.xw = a.attn + size_t(kLayers) * kCtxChunks * kQd;
  a.xd = a.xw + size_t(kLayers) * kH;
  a.ars = a.xd + size_t(kLayers) * kH;
  a.up = a.ars + size_t(kLayers) * kRsRows;
  std::vector<float> x0(kH);
  for (int i = 0; i < kH; ++i) x0[i] = std::sin(0.1f * i);
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&a.counters, sizeof(uint32_t) * kLayers * kStages));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&a.probes, sizeof(unsigned long long) * sms * kProbes));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(a.counters, 0, sizeof(uint32_t) * kLayers * kStages));

  const size_t smem = size_t(kRingSlots) * kSlotBytes + sizeof(float) * kXinValues;
  GROVE_BENCH_CUDA_CHECK(
      cudaFuncSetAttribute(DataflowStepKernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  GROVE_BENCH_CUDA_CHECK(
      cudaFuncSetAttribute(DataflowStepKernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  TimedStream timed;
  cudaStream_t stream = timed.stream();
  uint32_t step = 0;
  bool tagged_mode = false;
  bool fixed_route = false;
  auto launch = [&] {
    a.route_seed = fixed_route ? 12345u : step;
    a.step = step++;
    void* params[] = {&a};
    void* kernel = tagged_mode ? reinterpret_cast<void*>(DataflowStepKernel<true>)
                               : reinterpret_cast<void*>(DataflowStepKernel<false>);
    GROVE_BENCH_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(sms), dim3(kThreads), params, smem, stream));
  };
  // Each rep starts from the same residual so the numbers stay finite.
  auto reset_x = [&] {
    GROVE_BENCH_CUDA_CHECK(cudaMemcpyAsync(a.x, x0.data(), sizeof(float) * kH, cudaMemcpyHostToDevice, stream));
  };
  auto items = [&](int n) {
    const int per = (n + sms - 1) / sms, rpb = (per + kChunkRows - 1) / kChunkRows * kChunkRows;
    return uint32_t((n + rpb - 1) / rpb);
  };
  const uint32_t want[kStages] = {items(kQkv), kAttItems, items(kH), items(kRsRows), items(kUpRows), items(kH)};
  const size_t step_bytes =
      sizeof(bf16) * (size_t(kLayers) * (size_t(kQkv) * kH + size_t(kH) * kQd + size_t(kRsRows) * kH +
                                          size_t(kUpRows) * kH + size_t(kMoeSlots) * kH * kEh + 2 * kKvHeads * kCtx * kHd) +
                      lm);
  int clock_khz = 0;
  GROVE_BENCH_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  constexpr int kStepsPerRep = 20;
  std::printf("dataflow decode step (gpu-ref shapes, bf16, 16 MoE layers, 96 cached keys; %d blocks x %d threads, "
              "%d-slot ring of %d KB; %.1f MB of weights a step): median of %d x %d launches\n",
              sms, kThreads, kRingSlots, kSlotBytes / 1024, step_bytes / 1e6, reps, kStepsPerRep);
  const struct {
    bool tagged;
    int cuts, in_flight;
    const char* name;
  } rows[] = {{false, 0, kRingSlots, "counters, 12 copies in flight"},
              {false, 0, 6, "counters, 6 in flight"},
              {false, 0, 4, "counters, 4 in flight"},
              {false, 0, 3, "counters, 3 in flight"},
              {false, 0, 2, "counters, 2 in flight"},
              {true, 0, 4, "tagged data, 4 in flight"},
              {false, kNoRouteWait, 4, "counters, 4 in flight, cut: routed experts fetched without the logits"},
              {false, kNoRouteWait | kNoInputWait, 4, "4 in flight, cut: no waits at all (streaming only)"},
              {false, kNoRouteWait | kNoInputWait, kRingSlots, "12 in flight, cut: no waits at all (streaming only)"}};
  for (const auto& row : rows) {
    tagged_mode = row.tagged;
    a.cuts = row.cuts;
    a.in_flight = row.in_flight;
    for (int i = 0; i < 3; ++i) {
      reset_x();
      launch();
    }
    GROVE_BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<float> ms;
    for (int r = 0; r < reps; ++r) {
      timed.Start();
      for (int i = 0; i < kStepsPerRep; ++i) launch();
      ms.push_back(timed.StopMs() / kStepsPerRep);
      reset_x();
    }
    std::sort(ms.begin(), ms.end());
    // Every counter must stand at its stage's items times the launches made.
    std::vector<uint32_t> counters(kLayers * kStages);
    GROVE_BENCH_CUDA_CHECK(
        cudaMemcpy(counters.data(), a.counters, sizeof(uint32_t) * counters.size(), cudaMemcpyDeviceToHost));
    bool counts_ok = true;
    for (int l = 0; l < kLayers; ++l)
      for (int s = 0; s < kStages; ++s) counts_ok = counts_ok && counters[l * kStages + s] == want[s] * step;
    std::vector<float> logits(kVocab);
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(logits.data(), a.logits, sizeof(float) * kVocab, cudaMemcpyDeviceToHost));
    bool finite = true;
    for (float v : logits) finite = finite && std::isfinite(v);
    const double med = ms[ms.size() / 2];
    std::printf("%s: %.3f ms a step (min %.3f): %.0f GB/s = %.0f%% of the %.0f GB/s read ceiling; counters %s, "
                "logits %s\n",
                row.name, med, ms.front(), step_bytes / med / 1e6, 100.0 * step_bytes / med / 1e6 / read_gbs, read_gbs,
                counts_ok ? "as expected" : "WRONG", finite ? "finite" : "NOT FINITE");
    // Where the last launch's time went, averaged over the blocks.
    std::vector<unsigned long long> probes(size_t(sms) * kProbes);
    GROVE_BENCH_CUDA_CHECK(
        cudaMemcpy(probes.data(), a.probes, sizeof(unsigned long long) * probes.size(), cudaMemcpyDeviceToHost));
    double mean[kProbes] = {};
    for (int b = 0; b < sms; ++b)
      for (int p = 0; p < kProbes; ++p) mean[p] += double(probes[size_t(b) * kProbes + p]) / sms;
    auto us = [&](double cycles) { return cycles / clock_khz * 1e3; };
    std::printf("  a block's last launch, mean over blocks (us at %d MHz): in the kernel %.1f; consumers waiting on "
                "inputs %.1f, on landed weights %.1f; producer waiting on free slots %.1f, on the routes %.1f\n",
                clock_khz / 1000, us(mean[kTotal]), us(mean[kInputWait]), us(mean[kFullWait]), us(mean[kEmptyWait]),
                us(mean[kRouteWait]));
  }
  // The two protocols must compute the same step: one launch of each from
  // the same residual with the same routes, logits compared bit for bit.
  fixed_route = true;
  a.cuts = 0;
  a.in_flight = 4;
  std::vector<float> by_mode[2];
  for (int m = 0; m < 2; ++m) {
    tagged_mode = m == 1;
    reset_x();
    launch();
    GROVE_BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
    by_mode[m].resize(kVocab);
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(by_mode[m].data(), a.logits, sizeof(float) * kVocab, cudaMemcpyDeviceToHost));
  }
  int differ = 0;
  for (int i = 0; i < kVocab; ++i) differ += std::memcmp(&by_mode[0][i], &by_mode[1][i], sizeof(float)) != 0;
  std::printf("one step by each protocol, same residual and routes: %d of %d logits differ\n", differ, kVocab);
  ChaseUnderStreamTable(sms);
  cudaFree(a.probes);
  cudaFree(w);
  cudaFree(f);
  cudaFree(words);
  cudaFree(a.counters);
}

}  // namespace grove::bench
