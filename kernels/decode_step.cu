#include "kernels/decode_step.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "kernels/paged_kv_device.cuh"
#include "kernels/ptx/grid_sync.cuh"
#include "kernels/ptx/prefetch.cuh"
#include "kernels/quant_gemv.cuh"
#include "kernels/rmsnorm_row.cuh"
#include "kernels/router_topk.cuh"
#include "kernels/swiglu_math.cuh"

namespace grove::kernels {
namespace {

using bf16 = __nv_bfloat16;
using gemv::kThreads;
constexpr int kWarps = gemv::kWarps;
constexpr int kUnitRows = 8;       // weight rows one warp streams together (8 16-byte loads in flight per lane)
constexpr int kMaxItemRows = 128;  // rows of one block's item in a linear stage
constexpr int kMaxSlices = 8;      // gemv::MakeSplit's largest
constexpr int kMaxUpItemUnits = 32;  // hidden units (W1 + W3 rows) of one MoE up item, at most
constexpr int kDownItemRows = 8;   // W2 rows of one MoE down item
constexpr int kMaxSlots = 16;      // top_k + shared experts
constexpr int kRedundantMergeChunks = 8;  // up to this many split-KV chunks, each wo block merges them itself
constexpr int kMaxK = 8192;

template <QuantFormat F>
using FormatTag = std::integral_constant<QuantFormat, F>;

template <typename Fn>
__device__ __forceinline__ void WithFormat(QuantFormat f, Fn&& fn) {
  switch (f) {
    case QuantFormat::kBF16: fn(FormatTag<QuantFormat::kBF16>{}); break;
    case QuantFormat::kInt8: fn(FormatTag<QuantFormat::kInt8>{}); break;
    case QuantFormat::kInt4: fn(FormatTag<QuantFormat::kInt4>{}); break;
  }
}

// ---- Grid barrier (all blocks resident: a cooperative launch) ----
// Counter 0 counts arrivals (the n-th barrier completes at n * gridDim.x);
// counter 1 counts blocks leaving, and the last one out zeroes both, so the
// next launch on the stream starts from zero.
struct GridBarrier {
  uint32_t* count;
  uint64_t* clock;  // DecodeStepArgs::stage_clock (null: not recorded)
  uint32_t target = 0;
  int marks = 0;
  // Block 0 stamps the end of each stage (DecodeStepArgs::stage_clock).
  __device__ void Stamp(DecodeStage stage) {
    if (clock != nullptr && blockIdx.x == 0 && threadIdx.x == 0 && marks < kDecodeStepMaxMarks) {
      uint64_t t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      clock[2 * marks] = uint64_t(stage);
      clock[2 * marks + 1] = t;
      ++marks;
    }
  }
  // Arrive, then (between the two) work that needs no other block's
  // results, e.g. L2 prefetches of the next stage's weights, then Wait.
  __device__ void Arrive() {
    __syncthreads();
    target += gridDim.x;
    if (threadIdx.x == 0) ptx::red_release_gpu_add(count, 1u);
  }
  __device__ void Wait(DecodeStage stage) {
    if (threadIdx.x == 0)
      while (ptx::ld_acquire_gpu(count) < target) {
      }
    __syncthreads();
    Stamp(stage);
  }
  __device__ void Sync(DecodeStage stage) {
    Arrive();
    Wait(stage);
  }
  __device__ void Leave(DecodeStage stage) {
    __syncthreads();
    Stamp(stage);
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(count + 1, 1u) == gridDim.x - 1) {
        count[0] = 0;
        count[1] = 0;
        __threadfence();
      }
    }
  }
};

// ---- The gemv core, many rows per warp ----
// Which weight rows a block's units cover: `matrices` (1 or 2) matrices of
// the same shape and format, rows [r0, r0 + nrows) of each, in unit groups
// of kUnitRows rows; unit u = ((matrix * groups + group) * slices + slice).
// A row's slice sum goes to red_s[(matrix * red_stride + t) * kMaxSlices +
// slice] (t = the row's index in [0, nrows)); rows past nrows repeat the
// last (their sums are dropped).
struct RowSet {
  const uint8_t* base[2];
  const float* scale_base[2];
  int64_t row_bytes, row_scales;
  int r0, nrows, groups, matrices, slices;
  float* red_s;
  int red_stride;
  __device__ __forceinline__ int Units() const { return matrices * groups * slices; }
  __device__ __forceinline__ int Matrix(int u) const { return u / slices / groups; }
  __device__ __forceinline__ int Local(int u, int i) const { return (u / slices % groups) * kUnitRows + i; }
  __device__ __forceinline__ int64_t Row(int u, int i) const {
    const int t = Local(u, i);
    return r0 + (t < nrows ? t : nrows - 1);
  }
};

// A warp's share of a block's dot products with the staged row x_s (M = 1):
// units first, first + stride, ... of `rows`; each unit is kUnitRows weight
// rows over one slice of the rows' 16-byte chunks (gemv::Split). The loads
// of the next (unit, iteration) are in flight while the current one
// computes. Each (row, slice) lane sum sees exactly gemv::WarpDot's FMAs in
// WarpDot's order and the same xor-shuffle tree, so summing a row's slices
// in order gives the bits of QuantLinear / MoeDecodeForward. Not inlined:
// one copy per format serves every stage, so the code the step runs stays
// in the instruction cache from layer to layer.
template <QuantFormat F>
__device__ __noinline__ void WarpDotUnits(int first, int stride, const RowSet& rows_in, const uint4* __restrict__ x_s) {
  constexpr int S = gemv::Format<F>::kChunkCols / 8;
  constexpr int R = kUnitRows;
  const RowSet rows = rows_in;
  const int end = rows.Units();
  if (first >= end) return;
  const int k = int(rows.row_bytes * 8 / (F == QuantFormat::kBF16 ? 16 : F == QuantFormat::kInt8 ? 8 : 4));
  const gemv::Split sp = gemv::MakeSplit(F, k);
  const int lane = threadIdx.x % 32;
  auto valid = [&](int it) { return it < sp.iters && it * 32 + lane < sp.chunks; };
  auto load = [&](int u, int it, uint4(&raw)[R], float(&sc)[R]) {
    const int c = it * 32 + lane;
    const int m = rows.Matrix(u);
    const uint8_t* base = rows.base[m];
    const float* sbase = rows.scale_base[m];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t row = rows.Row(u, i);
      raw[i] = __ldg(reinterpret_cast<const uint4*>(base + row * rows.row_bytes) + c);
      if constexpr (F == QuantFormat::kInt8) sc[i] = __ldg(sbase + row * rows.row_scales);
      else if constexpr (F == QuantFormat::kInt4) sc[i] = __ldg(sbase + row * rows.row_scales + (c * 32) / 128);
      else sc[i] = 1.f;
    }
  };
  int u = first, it = first % rows.slices;
  uint4 cur[R];
  float csc[R];
  if (valid(it)) load(u, it, cur, csc);
  float acc[R];
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i] = 0.f;
  while (true) {
    int nu = u, nit = it + sp.slices;
    if (nit >= sp.iters) {
      nu = u + stride;
      nit = nu < end ? nu % rows.slices : 0;
    }
    const bool more = nu < end;
    uint4 nxt[R];
    float nsc[R];
    if (more && valid(nit)) load(nu, nit, nxt, nsc);
    if (valid(it)) {
#pragma unroll
      for (int s = 0; s < S; ++s) {
        float xv[8];
        gemv::XOctetToFloats(x_s[(it * S + s) * 32 + lane], xv);
#pragma unroll
        for (int i = 0; i < R; ++i) {
          float w[8];
          gemv::DequantOctet<F>(cur[i], s, csc[i], w);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i] = fmaf(w[e], xv[e], acc[i]);
        }
      }
    }
    if (nu != u) {
      const int m = rows.Matrix(u), slice = u % rows.slices;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        float v = acc[i];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        const int t = rows.Local(u, i);
        if (lane == 0 && t < rows.nrows) rows.red_s[(m * rows.red_stride + t) * kMaxSlices + slice] = v;
        acc[i] = 0.f;
      }
    }
    if (!more) break;
    u = nu;
    it = nit;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      cur[i] = nxt[i];
      csc[i] = nsc[i];
    }
  }
}

// The rows [r0, r0 + nrows) of the given matrices of format F.
template <QuantFormat F>
__device__ __forceinline__ RowSet MakeRowSet(const QuantWeight& a, const QuantWeight* b, int r0, int nrows,
                                             float* red_s, int red_stride) {
  RowSet r;
  r.base[0] = static_cast<const uint8_t*>(a.data);
  r.scale_base[0] = a.scales;
  r.base[1] = b ? static_cast<const uint8_t*>(b->data) : r.base[0];
  r.scale_base[1] = b ? b->scales : r.scale_base[0];
  r.row_bytes = gemv::RowBytes(F, a.k);
  r.row_scales = gemv::RowScales(F, a.k);
  r.r0 = r0;
  r.nrows = nrows;
  r.groups = (nrows + kUnitRows - 1) / kUnitRows;
  r.matrices = b ? 2 : 1;
  r.slices = gemv::MakeSplit(F, a.k).slices;
  r.red_s = red_s;
  r.red_stride = red_stride;
  return r;
}

// Rows [r0, r0 + nrows) of w (nrows <= kMaxItemRows) against x_s: the whole
// block, then red_s[t * kMaxSlices + j] holds row r0 + t's slice-j sum.
template <QuantFormat F>
__device__ void BlockDotRows(const QuantWeight& w, int r0, int nrows, const uint4* x_s, float* red_s) {
  const RowSet rows = MakeRowSet<F>(w, nullptr, r0, nrows, red_s, 0);
  WarpDotUnits<F>(threadIdx.x / 32, kWarps, rows, x_s);
  __syncthreads();
}

// gemv::SliceSum's order over red_s's layout.
__device__ __forceinline__ float SlicesOf(const float* red_s, int t, int slices) {
  float v = 0.f;
  for (int j = 0; j < slices; ++j) v += red_s[t * kMaxSlices + j];
  return v;
}

// Rows per item of a linear stage of n rows: about one item per block, in
// whole units, at most kMaxItemRows.
__device__ __forceinline__ int RowsPerItem(int n) {
  const int per_block = (n + gridDim.x - 1) / gridDim.x;
  const int r = (per_block + kUnitRows - 1) / kUnitRows * kUnitRows;
  return r < kUnitRows ? kUnitRows : r > kMaxItemRows ? kMaxItemRows : r;
}

// L2 prefetches of weight rows [r0, r0 + nrows) of w and their scales
// (the whole block, one 128-byte line per thread at a time). Weights are
// not written during a launch, so any stage may prefetch any of them.
__device__ __forceinline__ void PrefetchRows(const QuantWeight& w, int r0, int nrows) {
  const int64_t row_bytes = gemv::RowBytes(w.format, w.k), row_scales = gemv::RowScales(w.format, w.k);
  const char* data = static_cast<const char*>(w.data) + int64_t(r0) * row_bytes;
  for (int64_t off = int64_t(threadIdx.x) * 128; off < nrows * row_bytes; off += int64_t(blockDim.x) * 128)
    ptx::prefetch_global_L2(data + off);
  if (row_scales > 0) {
    const char* sc = reinterpret_cast<const char*>(w.scales + int64_t(r0) * row_scales);
    for (int64_t off = int64_t(threadIdx.x) * 128; off < nrows * row_scales * 4; off += int64_t(blockDim.x) * 128)
      ptx::prefetch_global_L2(sc + off);
  }
}

// This block's first item of a linear stage over w (LinearStage's split).
__device__ __forceinline__ void PrefetchLinear(const QuantWeight& w) {
  const int rpi = RowsPerItem(w.n);
  const int r0 = int(blockIdx.x) * rpi;
  if (r0 < w.n) PrefetchRows(w, r0, min(rpi, w.n - r0));
}

// ---- Staging (gemv::StageXOctets layouts, M = 1) ----

// The dynamic shared memory, laid out by SmemPlan below.
struct Smem {
  float* red_s;       // [kMaxItemRows * kMaxSlices] (also BlockRowRstd's scratch)
  uint4* x_gen;       // one staged row of up to max_k columns
  uint4* x_norm[3];   // the FFN input row (hidden columns) staged per format
  uint4* x_slot;      // [slots][XTileBytes(expert_hidden)]: the MoE down inputs, each in its W2's format
  bf16* eh_raw;       // [slots, expert_hidden]
  float* slot_red;    // [slots][kDownItemRows][kMaxSlices]
};

struct SmemSizes {
  size_t red, gen, norm, slot, raw, slot_red, total;
};

// The MoE's slots per token: the routed ones, then the shared experts.
__host__ __device__ inline int SlotCount(const DecodeStepArgs& a) {
  return a.experts > 0 ? a.top_k + a.shared_experts : 0;
}

__host__ __device__ inline SmemSizes SmemPlan(const DecodeStepArgs& a) {
  auto al = [](size_t b) { return (b + 15) / 16 * 16; };
  const int slots = SlotCount(a);
  int max_k = a.hidden > a.heads * a.head_dim ? a.hidden : a.heads * a.head_dim;
  if (a.dense_hidden > max_k) max_k = a.dense_hidden;
  SmemSizes s;
  s.red = al(sizeof(float) * kMaxItemRows * kMaxSlices);
  s.gen = al(size_t(gemv::XTileBytes(max_k, 1)));
  s.norm = al(size_t(gemv::XTileBytes(a.hidden, 1)));
  s.slot = slots > 0 ? al(size_t(gemv::XTileBytes(a.expert_hidden, 1))) : 0;
  s.raw = al(sizeof(bf16) * size_t(slots) * a.expert_hidden);
  s.slot_red = al(sizeof(float) * slots * kDownItemRows * kMaxSlices);
  s.total = s.red + s.gen + 3 * s.norm + slots * s.slot + s.raw + s.slot_red;
  return s;
}

// ---- Workspace ----
struct Work {
  uint32_t* barrier;  // [2]
  float* qkv;         // [qd + 2 kd]
  paged_device::SplitWorkspace attn;
  bf16* attn_out;     // [qd]: merged attention (long contexts)
  float* rlogits;     // [experts]
  bf16* eh;           // [slots, expert_hidden]
  float* fa;          // [2 * dense_hidden]
  size_t total;
};

// The split-KV chunks of the step's one row (PagedAttentionSplit's count).
__host__ __device__ inline int SplitChunks(const DecodeStepArgs& a, const PagedKvCache& kv) {
  return PagedAttentionSplitChunks(kv, a.max_pos, PagedAttentionSplitWalkChunkTokens(1, a.kv_heads));
}

__host__ __device__ inline Work WorkPlan(const DecodeStepArgs& a, const PagedKvCache& kv, void* base) {
  auto al = [](size_t b) { return (b + 255) / 256 * 256; };
  char* p = static_cast<char*>(base);
  size_t at = 0;
  Work w;
  const int qd = a.heads * a.head_dim, kd = a.kv_heads * a.head_dim;
  const int64_t states = int64_t(a.heads) * SplitChunks(a, kv);
  const int slots = SlotCount(a);
  w.barrier = reinterpret_cast<uint32_t*>(p + at);
  at += al(2 * sizeof(uint32_t));
  w.qkv = reinterpret_cast<float*>(p + at);
  at += al(sizeof(float) * (qd + 2 * kd));
  w.attn = paged_device::SplitLayout(p + at, states);
  at += al(sizeof(float) * states * (a.head_dim + 2));
  w.attn_out = reinterpret_cast<bf16*>(p + at);
  at += al(sizeof(bf16) * qd);
  w.rlogits = reinterpret_cast<float*>(p + at);
  at += al(sizeof(float) * (a.experts > 0 ? a.experts : 1));
  w.eh = reinterpret_cast<bf16*>(p + at);
  at += al(sizeof(bf16) * size_t(slots > 0 ? slots : 1) * (a.expert_hidden > 0 ? a.expert_hidden : 1));
  w.fa = reinterpret_cast<float*>(p + at);
  at += al(sizeof(float) * 2 * (a.dense_hidden > 0 ? a.dense_hidden : 1));
  w.total = at;
  return w;
}

// ---- Stages ----

// y[r] (+)= dot(w row r, staged x) for the items of this block (rows in
// items of RowsPerItem(n)); `stage(tag)` stages x for format F (ending with
// a barrier) and returns it, called once, only by blocks with an item.
template <typename StageFn>
__device__ void LinearStage(const QuantWeight& w, float* y, bool add, float* red_s, StageFn&& stage) {
  const int rpi = RowsPerItem(w.n);
  const int items = (w.n + rpi - 1) / rpi;
  if (int(blockIdx.x) >= items) return;
  WithFormat(w.format, [&](auto tag) {
    constexpr QuantFormat F = decltype(tag)::value;
    const uint4* x_s = stage(tag);
    const gemv::Split sp = gemv::MakeSplit(F, w.k);
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
      const int r0 = item * rpi, nrows = min(rpi, w.n - r0);
      BlockDotRows<F>(w, r0, nrows, x_s, red_s);
      for (int t = threadIdx.x; t < nrows; t += blockDim.x) {
        const float v = SlicesOf(red_s, t, sp.slices);
        y[r0 + t] = add ? y[r0 + t] + v : v;
      }
      __syncthreads();
    }
  });
}

// The RMSNorm'd row of x staged for format F (x_norm[F]), computed at most
// once per format per stage group (`staged` has a bit per format done).
struct NormedRow {
  const float* x;
  const float* weight;
  float eps;
  int hidden;
  float rstd = 0.f;
  bool have_rstd = false;
  unsigned staged = 0;

  template <QuantFormat F>
  __device__ const uint4* Get(const Smem& sm) {
    if (!have_rstd) {
      rstd = BlockRowRstd<kThreads>(x, hidden, eps, sm.red_s);
      have_rstd = true;
      __syncthreads();  // red_s free again
    }
    uint4* x_s = sm.x_norm[int(F)];
    if (!(staged & (1u << int(F)))) {
      const float r = rstd;
      gemv::StageXOctets<F, 1>(x_s, hidden, 1, [&](int, int col) { return RmsNormedOctet(x, weight, r, col); });
      staged |= 1u << int(F);
    }
    return x_s;
  }
};

// The MoE up items of `slots` slots: units (hidden units, a W1 row and a
// W3 row each) per item about the stage's share of one block, in whole
// kUnitRows, at most kMaxUpItemUnits; a slot's last item may be partial.
struct UpSplit {
  int units;     // per item
  int per_slot;  // items per slot
};
__device__ __forceinline__ UpSplit MakeUpSplit(int slots, int expert_hidden) {
  const int per_block = (slots * expert_hidden + gridDim.x - 1) / gridDim.x;
  int u = (per_block + kUnitRows - 1) / kUnitRows * kUnitRows;
  u = u < kUnitRows ? kUnitRows : u > kMaxUpItemUnits ? kMaxUpItemUnits : u;
  return {u, (expert_hidden + u - 1) / u};
}

// One MoE up item: hidden units [u0, u0 + item_units) of one expert (fewer
// at the end of its rows): W1's rows then W3's, h = bf16(silu(W1 x) * (W3
// x)) into h_out (the slot's expert_hidden row): MoeDecodeForward's up
// arithmetic.
template <QuantFormat F>
__device__ void UpItem(const QuantWeight& w1, const QuantWeight& w3, int u0, int item_units, const uint4* x_s,
                       float* red_s, bf16* h_out) {
  const int nunits = min(item_units, w1.n - u0);
  const RowSet rows = MakeRowSet<F>(w1, &w3, u0, nunits, red_s, kMaxUpItemUnits);
  WarpDotUnits<F>(threadIdx.x / 32, kWarps, rows, x_s);
  __syncthreads();
  for (int t = threadIdx.x; t < nunits; t += blockDim.x) {
    const float g = SlicesOf(red_s, t, rows.slices);
    const float u = SlicesOf(red_s, kMaxUpItemUnits + t, rows.slices);
    h_out[u0 + t] = __float2bfloat16_rn(SiluExact(g) * u);
  }
  __syncthreads();
}

// Routing state of one MoE layer, identical in every block.
struct Routes {
  uint16_t ids[kMaxSlots];
  float gates[kMaxSlots];
  float scores[kRouterMaxExperts];
  float logits[kRouterMaxExperts];
};

// A layer's descriptors in shared memory: every grid barrier's acquire
// drops the L1, so reading them from the device table would put a chain of
// L2 round trips at the head of every stage. Slot j's expert weights: the
// shared experts' (slots top_k..) at load, the routed ones after top-k.
struct LayerCache {
  DecodeStepLayer layer;
  QuantWeight w1[kMaxSlots], w3[kMaxSlots], w2[kMaxSlots];
};

// Copies layer l's descriptors (and its shared experts') into dst; the
// caller synchronizes the block before reading them.
__device__ void LoadLayer(const DecodeStepArgs& a, int l, LayerCache& dst) {
  static_assert(sizeof(DecodeStepLayer) % 4 == 0, "copied as words");
  const uint32_t* src = reinterpret_cast<const uint32_t*>(a.layers + l);
  uint32_t* d = reinterpret_cast<uint32_t*>(&dst.layer);
  for (int t = threadIdx.x; t < int(sizeof(DecodeStepLayer) / 4); t += blockDim.x) d[t] = src[t];
  const DecodeStepLayer* g = a.layers + l;
  const int t = threadIdx.x;
  if (t < 3 * a.shared_experts && g->moe) {
    const int s = t % a.shared_experts, e = a.experts + s, j = a.top_k + s;
    if (t < a.shared_experts) dst.w1[j] = g->expert_w1[e];
    else if (t < 2 * a.shared_experts) dst.w3[j] = g->expert_w3[e];
    else dst.w2[j] = g->expert_w2[e];
  }
}

__global__ void __launch_bounds__(kThreads, 1) DecodeStepKernel(DecodeStepArgs a) {
  extern __shared__ uint4 smem_raw[];
  __shared__ Routes routes;
  __shared__ LayerCache lc[2];
  __shared__ int32_t row_slot_s, row_pos_s;
  const SmemSizes sz = SmemPlan(a);
  Smem sm;
  {
    char* p = reinterpret_cast<char*>(smem_raw);
    sm.red_s = reinterpret_cast<float*>(p);
    p += sz.red;
    sm.x_gen = reinterpret_cast<uint4*>(p);
    p += sz.gen;
    for (int f = 0; f < 3; ++f) {
      sm.x_norm[f] = reinterpret_cast<uint4*>(p);
      p += sz.norm;
    }
    sm.x_slot = reinterpret_cast<uint4*>(p);
    p += SlotCount(a) * sz.slot;
    sm.eh_raw = reinterpret_cast<bf16*>(p);
    p += sz.raw;
    sm.slot_red = reinterpret_cast<float*>(p);
  }
  const DecodeStepLayer* layers = a.layers;
  const Work work = WorkPlan(a, layers[0].kv, a.workspace);
  GridBarrier bar{work.barrier, a.stage_clock};
  bar.Stamp(DecodeStage::kStart);
  const int H = a.hidden, hd = a.head_dim, qd = a.heads * hd, kd = a.kv_heads * hd;
  const int slots = SlotCount(a);
  const int slot = a.row.slot[0], pos = a.row.pos[0];
  float* x = a.x;
  if (threadIdx.x == 0) {
    row_slot_s = slot;
    row_pos_s = pos;
  }
  const PagedRows row_s{&row_slot_s, &row_pos_s, 1};
  LoadLayer(a, 0, lc[0]);
  __syncthreads();

  // Embedding.
  {
    const int t = a.token[0];
    const bool ok = t >= 0 && t < a.vocab;
    const float* src = a.embed + int64_t(ok ? t : 0) * H;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < H; j += gridDim.x * blockDim.x) x[j] = ok ? src[j] : 0.f;
  }
  bar.Arrive();
  PrefetchLinear(lc[0].layer.qkv);
  bar.Wait(DecodeStage::kEmbed);

  // A layer's last barrier: while it waits, the next layer's descriptors
  // come into shared memory and its QKV rows (or the lm_head's) into L2.
  auto finish_layer = [&](int l, DecodeStage stage) {
    bar.Arrive();
    if (l + 1 < a.num_layers) {
      LoadLayer(a, l + 1, lc[(l + 1) & 1]);
      __syncthreads();
      PrefetchLinear(lc[(l + 1) & 1].layer.qkv);
    } else {
      PrefetchLinear(a.lm_head);
    }
    bar.Wait(stage);
  };
  const float scale = a.attn_scale != 0.f ? a.attn_scale : 1.f / sqrtf(float(hd));
  const int eh = a.expert_hidden;
  const int warp = threadIdx.x / 32;
  for (int l = 0; l < a.num_layers; ++l) {
    LayerCache& LC = lc[l & 1];
    const DecodeStepLayer& L = LC.layer;
    // 1. RMSNorm + QKV.
    {
      NormedRow in{x, L.attn_norm, a.norm_eps, H};
      LinearStage(L.qkv, work.qkv, false, sm.red_s,
                  [&](auto tag) { return in.template Get<decltype(tag)::value>(sm); });
    }
    bar.Arrive();
    PrefetchLinear(L.wo);  // the attention stage keeps few blocks busy
    bar.Wait(DecodeStage::kQkv);

    // 2. RoPE + KV append + split-KV attention, one (kv head, chunk) per item.
    const PagedKvCache& kv = L.kv;
    const int chunks = SplitChunks(a, kv);
    const bool row_ok = paged_device::RowValid(kv, slot, pos);
    const int chunk_tokens = PagedAttentionSplitWalkChunkTokens(1, a.kv_heads);
    const int live = row_ok ? min(pos / chunk_tokens + 1, chunks) : 0;
    {
      const PagedFusedAppend app{work.qkv, qd + 2 * kd, a.rope_cos, a.rope_sin};
      const int items = a.kv_heads * live;
      for (int it = blockIdx.x; it < items; it += gridDim.x) {
        const int kh = it % a.kv_heads, chunk = it / a.kv_heads;
        if (hd == 32)
          paged_device::SplitAttendChunk<32>(kv, row_s, a.heads, nullptr, scale, chunk_tokens, chunks, work.attn, app, 0, kh, chunk);
        else if (hd == 64)
          paged_device::SplitAttendChunk<64>(kv, row_s, a.heads, nullptr, scale, chunk_tokens, chunks, work.attn, app, 0, kh, chunk);
        else
          paged_device::SplitAttendChunk<128>(kv, row_s, a.heads, nullptr, scale, chunk_tokens, chunks, work.attn, app, 0, kh,
                                              chunk);
        __syncthreads();  // the chunk's shared state is reused by the next item
      }
    }
    bar.Arrive();
    if (L.moe) {
      PrefetchLinear(L.router);
      const UpSplit shared = MakeUpSplit(a.shared_experts, eh);
      const int items_r = (L.router.n + RowsPerItem(L.router.n) - 1) / RowsPerItem(L.router.n);
      const int it = int(blockIdx.x) - items_r;
      if (it >= 0 && it < a.shared_experts * shared.per_slot) {
        const int e = a.experts + it / shared.per_slot, u0 = it % shared.per_slot * shared.units;
        const int n = min(shared.units, eh - u0);
        PrefetchRows(LC.w1[e - a.experts + a.top_k], u0, n);
        PrefetchRows(LC.w3[e - a.experts + a.top_k], u0, n);
      }
    } else {
      PrefetchLinear(L.w13);
    }
    bar.Wait(DecodeStage::kAttention);

    // 3. The chunks merged (PagedAttentionSplit's combine), then wo into the
    // residual. Few chunks: every wo block merges them while staging its
    // input; many: one merge stage first.
    const bool merge_in_wo = live <= kRedundantMergeChunks;
    if (!merge_in_wo) {
      for (int h = blockIdx.x; h < a.heads; h += gridDim.x) {
        const int64_t first = int64_t(h) * chunks;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) {
          float M, num, den;
          MergeSoftmaxStates(live, work.attn.m + first, work.attn.l + first, work.attn.acc + first * hd + d, 1, hd,
                             &M, &num, &den);
          work.attn_out[h * hd + d] = __float2bfloat16(den > 0.f ? num / den : 0.f);
        }
      }
      bar.Sync(DecodeStage::kMerge);
    }
    LinearStage(L.wo, x, true, sm.red_s, [&](auto tag) {
      constexpr QuantFormat F = decltype(tag)::value;
      gemv::StageXOctets<F, 1>(sm.x_gen, qd, 1, [&](int, int col) {
        if (!merge_in_wo) return *reinterpret_cast<const uint4*>(work.attn_out + col);
        // MergeSoftmaxStates's arithmetic, 4 dims at a time with every
        // load of a half issued before its first use.
        alignas(16) bf16 o[8];
        const int h = col / hd, d0 = col % hd;
        const int64_t first = int64_t(h) * chunks;
        float mi[kRedundantMergeChunks], li[kRedundantMergeChunks];
#pragma unroll
        for (int i = 0; i < kRedundantMergeChunks; ++i)
          if (i < live) {
            mi[i] = work.attn.m[first + i];
            li[i] = work.attn.l[first + i];
          }
        float M = -INFINITY;
#pragma unroll
        for (int i = 0; i < kRedundantMergeChunks; ++i)
          if (i < live) M = fmaxf(M, mi[i]);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float av[kRedundantMergeChunks][4];
#pragma unroll
          for (int i = 0; i < kRedundantMergeChunks; ++i)
            if (i < live)
#pragma unroll
              for (int e = 0; e < 4; ++e) av[i][e] = work.attn.acc[(first + i) * hd + d0 + 4 * half + e];
          float nu[4] = {0.f, 0.f, 0.f, 0.f}, de = 0.f;
#pragma unroll
          for (int i = 0; i < kRedundantMergeChunks; ++i) {
            if (i >= live || li[i] == 0.f) continue;
            const float f = expf(mi[i] - M);
#pragma unroll
            for (int e = 0; e < 4; ++e) nu[e] = fmaf(av[i][e], f, nu[e]);
            de = fmaf(li[i], f, de);
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) o[4 * half + e] = __float2bfloat16(de > 0.f ? nu[e] / de : 0.f);
        }
        return *reinterpret_cast<const uint4*>(o);
      });
      return static_cast<const uint4*>(sm.x_gen);
    });
    bar.Sync(DecodeStage::kWo);

    NormedRow fin{x, L.ffn_norm, a.norm_eps, H};
    if (!L.moe) {
      // Dense SwiGLU: W1|W3 on the normed row, then W2 on silu(g) * u.
      LinearStage(L.w13, work.fa, false, sm.red_s,
                  [&](auto tag) { return fin.template Get<decltype(tag)::value>(sm); });
      bar.Arrive();
      PrefetchLinear(L.w2);
      bar.Wait(DecodeStage::kDenseW13);
      const int F = L.w13.n / 2;
      LinearStage(L.w2, x, true, sm.red_s, [&](auto tag) {
        constexpr QuantFormat Fmt = decltype(tag)::value;
        gemv::StageXOctets<Fmt, 1>(sm.x_gen, F, 1, [&](int, int col) {
          alignas(16) bf16 o[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) o[e] = __float2bfloat16(SiluExact(work.fa[col + e]) * work.fa[F + col + e]);
          return *reinterpret_cast<const uint4*>(o);
        });
        return static_cast<const uint4*>(sm.x_gen);
      });
      finish_layer(l, DecodeStage::kDenseW2);
      continue;
    }

    // 4. RMSNorm + router logits, and the shared experts' up projection
    // (they need no route).
    {
      const QuantWeight& rw = L.router;
      const int rpi = RowsPerItem(rw.n);
      const int items_r = (rw.n + rpi - 1) / rpi;
      const UpSplit shared = MakeUpSplit(a.shared_experts, eh);
      const int items = items_r + a.shared_experts * shared.per_slot;
      for (int it = blockIdx.x; it < items; it += gridDim.x) {
        if (it < items_r) {
          WithFormat(rw.format, [&](auto tag) {
            constexpr QuantFormat F = decltype(tag)::value;
            const uint4* xs = fin.template Get<F>(sm);
            const gemv::Split sp = gemv::MakeSplit(F, rw.k);
            const int r0 = it * rpi, nrows = min(rpi, rw.n - r0);
            BlockDotRows<F>(rw, r0, nrows, xs, sm.red_s);
            for (int t = threadIdx.x; t < nrows; t += blockDim.x) work.rlogits[r0 + t] = SlicesOf(sm.red_s, t, sp.slices);
            __syncthreads();
          });
        } else {
          const int s = (it - items_r) / shared.per_slot, u0 = (it - items_r) % shared.per_slot * shared.units;
          const QuantWeight& w1 = LC.w1[a.top_k + s];
          const QuantWeight& w3 = LC.w3[a.top_k + s];
          WithFormat(w1.format, [&](auto tag) {
            constexpr QuantFormat F = decltype(tag)::value;
            UpItem<F>(w1, w3, u0, shared.units, fin.template Get<F>(sm), sm.red_s,
                      work.eh + int64_t(a.top_k + s) * eh);
          });
        }
      }
    }
    bar.Sync(DecodeStage::kRouterShared);

    // 5. Top-k (every block routes the same logits the same way), then the
    // routed experts' up projection.
    for (int e = threadIdx.x; e < a.experts; e += blockDim.x) routes.logits[e] = work.rlogits[e];
    __syncthreads();
    if (threadIdx.x < 32) {
      RouterArgs ra;
      ra.logits = routes.logits;
      ra.bias = L.router_bias;
      ra.scores = routes.scores;
      ra.ids = routes.ids;
      ra.gates = routes.gates;
      ra.tokens = 1;
      ra.experts = a.experts;
      ra.top_k = a.top_k;
      ra.sigmoid = a.sigmoid;
      ra.norm_topk = a.norm_topk;
      ra.route_scale = a.route_scale;
      ra.out_stride = slots;
      ra.ids_copy = blockIdx.x == 0 ? L.routes : nullptr;
      ra.ids_copy_stride = a.top_k;
      RouterTopKWarp(ra, 0);
    }
    if (threadIdx.x < a.shared_experts) {
      routes.ids[a.top_k + threadIdx.x] = static_cast<uint16_t>(a.experts + threadIdx.x);
      routes.gates[a.top_k + threadIdx.x] = 1.f;
    }
    __syncthreads();
    if (blockIdx.x == 0) {
      for (int e = threadIdx.x; e < a.experts; e += blockDim.x)
        if (a.router_scores) a.router_scores[e] = routes.scores[e];
      for (int j = threadIdx.x; j < slots; j += blockDim.x) {
        if (a.ids) a.ids[j] = routes.ids[j];
        if (a.gates) a.gates[j] = routes.gates[j];
      }
    }
    if (threadIdx.x < 3 * a.top_k) {
      const int j = threadIdx.x % a.top_k, e = routes.ids[j];
      if (threadIdx.x < a.top_k) LC.w1[j] = L.expert_w1[e];
      else if (threadIdx.x < 2 * a.top_k) LC.w3[j] = L.expert_w3[e];
      else LC.w2[j] = L.expert_w2[e];
    }
    __syncthreads();
    // This block's rows of the down stage, every slot's W2: in L2 by then.
    if (int(blockIdx.x) < H / kDownItemRows)
      for (int j = 0; j < slots; ++j) PrefetchRows(LC.w2[j], blockIdx.x * kDownItemRows, kDownItemRows);
    {
      const UpSplit routed = MakeUpSplit(a.top_k, eh);
      const int items = a.top_k * routed.per_slot;
      for (int it = blockIdx.x; it < items; it += gridDim.x) {
        const int j = it / routed.per_slot, u0 = it % routed.per_slot * routed.units;
        const QuantWeight& w1 = LC.w1[j];
        const QuantWeight& w3 = LC.w3[j];
        WithFormat(w1.format, [&](auto tag) {
          constexpr QuantFormat F = decltype(tag)::value;
          UpItem<F>(w1, w3, u0, routed.units, fin.template Get<F>(sm), sm.red_s, work.eh + int64_t(j) * eh);
        });
      }
    }
    bar.Sync(DecodeStage::kExpertUp);

    // 6. Down: a block's item is kDownItemRows rows of every slot's W2 (warp
    // w takes slots w, w + 8, ...); the slots' gated sums are added in slot
    // order (MoeDecodeForward's combine) into the residual.
    {
      const int items = H / kDownItemRows;
      if (int(blockIdx.x) < items) {
        const int raw_octets = slots * eh / 8;
        for (int i = threadIdx.x; i < raw_octets; i += blockDim.x)
          reinterpret_cast<uint4*>(sm.eh_raw)[i] = reinterpret_cast<const uint4*>(work.eh)[i];
        __syncthreads();
        const size_t slot_stride = sz.slot / sizeof(uint4);
        for (int j = 0; j < slots; ++j) {
          WithFormat(LC.w2[j].format, [&](auto tag) {
            constexpr QuantFormat F = decltype(tag)::value;
            gemv::StageXOctets<F, 1>(sm.x_slot + j * slot_stride, eh, 1, [&](int, int col) {
              return *reinterpret_cast<const uint4*>(sm.eh_raw + int64_t(j) * eh + col);
            });
          });
        }
        for (int item = blockIdx.x; item < items; item += gridDim.x) {
          const int r0 = item * kDownItemRows;
          for (int j = warp; j < slots; j += kWarps) {
            const QuantWeight& w2 = LC.w2[j];
            WithFormat(w2.format, [&](auto tag) {
              constexpr QuantFormat F = decltype(tag)::value;
              const RowSet rows = MakeRowSet<F>(w2, nullptr, r0, kDownItemRows,
                                                sm.slot_red + j * kDownItemRows * kMaxSlices, 0);
              WarpDotUnits<F>(0, 1, rows, sm.x_slot + j * slot_stride);
            });
          }
          __syncthreads();
          for (int t = threadIdx.x; t < kDownItemRows; t += blockDim.x) {
            float s = 0.f;
            for (int j = 0; j < slots; ++j) {
              const int slices = gemv::MakeSplit(LC.w2[j].format, eh).slices;
              s = fmaf(routes.gates[j], SlicesOf(sm.slot_red + j * kDownItemRows * kMaxSlices, t, slices), s);
            }
            x[r0 + t] = s + x[r0 + t];
          }
          __syncthreads();
        }
      }
    }
    finish_layer(l, DecodeStage::kExpertDown);
  }

  // Final RMSNorm + lm_head.
  {
    NormedRow fn{x, a.final_norm, a.norm_eps, H};
    LinearStage(a.lm_head, a.logits, false, sm.red_s,
                [&](auto tag) { return fn.template Get<decltype(tag)::value>(sm); });
  }
  bar.Leave(DecodeStage::kLmHead);
}

Status Invalid(const std::string& what) { return Status::InvalidArgument("DecodeStepOneRow: " + what); }

bool Aligned16(const void* p) { return p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The shape rules, and whether the kernel fits an SM (set on the current
// device); *blocks = the grid (one block per SM).
Status CheckShapesAndFit(const DecodeStepArgs& a, int* blocks) {
  auto mult128 = [](int v) { return v > 0 && v % 128 == 0 && v <= kMaxK; };
  if (a.num_layers < 1) return Invalid("no layers");
  if (!mult128(a.hidden) || !mult128(a.heads * a.head_dim))
    return Invalid("hidden and heads * head_dim must be multiples of 128, at most " + std::to_string(kMaxK));
  if (a.head_dim != 32 && a.head_dim != 64 && a.head_dim != 128) return Invalid("head_dim must be 32, 64 or 128");
  if (a.kv_heads < 1 || a.heads % a.kv_heads != 0 || a.heads / a.kv_heads > kPagedMaxGroup)
    return Invalid("heads must be a multiple of kv_heads, at most " + std::to_string(kPagedMaxGroup) + " per kv head");
  if (a.dense_hidden != 0 && !mult128(a.dense_hidden)) return Invalid("dense_hidden must be a multiple of 128");
  if (a.experts > 0) {
    if (!mult128(a.expert_hidden)) return Invalid("expert_hidden must be a multiple of 128");
    if (a.experts > kRouterMaxExperts || a.top_k < 1 || a.top_k > a.experts || a.shared_experts < 0 ||
        a.top_k + a.shared_experts > kMaxSlots)
      return Invalid("experts <= " + std::to_string(kRouterMaxExperts) + ", 1 <= top_k <= experts, top_k + shared <= " +
                     std::to_string(kMaxSlots));
  }
  if (a.max_pos < 0) return Invalid("max_pos < 0");
  const size_t smem = SmemPlan(a).total;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Always opted in: the 48 KB default counts the static shared memory too.
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(DecodeStepKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, DecodeStepKernel, kThreads, smem);
  if (err != cudaSuccess) return Status::Internal(std::string("DecodeStepOneRow: ") + cudaGetErrorString(err));
  if (per_sm < 1)
    return Invalid("the kernel does not fit on an SM with " + std::to_string(smem) + " bytes of dynamic shared memory");
  *blocks = sms;
  return Status::OK();
}

}  // namespace

const char* DecodeStageName(DecodeStage stage) {
  switch (stage) {
    case DecodeStage::kStart: return "start";
    case DecodeStage::kEmbed: return "embed";
    case DecodeStage::kQkv: return "rmsnorm + qkv";
    case DecodeStage::kAttention: return "rope + append + attention";
    case DecodeStage::kMerge: return "attention merge";
    case DecodeStage::kWo: return "wo";
    case DecodeStage::kDenseW13: return "rmsnorm + dense w1|w3";
    case DecodeStage::kDenseW2: return "swiglu + dense w2";
    case DecodeStage::kRouterShared: return "rmsnorm + router + shared up";
    case DecodeStage::kExpertUp: return "top-k + expert up";
    case DecodeStage::kExpertDown: return "expert down + combine";
    case DecodeStage::kLmHead: return "rmsnorm + lm head";
    case DecodeStage::kCount: break;
  }
  return "?";
}

size_t DecodeStepWorkspaceBytes(const DecodeStepArgs& a) {
  if (a.num_layers <= 0 || a.hidden <= 0) return 0;
  PagedKvCache kv;
  kv.page_tokens = 1;
  kv.max_pages_per_seq = a.max_pos > 0 ? a.max_pos : 1;
  return WorkPlan(a, kv, nullptr).total;
}

Status DecodeStepFits(const DecodeStepArgs& a) {
  int blocks = 0;
  return CheckShapesAndFit(a, &blocks);
}

Status DecodeStepOneRow(const DecodeStepArgs& a, cudaStream_t stream) {
  int blocks = 0;
  GROVE_RETURN_IF_ERROR(CheckShapesAndFit(a, &blocks));
  if (!a.layers) return Invalid("null layer table");
  if (!a.token || !a.row.slot || !a.row.pos || a.row.rows != 1) return Invalid("one row (token, slot, pos) expected");
  if (!a.embed || !a.rope_cos || !a.rope_sin || !a.final_norm || !Aligned16(a.x) || !Aligned16(a.logits) ||
      !a.lm_head.data)
    return Invalid("null pointer, or x / logits not 16-byte aligned");
  if (a.lm_head.n != a.vocab || a.lm_head.k != a.hidden) return Invalid("lm_head must be [vocab, hidden]");
  if (!a.workspace || reinterpret_cast<uintptr_t>(a.workspace) % 256 != 0)
    return Invalid("workspace null or not 256-byte aligned");
  if (a.workspace_bytes < DecodeStepWorkspaceBytes(a))
    return Invalid("workspace of " + std::to_string(a.workspace_bytes) + " bytes, needs " +
                   std::to_string(DecodeStepWorkspaceBytes(a)));
  const size_t smem = SmemPlan(a).total;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;  // every block resident: the grid barrier needs it
  attribute[0].val.cooperative = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  cudaError_t err = cudaLaunchKernelEx(&config, DecodeStepKernel, a);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string("DecodeStepOneRow launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace grove::kernels
