#include "kernels/quant_linear.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/launch.cuh"
#include "kernels/moe_index_block.cuh"
#include "kernels/paged_kv_device.cuh"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/ptx/prefetch.cuh"
#include "kernels/quant_gemv.cuh"
#include "kernels/rmsnorm_row.cuh"
#include "kernels/router_topk.cuh"
#include "kernels/quant_mma.cuh"
#include "kernels/quant_linear_internal.h"

namespace grove::kernels {
namespace {

using gemv::kRows;
using gemv::kThreads;

// Activation tiles larger than this take fewer tokens per pass (k > 5120 at
// 16 tokens); below the 227 KB limit so the attribute call always succeeds.
constexpr int64_t kMaxSmemBytes = 160 * 1024;

bool Aligned(const void* p, size_t a) { return p && reinterpret_cast<uintptr_t>(p) % a == 0; }

Status Launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

// ---- Quantization: the CPU quantizers' fp32 operations, in the same order ----

// rollout/precision_format.cc's RoundToBf16: round to nearest even, NaN kept quiet.
__device__ __forceinline__ uint16_t RoundToBf16Bits(float x) {
  uint32_t u = __float_as_uint(x);
  if (x != x) return static_cast<uint16_t>(((u | 0x00400000u) & 0xFFFF0000u) >> 16);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__global__ void QuantizeBf16Kernel(const float* __restrict__ w, uint16_t* __restrict__ out, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = RoundToBf16Bits(w[i]);
}

// One block per row (rollout/int8_quantizer.cc's QuantizeInt8PerRow).
__global__ void QuantizeInt8Kernel(const float* __restrict__ w, int64_t k, int8_t* __restrict__ q,
                                   float* __restrict__ scales) {
  __shared__ float warp_max[kThreads / 32];
  const float* row = w + blockIdx.x * k;
  float amax = 0.f;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) amax = fmaxf(amax, fabsf(row[c]));
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = 0.f;
  for (int i = 0; i < kThreads / 32; ++i) amax = fmaxf(amax, warp_max[i]);  // max is exact in any order
  const float scale = amax / 127.0f;
  const float inv = scale > 0 ? 1.0f / scale : 0.0f;
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
  int8_t* out = q + blockIdx.x * k;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) {
    const float v = rintf(row[c] * inv);
    out[c] = static_cast<int8_t>(fminf(fmaxf(v, -127.0f), 127.0f));
  }
}

// One warp per (row, group of 128) (rollout/int4_quantizer.cc's QuantizeInt4Grouped).
__global__ void QuantizeInt4Kernel(const float* __restrict__ w, int64_t n, int64_t k, uint32_t* __restrict__ packed,
                                   float* __restrict__ scales) {
  const int64_t groups = k / 128;
  const int64_t task = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32;
  if (task >= n * groups) return;
  const int lane = threadIdx.x % 32;
  const int64_t r = task / groups, g = task % groups;
  const float* src = w + r * k + g * 128;
  const float4 v4 = reinterpret_cast<const float4*>(src)[lane];
  float amax = fmaxf(fmaxf(fabsf(v4.x), fabsf(v4.y)), fmaxf(fabsf(v4.z), fabsf(v4.w)));
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = amax / 7.0f;
  if (lane == 0) scales[task] = scale;
  if (lane < 16) {
    uint32_t word = 0;
    for (int j = 0; j < 8; ++j) {
      const float q = scale > 0 ? fminf(fmaxf(rintf(src[8 * lane + j] / scale), -7.0f), 7.0f) : 0.0f;
      const uint32_t u = static_cast<uint32_t>(static_cast<int>(q) + 8);
      const int slot = (j % 2 == 0) ? j / 2 : 4 + j / 2;  // inverse of kInt4NibbleOrder
      word |= u << (4 * slot);
    }
    packed[r * (k / 8) + g * 16 + lane] = word;
  }
}

// ---- The GEMV: weight rows streamed once per pass of up to 16 tokens ----

// The prologue a kernel of the decode chain runs before griddepcontrol.wait
// (only when launched with the programmatic-dependent-launch attribute, so
// that it overlaps the kernel ahead): an L2 prefetch of the weight rows of
// this block's first pass (rows_per_pass contiguous rows from pass
// blockIdx.x), one 128-byte line per thread at a time. Only the first pass:
// that is what the overlap can hide, and it bounds the prefetch to at most
// grid x one pass (~4 MB at k = 1024) so a 64 MB lm_head cannot evict its
// own lines before they are read. Weights are written only by
// QuantizeWeight, long before, so reading their addresses early is safe.
__device__ __forceinline__ void PrefetchFirstPassRows(const QuantWeight& w, int rows_per_pass, int passes) {
  if (static_cast<int>(blockIdx.x) >= passes) return;
  const int64_t row_bytes = gemv::RowBytes(w.format, w.k), row_scales = gemv::RowScales(w.format, w.k);
  const int64_t r0 = int64_t{blockIdx.x} * rows_per_pass;
  const int64_t r1 = r0 + rows_per_pass < w.n ? r0 + rows_per_pass : w.n;
  const char* data = static_cast<const char*>(w.data) + r0 * row_bytes;
  for (int64_t off = int64_t{threadIdx.x} * 128; off < (r1 - r0) * row_bytes; off += int64_t{blockDim.x} * 128)
    ptx::prefetch_global_L2(data + off);
  if (row_scales > 0 && threadIdx.x == 0) ptx::prefetch_global_L2(w.scales + r0 * row_scales);
}

// The fused RMSNorm input of the m = 1 GEMV (QuantLinearRmsNormed).
struct NormedInput {
  const float* x = nullptr;
  const float* weight = nullptr;
  float eps = 0.f;
  __nv_bfloat16* normed = nullptr;
};

// Stages bf16(x * rstd * weight) of one fp32 row as StageX stages a bf16
// row (the same bits as rollout's RmsNormRows: BlockRowRstd, then the same
// fp32 products rounded to bf16); block 0 also writes the row to in.normed.
// part: kThreads / 32 floats of shared memory.
template <QuantFormat F>
__device__ __forceinline__ void StageXRmsNormed(uint4* x_s, int k, const NormedInput& in, float* part) {
  const float rstd = BlockRowRstd<kThreads>(in.x, k, in.eps, part);
  const bool write = blockIdx.x == 0 && in.normed != nullptr;
  gemv::StageXOctets<F, 1>(x_s, k, 1, [&](int, int col) {
    alignas(16) __nv_bfloat16 o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = __float2bfloat16(in.x[col + e] * rstd * in.weight[col + e]);
    const uint4 v = *reinterpret_cast<const uint4*>(o);
    if (write) *reinterpret_cast<uint4*>(in.normed + col) = v;
    return v;
  });
}

// Staging the split-KV combined attention rows (QuantLinearSplitKv) in
// place of x: MergeSoftmaxStates (the combine kernel's merge) in two phases
// so the block's threads work in parallel instead of each walking a head's
// chunks once per output value. Per (token, head) the factors and
// denominator take kSplitKvScalars(chunks) floats of shared memory.
__host__ __device__ inline int SplitKvScalars(int chunks) { return chunks + 2; }
int64_t SplitKvSharedBytes(const PagedSplitPartials& in, int tokens) {
  return int64_t{tokens} * in.heads * SplitKvScalars(in.chunks) * 4;
}

// Phase 1, one thread per (token i < count, head h) of rows row0 + i: the
// merge's scalars as MergeSoftmaxStates computes them -- mx = max m over the
// row's chunks 0..n-1 (n = 0 for an invalid row), then in chunk order each
// state's factor (-1: skipped, l == 0) with den summed -- into f_s at
// ((i * heads + h) * SplitKvScalars(chunks)): the factors, den, then n (as
// int bits). Ends with a barrier.
__device__ __forceinline__ void SplitKvMergeFactors(const PagedSplitPartials& in, const paged::SplitWorkspace& ws,
                                                    int row0, int count, float* f_s) {
  for (int t = threadIdx.x; t < count * in.heads; t += blockDim.x) {
    const int i = t / in.heads, h = t % in.heads, r = row0 + i;
    float* f = f_s + int64_t(t) * SplitKvScalars(in.chunks);
    const int slot = in.rows.slot[r], p = in.rows.pos[r];
    const int n = paged::RowValid(in.capacity, slot, p) ? min(p / kPagedSplitChunkTokens + 1, in.chunks) : 0;
    const int64_t first = (int64_t(r) * in.heads + h) * in.chunks;
    float mx = -INFINITY;
    for (int c = 0; c < n; ++c) mx = fmaxf(mx, ws.m[first + c]);
    float den = 0.f;
    for (int c = 0; c < n; ++c) {
      const float l = ws.l[first + c];
      if (l == 0.f) {
        f[c] = -1.f;
        continue;
      }
      f[c] = SoftmaxMergeFactor(ws.m[first + c], mx);
      SoftmaxMergeAdd(den, l, f[c]);
    }
    f[in.chunks] = den;
    f[in.chunks + 1] = __int_as_float(n);
  }
  __syncthreads();
}

// Phase 2: octet (8 columns from col) of token i (row r): each value's
// numerator summed over the chunks in order with phase 1's factors, then
// num / den rounded to bf16 (0 when den is 0) -- the combine's value.
__device__ __forceinline__ uint4 SplitKvOctet(const PagedSplitPartials& in, const paged::SplitWorkspace& ws,
                                              const float* f_s, int i, int r, int col) {
  const int h = col / in.head_dim, d = col % in.head_dim;  // head_dim is a multiple of 8: one head per octet
  const float* f = f_s + int64_t(i * in.heads + h) * SplitKvScalars(in.chunks);
  const float den = f[in.chunks];
  const int n = __float_as_int(f[in.chunks + 1]);
  const float* acc = ws.acc + (int64_t(r) * in.heads + h) * in.chunks * in.head_dim + d;
  float num[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int c = 0; c < n; ++c) {
    const float fc = f[c];
    if (fc < 0.f) continue;  // l == 0: MergeSoftmaxStates skips the state
    const float* a = acc + int64_t(c) * in.head_dim;
#pragma unroll
    for (int e = 0; e < 8; ++e) SoftmaxMergeAdd(num[e], a[e], fc);
  }
  alignas(16) __nv_bfloat16 o[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = __float2bfloat16(den > 0.f ? num[e] / den : 0.f);
  return *reinterpret_cast<const uint4*>(o);
}

__device__ __forceinline__ paged::SplitWorkspace SplitKvLayout(const PagedSplitPartials& in) {
  return paged::SplitLayout(const_cast<float*>(in.workspace), int64_t(in.rows.rows) * in.heads * in.chunks);
}

// After every block has written its part of y: true in the one block that
// finished last (threadfence, then a device counter; the counter is reset
// for the next launch before this returns). Its reads of y must go through
// L2 (ld.cg): other SMs wrote them. Called by every thread of every block.
__device__ __forceinline__ bool LastBlockToFinish(unsigned* counter) {
  __shared__ bool last;
  __threadfence();  // this block's y stores visible device-wide before it counts
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return false;
  __threadfence();
  if (threadIdx.x == 0) *counter = 0;  // every block has counted
  return true;
}

// The router tail of QuantLinearRmsNormed: the last block reads all n
// logits back into shared memory and routes the row with one warp.
__device__ __forceinline__ void RouteInLastBlock(const float* y, const RouterTail& route) {
  __shared__ float logits_s[kRouterMaxExperts];
  if (!LastBlockToFinish(route.counter)) return;
  for (int e = threadIdx.x; e < route.args.experts; e += blockDim.x) logits_s[e] = __ldcg(y + e);
  __syncthreads();
  if (threadIdx.x < 32) {
    RouterArgs a = route.args;
    a.logits = logits_s;
    RouterTopKWarp(a, 0);
  }
  if (route.index.expert_offsets == nullptr) return;
  __syncthreads();  // warp 0's ids stores visible to the block
  static_assert(kThreads == kMoeRouteIndexOneBlockSlots, "one thread per slot");
  const MoeSlotIndex& x = route.index;
  RouteIndexOneBlock(route.args.ids, x.slots, x.experts, x.expert_offsets, x.row_of_slot, x.slot_of_row, nullptr);
}

// The RoPE + KV-append tail of QuantLinearRmsNormed: the last block runs
// PagedKvAppend's row work (paged::AppendRow, reading q | k | v back from y
// through L2) for the step's one row.
__device__ __forceinline__ void AppendInLastBlock(const RopeAppendTail& tail) {
  if (!LastBlockToFinish(tail.counter)) return;
  const PagedAppendArgs& a = tail.append;
  paged::AppendRow(a.cache, a.heads, a.rows.slot[0], a.rows.pos[0], a.qkv, a.rope_cos, a.rope_sin, a.q_out,
                   threadIdx.x, blockDim.x);
}

// Where the m = 1 GEMV's input row comes from.
enum class GemvInput : int {
  kRows = 0,    // bf16 x (any M)
  kNormed = 1,  // RMSNorm of an fp32 row (QuantLinearRmsNormed)
  kSplitKv = 2  // the split-KV attention combine (QuantLinearSplitKv)
};

// Blocks loop over "passes" of R * groups rows (R weight rows per warp; n is
// a multiple of 8, so R in {1, 2, 4} never splits a warp's rows at the end);
// the activation tile is staged once per block. kIn (M = 1 only unless
// kRows): the tile is the RMSNorm of the fp32 row norm.x, or the split-KV
// combine of skv, instead of x. Tails (kNormed, the last block to finish):
// route, or append.
template <QuantFormat F, int M, int R, GemvInput kIn>
__global__ void __launch_bounds__(kThreads)
    QuantGemvKernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int count, QuantWeight w, float* y,
                    int64_t ldy, Accumulate mode, int passes, bool prefetch, NormedInput norm, RouterTail route,
                    PagedSplitPartials skv, RopeAppendTail append) {
  static_assert(kIn == GemvInput::kRows || M == 1, "the fused inputs stage one row");
  constexpr int kRows = R;
  extern __shared__ uint4 smem[];
  float* red_s = reinterpret_cast<float*>(smem);
  uint4* x_s = smem + gemv::ReduceBytes(R) / 16;
  const gemv::Split split = gemv::MakeSplit(F, w.k);
  const int rows_per_pass = kRows * split.groups;
  if (prefetch) PrefetchFirstPassRows(w, rows_per_pass, passes);
  ptx::griddepcontrol_wait();  // x (or norm.x) and y come from earlier kernels
  ptx::griddepcontrol_launch_dependents();
  if constexpr (kIn == GemvInput::kNormed) {
    StageXRmsNormed<F>(x_s, w.k, norm, red_s);  // red_s is free until WarpReduceToShared
  } else if constexpr (kIn == GemvInput::kSplitKv) {
    float* f_s = reinterpret_cast<float*>(x_s + gemv::XTileBytes(w.k, M) / 16);
    const paged::SplitWorkspace ws = SplitKvLayout(skv);
    SplitKvMergeFactors(skv, ws, 0, 1, f_s);
    gemv::StageXOctets<F, 1>(x_s, w.k, 1, [&](int, int col) { return SplitKvOctet(skv, ws, f_s, 0, 0, col); });
  } else {
    gemv::StageX<F, M>(x_s, w.k, count, [&](int i) { return x + i * ldx; });
  }

  const int warp = threadIdx.x / 32;
  const int g = warp / split.slices, slice = warp % split.slices;
  const int64_t row_bytes = gemv::RowBytes(F, w.k), row_scales = gemv::RowScales(F, w.k);
  const uint8_t* data = static_cast<const uint8_t*>(w.data);
  for (int pass = blockIdx.x; pass < passes; pass += gridDim.x) {
    const int64_t row0 = int64_t{pass} * rows_per_pass + g * kRows;
    float acc[kRows][M];
    if (row0 < w.n) {  // n is a multiple of 8 >= R: all R rows of the warp exist
      const uint8_t* rows[kRows];
      const float* scales[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        rows[r] = data + (row0 + r) * row_bytes;
        scales[r] = w.scales + (row0 + r) * row_scales;
      }
      gemv::WarpDot<F, M, R>(rows, scales, x_s, split, slice, acc);
    } else {
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int i = 0; i < M; ++i) acc[r][i] = 0.f;
    }
    gemv::WarpReduceToShared<M, R>(acc, red_s);
    __syncthreads();
    for (int t = threadIdx.x; t < rows_per_pass * M; t += blockDim.x) {
      const int i = t / rows_per_pass, rr = t % rows_per_pass;
      const int64_t row = int64_t{pass} * rows_per_pass + rr;
      if (i >= count || row >= w.n) continue;
      const float v = gemv::SliceSum<R>(red_s, split, rr / kRows, rr % kRows, i);
      float* out = y + i * ldy + row;
      *out = mode == Accumulate::kAdd ? *out + v : v;
    }
    __syncthreads();
  }
  if constexpr (kIn == GemvInput::kNormed) {
    if (route.counter != nullptr) RouteInLastBlock(y, route);
    if (append.counter != nullptr) AppendInLastBlock(append);
  }
}

int SmCount() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    return 132;
  return sms;
}

Status LaunchedEx(cudaError_t err, const char* what) {
  if (err != cudaSuccess) return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
  return Launched(what);
}

template <QuantFormat F, int M, int R, GemvInput kIn = GemvInput::kRows>
Status LaunchGemv(const __nv_bfloat16* x, int64_t ldx, int count, const QuantWeight& w, float* y, int64_t ldy,
                  Accumulate mode, cudaStream_t stream, const NormedInput& norm = {}, const RouterTail& route = {},
                  const PagedSplitPartials& skv = {}, const RopeAppendTail& append = {}) {
  const gemv::Split split = gemv::MakeSplit(F, w.k);
  const int rows_per_pass = R * split.groups;
  const int passes = static_cast<int>((w.n + rows_per_pass - 1) / rows_per_pass);
  const int blocks = std::min(passes, SmCount() * 4);
  const size_t smem = gemv::ReduceBytes(R) + gemv::XTileBytes(w.k, M) +
                      (kIn == GemvInput::kSplitKv ? SplitKvSharedBytes(skv, M) : 0);
  auto kernel = QuantGemvKernel<F, M, R, kIn>;
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
          cudaSuccess)
    return Launched("QuantLinear: shared memory attribute");
  const bool prefetch = ProgrammaticLaunchEnabled();
  return LaunchedEx(LaunchKernel(kernel, dim3(blocks), dim3(kThreads), smem, stream, x, ldx, count, w, y, ldy, mode,
                                 passes, prefetch, norm, route, skv, append),
                    "QuantLinear launch");
}

template <QuantFormat F, int R>
Status LaunchGemvTokensRows(const __nv_bfloat16* x, int64_t ldx, int count, const QuantWeight& w, float* y,
                            int64_t ldy, Accumulate mode, cudaStream_t stream) {
  if (count <= 1) return LaunchGemv<F, 1, R>(x, ldx, count, w, y, ldy, mode, stream);
  if (count <= 2) return LaunchGemv<F, 2, R>(x, ldx, count, w, y, ldy, mode, stream);
  if (count <= 4) return LaunchGemv<F, 4, R>(x, ldx, count, w, y, ldy, mode, stream);
  if (count <= 8) return LaunchGemv<F, 8, R>(x, ldx, count, w, y, ldy, mode, stream);
  return LaunchGemv<F, 16, R>(x, ldx, count, w, y, ldy, mode, stream);
}
// QuantLinear's CUDA-core rows per warp (kCudaCore; kAuto at m = 1). Change
// here to switch the default after measuring (quant_linear_bench
// --gemv_variants); not gemv::kRows, which the MoE's up kernel needs at 2
// (its W1/W3 row pair).
constexpr int kDefaultGemvRows = kRows;

// rows_per_warp: 1, 2 or 4.
template <QuantFormat F>
Status LaunchGemvTokens(const __nv_bfloat16* x, int64_t ldx, int count, const QuantWeight& w, float* y,
                        int64_t ldy, Accumulate mode, int rows_per_warp, cudaStream_t stream) {
  if (rows_per_warp == 1) return LaunchGemvTokensRows<F, 1>(x, ldx, count, w, y, ldy, mode, stream);
  if (rows_per_warp == 4) return LaunchGemvTokensRows<F, 4>(x, ldx, count, w, y, ldy, mode, stream);
  return LaunchGemvTokensRows<F, 2>(x, ldx, count, w, y, ldy, mode, stream);
}

template <int NT>
constexpr int kMmaReduceFloats = gemv::kWarps * NT * 4 * 32;

// Shared bytes of the tensor-core kernel for 8 * nt tokens.
int64_t MmaSmemBytes(int64_t k, int nt) { return int64_t{gemv::kWarps} * nt * 4 * 32 * 4 + mma::XBytes(k, nt); }

// The tensor-core path (kernels/quant_mma.cuh): 8 warps per block, a warp
// group of `slices` warps per 16-row tile, passes over tiles as the CUDA-core
// kernel does; partial tiles reduced across slices in order through shared
// memory ([warp][NT][4][32] floats, then x).
// kSplitKv: token i's row is the split-KV combine of row skv_row0 + i of
// skv (QuantLinearSplitKv) instead of x's row i.
template <QuantFormat F, int NT, bool kSplitKv>
__global__ void __launch_bounds__(kThreads)
    QuantMmaKernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int count, QuantWeight w, float* y,
                   int64_t ldy, Accumulate mode, int passes, bool prefetch, PagedSplitPartials skv, int skv_row0) {
  extern __shared__ uint4 smem[];
  float* red_s = reinterpret_cast<float*>(smem);
  uint4* x_s = smem + kMmaReduceFloats<NT> / 4;
  const mma::Split split = mma::MakeSplit(F, w.k);
  if (prefetch) PrefetchFirstPassRows(w, mma::kTileRows * split.groups, passes);
  ptx::griddepcontrol_wait();  // x and y come from earlier kernels
  ptx::griddepcontrol_launch_dependents();
  if constexpr (kSplitKv) {
    float* f_s = reinterpret_cast<float*>(x_s + mma::XBytes(w.k, NT) / 16);
    const paged::SplitWorkspace ws = SplitKvLayout(skv);
    SplitKvMergeFactors(skv, ws, skv_row0, count, f_s);
    mma::StageXOctets<F, NT>(x_s, w.k, count,
                             [&](int i, int col) { return SplitKvOctet(skv, ws, f_s, i, skv_row0 + i, col); });
  } else {
    mma::StageX<F, NT>(x_s, w.k, count, [&](int i) { return x + i * ldx; });
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / split.slices, slice = warp % split.slices;
  const int rows_per_pass = mma::kTileRows * split.groups;
  for (int pass = blockIdx.x; pass < passes; pass += gridDim.x) {
    const int64_t r0 = int64_t{pass} * rows_per_pass + wg * mma::kTileRows;
    float acc[NT][4];
    if (r0 < w.n) {
      mma::WarpTile<F, NT>(static_cast<const uint8_t*>(w.data), w.scales, w.n, r0, w.k, x_s, slice, split.slices,
                           acc);
    } else {
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[t][r] = 0.f;
    }
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int r = 0; r < 4; ++r) red_s[((warp * NT + t) * 4 + r) * 32 + lane] = acc[t][r];
    __syncthreads();
    for (int idx = threadIdx.x; idx < split.groups * NT * 4 * 32; idx += blockDim.x) {
      const int l = idx % 32, r = (idx / 32) % 4, t = (idx / 128) % NT, gg = idx / (128 * NT);
      const int64_t row = int64_t{pass} * rows_per_pass + gg * mma::kTileRows + mma::TileRow(l, r);
      const int token = mma::TileToken(l, t, r);
      if (row >= w.n || token >= count) continue;
      float v = 0.f;
      for (int j = 0; j < split.slices; ++j) v += red_s[(((gg * split.slices + j) * NT + t) * 4 + r) * 32 + l];
      float* out = y + token * ldy + row;
      *out = mode == Accumulate::kAdd ? *out + v : v;
    }
    __syncthreads();
  }
}

template <QuantFormat F, int NT, bool kSplitKv = false>
Status LaunchMma(const __nv_bfloat16* x, int64_t ldx, int count, const QuantWeight& w, float* y, int64_t ldy,
                 Accumulate mode, cudaStream_t stream, const PagedSplitPartials& skv = {}, int skv_row0 = 0) {
  const mma::Split split = mma::MakeSplit(F, w.k);
  const int rows_per_pass = mma::kTileRows * split.groups;
  const int passes = static_cast<int>((w.n + rows_per_pass - 1) / rows_per_pass);
  const int blocks = std::min(passes, SmCount() * 4);
  const size_t smem = MmaSmemBytes(w.k, NT) + (kSplitKv ? SplitKvSharedBytes(skv, 8 * NT) : 0);
  auto kernel = QuantMmaKernel<F, NT, kSplitKv>;
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
          cudaSuccess)
    return Launched("QuantLinear: shared memory attribute");
  return LaunchedEx(LaunchKernel(kernel, dim3(blocks), dim3(kThreads), smem, stream, x, ldx, count, w, y, ldy, mode,
                                 passes, ProgrammaticLaunchEnabled(), skv, skv_row0),
                    "QuantLinear tensor-core launch");
}

template <QuantFormat F, bool kSplitKv = false>
Status LaunchMmaTokens(const __nv_bfloat16* x, int64_t ldx, int count, const QuantWeight& w, float* y, int64_t ldy,
                       Accumulate mode, cudaStream_t stream, const PagedSplitPartials& skv = {}, int skv_row0 = 0) {
  if (count <= 8) return LaunchMma<F, 1, kSplitKv>(x, ldx, count, w, y, ldy, mode, stream, skv, skv_row0);
  return LaunchMma<F, 2, kSplitKv>(x, ldx, count, w, y, ldy, mode, stream, skv, skv_row0);
}

Status CheckShape(const char* what, QuantFormat f, int64_t n, int64_t k) {
  if (f != QuantFormat::kBF16 && f != QuantFormat::kInt8 && f != QuantFormat::kInt4)
    return Status::InvalidArgument(std::string(what) + ": unknown format " + std::to_string(static_cast<int>(f)));
  if (n <= 0 || k <= 0 || n % 8 != 0 || k % 128 != 0 || n > (int64_t{1} << 30) || k > (int64_t{1} << 30))
    return Status::InvalidArgument(std::string(what) + ": shape [" + std::to_string(n) + ", " + std::to_string(k) +
                                   "] must be positive with n a multiple of 8 and k a multiple of 128");
  return Status::OK();
}

}  // namespace

size_t QuantDataBytes(QuantFormat f, int64_t n, int64_t k) {
  if (n <= 0 || k <= 0) return 0;
  return static_cast<size_t>(n) * static_cast<size_t>(gemv::RowBytes(f, k));
}

int64_t QuantScaleCount(QuantFormat f, int64_t n, int64_t k) {
  if (n <= 0 || k <= 0) return 0;
  return n * gemv::RowScales(f, k);
}

Status QuantizeWeight(const float* w, int64_t n, int64_t k, QuantFormat f, void* data, float* scales,
                      cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape("QuantizeWeight", f, n, k));
  if (!Aligned(w, 16) || !Aligned(data, 16))
    return Status::InvalidArgument("QuantizeWeight: w and data must be non-null and 16-byte aligned");
  if (f != QuantFormat::kBF16 && !Aligned(scales, 4))
    return Status::InvalidArgument("QuantizeWeight: int8/int4 need a non-null, aligned scales array");
  switch (f) {
    case QuantFormat::kBF16: {
      const int64_t count = n * k;
      const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 132 * 32));
      QuantizeBf16Kernel<<<blocks, 256, 0, stream>>>(w, static_cast<uint16_t*>(data), count);
      return Launched("QuantizeWeight bf16");
    }
    case QuantFormat::kInt8:
      QuantizeInt8Kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(w, k, static_cast<int8_t*>(data),
                                                                            scales);
      return Launched("QuantizeWeight int8");
    case QuantFormat::kInt4: {
      const int64_t tasks = n * (k / 128);
      const int per_block = 8;  // warps
      QuantizeInt4Kernel<<<static_cast<unsigned>((tasks + per_block - 1) / per_block), 32 * per_block, 0, stream>>>(
          w, n, k, static_cast<uint32_t*>(data), scales);
      return Launched("QuantizeWeight int4");
    }
  }
  return Status::InvalidArgument("QuantizeWeight: unknown format");
}

size_t QuantLinearWorkspaceBytes(QuantFormat, int64_t, int64_t, int64_t) { return 0; }

namespace detail {

Status QuantLinearOnPath(QuantLinearPath path, const __nv_bfloat16* x, int64_t ldx, int64_t m, const QuantWeight& w,
                         float* y, int64_t ldy, Accumulate mode, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape("QuantLinear", w.format, w.n, w.k));
  if (m < 1) return Status::InvalidArgument("QuantLinear: m must be >= 1, got " + std::to_string(m));
  if (ldx < w.k || ldx % 8 != 0)
    return Status::InvalidArgument("QuantLinear: ldx " + std::to_string(ldx) + " must be >= k (" +
                                   std::to_string(w.k) + ") and a multiple of 8");
  if (ldy < w.n) return Status::InvalidArgument("QuantLinear: ldy " + std::to_string(ldy) + " < n");
  if (!Aligned(x, 16) || !Aligned(w.data, 16) || !Aligned(y, 4))
    return Status::InvalidArgument("QuantLinear: x and w.data must be 16-byte aligned, y 4-byte aligned (non-null)");
  if (w.format != QuantFormat::kBF16 && !Aligned(w.scales, 4))
    return Status::InvalidArgument("QuantLinear: int8/int4 weight without scales");
  if (path == QuantLinearPath::kAuto)  // tensor cores need x for 8 tokens in shared memory (k <= ~9900)
    path = m == 1 || MmaSmemBytes(w.k, 1) > kMaxSmemBytes ? QuantLinearPath::kCudaCore
                                                            : QuantLinearPath::kTensorCore;
  // Tokens per pass: 16, or fewer when k is so long that 16 rows of x would
  // not fit in shared memory. Each pass streams W once; any m works.
  const bool tensor = path == QuantLinearPath::kTensorCore;
  const int rows_per_warp = path == QuantLinearPath::kCudaCoreRows1   ? 1
                            : path == QuantLinearPath::kCudaCoreRows4 ? 4
                                                                      : kDefaultGemvRows;
  auto smem = [&](int tokens) {
    return tensor ? MmaSmemBytes(w.k, (tokens + 7) / 8)
                  : gemv::ReduceBytes(rows_per_warp) + gemv::XTileBytes(w.k, tokens);
  };
  int per_pass = gemv::kMaxTokens;
  while (per_pass > (tensor ? 8 : 1) && smem(per_pass) > kMaxSmemBytes) per_pass /= 2;
  if (smem(per_pass) > kMaxSmemBytes)
    return Status::InvalidArgument("QuantLinear: k " + std::to_string(w.k) +
                                   " too long for the activation rows in shared memory");
  for (int64_t m0 = 0; m0 < m; m0 += per_pass) {
    const int count = static_cast<int>(std::min<int64_t>(per_pass, m - m0));
    const __nv_bfloat16* xs = x + m0 * ldx;
    float* ys = y + m0 * ldy;
    switch (w.format) {
      case QuantFormat::kBF16:
        GROVE_RETURN_IF_ERROR(tensor ? LaunchMmaTokens<QuantFormat::kBF16>(xs, ldx, count, w, ys, ldy, mode, stream)
                                     : LaunchGemvTokens<QuantFormat::kBF16>(xs, ldx, count, w, ys, ldy, mode, rows_per_warp,
                                                                           stream));
        break;
      case QuantFormat::kInt8:
        GROVE_RETURN_IF_ERROR(tensor ? LaunchMmaTokens<QuantFormat::kInt8>(xs, ldx, count, w, ys, ldy, mode, stream)
                                     : LaunchGemvTokens<QuantFormat::kInt8>(xs, ldx, count, w, ys, ldy, mode, rows_per_warp,
                                                                           stream));
        break;
      case QuantFormat::kInt4:
        GROVE_RETURN_IF_ERROR(tensor ? LaunchMmaTokens<QuantFormat::kInt4>(xs, ldx, count, w, ys, ldy, mode, stream)
                                     : LaunchGemvTokens<QuantFormat::kInt4>(xs, ldx, count, w, ys, ldy, mode, rows_per_warp,
                                                                           stream));
        break;
    }
  }
  return Status::OK();
}

}  // namespace detail

namespace {

// The m = 1 GEMV with a fused input (kNormed, kSplitKv) in w's format.
template <GemvInput kIn>
Status LaunchFusedRow(const QuantWeight& w, float* y, Accumulate mode, cudaStream_t stream, const NormedInput& norm,
                      const RouterTail& route, const PagedSplitPartials& skv, const RopeAppendTail& append) {
  switch (w.format) {
    case QuantFormat::kBF16:
      return LaunchGemv<QuantFormat::kBF16, 1, kDefaultGemvRows, kIn>(nullptr, w.k, 1, w, y, w.n, mode, stream, norm,
                                                                      route, skv, append);
    case QuantFormat::kInt8:
      return LaunchGemv<QuantFormat::kInt8, 1, kDefaultGemvRows, kIn>(nullptr, w.k, 1, w, y, w.n, mode, stream, norm,
                                                                      route, skv, append);
    case QuantFormat::kInt4:
      return LaunchGemv<QuantFormat::kInt4, 1, kDefaultGemvRows, kIn>(nullptr, w.k, 1, w, y, w.n, mode, stream, norm,
                                                                      route, skv, append);
  }
  return Status::InvalidArgument("QuantLinear: unknown format");
}

// The checks QuantLinearRmsNormed and QuantLinearSplitKv share: w's shape
// and pointers, y, and room for the one-row tile.
Status CheckFusedRow(const char* what, const QuantWeight& w, const float* y) {
  GROVE_RETURN_IF_ERROR(CheckShape(what, w.format, w.n, w.k));
  if (!Aligned(w.data, 16) || !Aligned(y, 4))
    return Status::InvalidArgument(std::string(what) + ": w.data must be 16-byte aligned and y 4-byte aligned");
  if (w.format != QuantFormat::kBF16 && !Aligned(w.scales, 4))
    return Status::InvalidArgument(std::string(what) + ": int8/int4 weight without scales");
  if (static_cast<int64_t>(gemv::ReduceBytes(kDefaultGemvRows) + gemv::XTileBytes(w.k, 1)) > kMaxSmemBytes)
    return Status::InvalidArgument(std::string(what) + ": k " + std::to_string(w.k) +
                                   " too long for the activation row in shared memory");
  return Status::OK();
}

}  // namespace

Status QuantLinearRmsNormed(const RmsNormedRow& in, const QuantWeight& w, float* y, Accumulate mode,
                            cudaStream_t stream, const RouterTail* route, const RopeAppendTail* append) {
  GROVE_RETURN_IF_ERROR(CheckFusedRow("QuantLinearRmsNormed", w, y));
  if (!Aligned(in.x, 4) || !Aligned(in.weight, 4))
    return Status::InvalidArgument("QuantLinearRmsNormed: x and weight must be non-null and 4-byte aligned");
  if (in.normed != nullptr && !Aligned(in.normed, 16))
    return Status::InvalidArgument("QuantLinearRmsNormed: normed must be 16-byte aligned");
  if (!(in.eps >= 0.f))
    return Status::InvalidArgument("QuantLinearRmsNormed: eps must be >= 0");
  if (route != nullptr && append != nullptr)
    return Status::InvalidArgument("QuantLinearRmsNormed: a route or an append tail, not both");
  RouterTail tail;
  if (route != nullptr) {
    GROVE_RETURN_IF_ERROR(CheckRouterArgs(route->args));
    if (route->args.logits != y || route->args.tokens != 1 || route->args.experts != w.n || !route->counter)
      return Status::InvalidArgument("QuantLinearRmsNormed: the route needs logits == y, tokens 1, experts == n (" +
                                     std::to_string(w.n) + ") and a counter");
    const MoeSlotIndex& x = route->index;
    if (x.expert_offsets != nullptr &&
        (!x.row_of_slot || !x.slot_of_row || x.slots != (route->args.out_stride != 0 ? route->args.out_stride : route->args.top_k) ||
         x.slots > kMoeRouteIndexOneBlockSlots || x.experts < route->args.experts || x.experts > kMoeMaxExperts))
      return Status::InvalidArgument("QuantLinearRmsNormed: the route's index needs its three arrays, slots == "
                                     "out_stride (<= 256) and experts in [router experts, 256]");
    tail = *route;
  }
  RopeAppendTail app;
  if (append != nullptr) {
    const PagedAppendArgs& a = append->append;
    GROVE_RETURN_IF_ERROR(CheckPagedKvAppend(a));
    if (a.qkv != y || a.rows.rows != 1 || a.ld < w.n || !append->counter ||
        w.n < int64_t(a.heads + 2 * a.cache.kv_heads) * a.cache.head_dim)
      return Status::InvalidArgument("QuantLinearRmsNormed: the append needs qkv == y, one row, n >= its q, k, v "
                                     "columns and a counter");
    app = *append;
  }
  const NormedInput norm{in.x, in.weight, in.eps, in.normed};
  return LaunchFusedRow<GemvInput::kNormed>(w, y, mode, stream, norm, tail, {}, app);
}

Status QuantLinearSplitKv(const PagedSplitPartials& in, const QuantWeight& w, float* y, int64_t ldy,
                          Accumulate mode, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckFusedRow("QuantLinearSplitKv", w, y));
  const int m = in.rows.rows;
  if (m < 1 || !in.rows.slot || !in.rows.pos || !Aligned(in.workspace, 4))
    return Status::InvalidArgument("QuantLinearSplitKv: needs rows >= 1 (slot, pos) and the partials' workspace");
  if (in.head_dim % 8 != 0 || in.head_dim <= 0 || in.heads <= 0 || in.chunks <= 0 ||
      int64_t(in.heads) * in.head_dim != w.k)
    return Status::InvalidArgument("QuantLinearSplitKv: k (" + std::to_string(w.k) +
                                   ") must be heads * head_dim with head_dim a multiple of 8");
  if (ldy < w.n) return Status::InvalidArgument("QuantLinearSplitKv: ldy " + std::to_string(ldy) + " < n");
  if (m == 1) {
    if (gemv::ReduceBytes(kDefaultGemvRows) + gemv::XTileBytes(w.k, 1) + SplitKvSharedBytes(in, 1) > kMaxSmemBytes)
      return Status::InvalidArgument("QuantLinearSplitKv: too many chunks for the merge's shared memory");
    return LaunchFusedRow<GemvInput::kSplitKv>(w, y, mode, stream, {}, {}, in, {});
  }
  // m >= 2: QuantLinear's tensor-core kernel (its kAuto choice at this m),
  // in passes of 16 tokens, or 8 when the merge's shared memory needs it (a
  // token's row has the same bits in either: quant_linear.h).
  int per_pass = gemv::kMaxTokens;
  while (per_pass > 8 && MmaSmemBytes(w.k, per_pass / 8) + SplitKvSharedBytes(in, per_pass) > kMaxSmemBytes)
    per_pass /= 2;
  if (MmaSmemBytes(w.k, per_pass / 8) + SplitKvSharedBytes(in, per_pass) > kMaxSmemBytes)
    return Status::InvalidArgument("QuantLinearSplitKv: k " + std::to_string(w.k) + " and " +
                                   std::to_string(in.chunks) + " chunks too large for the tensor-core path");
  for (int m0 = 0; m0 < m; m0 += per_pass) {
    const int count = std::min(per_pass, m - m0);
    float* ys = y + int64_t(m0) * ldy;
    switch (w.format) {
      case QuantFormat::kBF16:
        GROVE_RETURN_IF_ERROR(
            (LaunchMmaTokens<QuantFormat::kBF16, true>(nullptr, w.k, count, w, ys, ldy, mode, stream, in, m0)));
        break;
      case QuantFormat::kInt8:
        GROVE_RETURN_IF_ERROR(
            (LaunchMmaTokens<QuantFormat::kInt8, true>(nullptr, w.k, count, w, ys, ldy, mode, stream, in, m0)));
        break;
      case QuantFormat::kInt4:
        GROVE_RETURN_IF_ERROR(
            (LaunchMmaTokens<QuantFormat::kInt4, true>(nullptr, w.k, count, w, ys, ldy, mode, stream, in, m0)));
        break;
    }
  }
  return Status::OK();
}

Status QuantLinear(const __nv_bfloat16* x, int64_t ldx, int64_t m, const QuantWeight& w, float* y, int64_t ldy,
                   Accumulate mode, void* /*workspace*/, size_t /*workspace_bytes*/, cudaStream_t stream) {
  return detail::QuantLinearOnPath(detail::QuantLinearPath::kAuto, x, ldx, m, w, y, ldy, mode, stream);
}

}  // namespace grove::kernels
