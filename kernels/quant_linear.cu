#include "kernels/quant_linear.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/launch.cuh"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/ptx/prefetch.cuh"
#include "kernels/quant_gemv.cuh"
#include "kernels/rmsnorm_row.cuh"
#include "kernels/router_topk.cuh"
#include "kernels/quant_mma.cuh"
#include "kernels/quant_unpack.h"
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

// ---- Dequantization to bf16 (DequantizeToBf16): one thread per 8 columns ----
__global__ void DequantizeToBf16Kernel(QuantWeight w, __nv_bfloat16* __restrict__ out) {
  const int64_t octets = int64_t{w.n} * (w.k / 8);
  const int64_t o = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (o >= octets) return;
  const int64_t r = o / (w.k / 8), c0 = (o % (w.k / 8)) * 8;
  // The columns' q in column order by quant_unpack.h's decoders, times the
  // scale in fp32 (the CPU dequantizer's product).
  float v[8];
  float s;
  if (w.format == QuantFormat::kInt8) {
    const uint2 words = reinterpret_cast<const uint2*>(w.data)[(r * w.k + c0) / 8];
    float lo[4], hi[4];
    Int8WordToFloats(words.x, lo);
    Int8WordToFloats(words.y, hi);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = lo[j], v[4 + j] = hi[j];
    s = w.scales[r];
  } else {  // kInt4: word c0 / 8 of the row holds columns c0..c0+7
    Int4WordToFloats(static_cast<const uint32_t*>(w.data)[r * (w.k / 8) + c0 / 8], v);
    s = w.scales[r * (w.k / 128) + c0 / 128];
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] *= s;
  uint4 packed;
  uint32_t* p = &packed.x;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
    std::memcpy(&p[j], &h, 4);
  }
  *reinterpret_cast<uint4*>(out + r * w.k + c0) = packed;
}

// ---- The GEMV: weight rows streamed once per pass of up to 16 tokens ----

// The prologue a kernel of the decode chain runs before griddepcontrol.wait
// (only when launched with the programmatic-dependent-launch attribute, so
// that it overlaps the kernel ahead): an L2 prefetch of the weight rows of
// this block's first pass (rows_per_pass contiguous rows from pass
// row_block), one 128-byte line per thread at a time. Only the first pass:
// that is what the overlap can hide, and it bounds the prefetch to at most
// grid x one pass (~4 MB at k = 1024) so a 64 MB lm_head cannot evict its
// own lines before they are read. Weights are written only by
// QuantizeWeight, long before, so reading their addresses early is safe.
__device__ __forceinline__ void PrefetchFirstPassRows(const QuantWeight& w, int rows_per_pass, int passes,
                                                      int row_block) {
  if (row_block >= passes) return;
  const int64_t row_bytes = gemv::RowBytes(w.format, w.k), row_scales = gemv::RowScales(w.format, w.k);
  const int64_t r0 = int64_t{row_block} * rows_per_pass;
  const int64_t r1 = r0 + rows_per_pass < w.n ? r0 + rows_per_pass : w.n;
  const char* data = static_cast<const char*>(w.data) + r0 * row_bytes;
  for (int64_t off = int64_t{threadIdx.x} * 128; off < (r1 - r0) * row_bytes; off += int64_t{blockDim.x} * 128)
    ptx::prefetch_global_L2(data + off);
  if (row_scales > 0 && threadIdx.x == 0) ptx::prefetch_global_L2(w.scales + r0 * row_scales);
}

// The m rows of x as chunks of up to per_chunk tokens, all in one launch:
// block b works on chunk b % chunks, over the row passes b / chunks,
// b / chunks + gridDim.x / chunks, ... So the blocks of one pass's chunks
// are neighbours in launch order and the chunks after the first read the
// pass's weight rows from L2. Each chunk computes exactly what a launch of
// its rows alone would (a token's sums do not depend on the others).
struct TokenChunks {
  int64_t m = 1;
  int per_chunk = 1;
  int chunks = 1;
};

struct ChunkOfBlock {
  int64_t t0;     // first token of the chunk
  int count;      // tokens in it
  int row_block;  // first pass of this block
  int row_blocks; // stride over passes
};

__device__ __forceinline__ ChunkOfBlock ThisBlocksChunk(const TokenChunks& tc) {
  const int chunk = static_cast<int>(blockIdx.x) % tc.chunks;
  ChunkOfBlock c;
  c.t0 = int64_t{chunk} * tc.per_chunk;
  c.count = static_cast<int>(tc.m - c.t0 < tc.per_chunk ? tc.m - c.t0 : tc.per_chunk);
  c.row_block = static_cast<int>(blockIdx.x) / tc.chunks;
  c.row_blocks = static_cast<int>(gridDim.x) / tc.chunks;
  return c;
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
    const uint4 v = RmsNormedOctet(in.x, in.weight, rstd, col);
    if (write) *reinterpret_cast<uint4*>(in.normed + col) = v;
    return v;
  });
}

// The router tail of QuantLinearRmsNormed, after every block has written
// its logits: the last block to finish (threadfence, then a counter) reads
// all n logits back through L2 (ld.cg: other SMs wrote them) into shared
// memory and routes the row with one warp, then resets the counter.
__device__ __forceinline__ void RouteInLastBlock(const float* y, const RouterTail& route) {
  __shared__ float logits_s[kRouterMaxExperts];
  __shared__ bool last;
  __threadfence();  // this block's y stores visible device-wide before it counts
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(route.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = threadIdx.x; e < route.args.experts; e += blockDim.x) logits_s[e] = __ldcg(y + e);
  __syncthreads();
  if (threadIdx.x < 32) {
    RouterArgs a = route.args;
    a.logits = logits_s;
    RouterTopKWarp(a, 0);
  }
  if (threadIdx.x == 0) *route.counter = 0;
}

// Blocks loop over "passes" of R * groups rows (R weight rows per warp; n is
// a multiple of 8, so R in {1, 2, 4} never splits a warp's rows at the end);
// the activation tile is staged once per block. kNormed (M = 1 only): the
// tile is the RMSNorm of the fp32 row norm.x instead of x.
template <QuantFormat F, int M, int R, bool kNormed>
__global__ void __launch_bounds__(kThreads)
    QuantGemvKernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, TokenChunks tc, QuantWeight w, float* y,
                    int64_t ldy, Accumulate mode, int passes, bool prefetch, NormedInput norm, RouterTail route) {
  static_assert(!kNormed || M == 1, "the fused RMSNorm stages one row");
  constexpr int kRows = R;
  extern __shared__ uint4 smem[];
  float* red_s = reinterpret_cast<float*>(smem);
  uint4* x_s = smem + gemv::ReduceBytes(R) / 16;
  const gemv::Split split = gemv::MakeSplit(F, w.k);
  const int rows_per_pass = kRows * split.groups;
  const ChunkOfBlock chunk = ThisBlocksChunk(tc);
  const int count = chunk.count;
  x += chunk.t0 * ldx;
  y += chunk.t0 * ldy;
  if (prefetch && chunk.t0 == 0) PrefetchFirstPassRows(w, rows_per_pass, passes, chunk.row_block);
  ptx::griddepcontrol_wait();  // x (or norm.x) and y come from earlier kernels
  ptx::griddepcontrol_launch_dependents();
  if constexpr (kNormed) {
    StageXRmsNormed<F>(x_s, w.k, norm, red_s);  // red_s is free until WarpReduceToShared
  } else {
    gemv::StageX<F, M>(x_s, w.k, count, [&](int i) { return x + i * ldx; });
  }

  const int warp = threadIdx.x / 32;
  const int g = warp / split.slices, slice = warp % split.slices;
  const int64_t row_bytes = gemv::RowBytes(F, w.k), row_scales = gemv::RowScales(F, w.k);
  const uint8_t* data = static_cast<const uint8_t*>(w.data);
  for (int pass = chunk.row_block; pass < passes; pass += chunk.row_blocks) {
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
  if constexpr (kNormed) {
    if (route.counter != nullptr) RouteInLastBlock(y, route);
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

// Blocks of one launch: up to 4 an SM in all (one wave), at least one per
// chunk; each chunk gets the same row blocks.
int ChunkedBlocks(int passes, int chunks) {
  const int row_blocks = std::max(1, std::min(passes, SmCount() * 4 / chunks));
  return row_blocks * chunks;
}

template <QuantFormat F, int M, int R, bool kNormed = false>
Status LaunchGemv(const __nv_bfloat16* x, int64_t ldx, const TokenChunks& tc, const QuantWeight& w, float* y,
                  int64_t ldy, Accumulate mode, cudaStream_t stream, const NormedInput& norm = {},
                  const RouterTail& route = {}) {
  const gemv::Split split = gemv::MakeSplit(F, w.k);
  const int rows_per_pass = R * split.groups;
  const int passes = static_cast<int>((w.n + rows_per_pass - 1) / rows_per_pass);
  const int blocks = ChunkedBlocks(passes, tc.chunks);
  const size_t smem = gemv::ReduceBytes(R) + gemv::XTileBytes(w.k, M);
  auto kernel = QuantGemvKernel<F, M, R, kNormed>;
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
          cudaSuccess)
    return Launched("QuantLinear: shared memory attribute");
  const bool prefetch = ProgrammaticLaunchEnabled();
  return LaunchedEx(LaunchKernel(kernel, dim3(blocks), dim3(kThreads), smem, stream, x, ldx, tc, w, y, ldy, mode,
                                 passes, prefetch, norm, route),
                    "QuantLinear launch");
}

// The kernel's token capacity is that of a full chunk.
template <QuantFormat F, int R>
Status LaunchGemvTokensRows(const __nv_bfloat16* x, int64_t ldx, const TokenChunks& tc, const QuantWeight& w,
                            float* y, int64_t ldy, Accumulate mode, cudaStream_t stream) {
  const int count = tc.per_chunk;
  if (count <= 1) return LaunchGemv<F, 1, R>(x, ldx, tc, w, y, ldy, mode, stream);
  if (count <= 2) return LaunchGemv<F, 2, R>(x, ldx, tc, w, y, ldy, mode, stream);
  if (count <= 4) return LaunchGemv<F, 4, R>(x, ldx, tc, w, y, ldy, mode, stream);
  if (count <= 8) return LaunchGemv<F, 8, R>(x, ldx, tc, w, y, ldy, mode, stream);
  return LaunchGemv<F, 16, R>(x, ldx, tc, w, y, ldy, mode, stream);
}
// QuantLinear's CUDA-core rows per warp (kCudaCore; kAuto at m = 1). Change
// here to switch the default after measuring (quant_linear_bench
// --gemv_variants); not gemv::kRows, which the MoE's up kernel needs at 2
// (its W1/W3 row pair).
constexpr int kDefaultGemvRows = kRows;

// rows_per_warp: 1, 2 or 4.
template <QuantFormat F>
Status LaunchGemvTokens(const __nv_bfloat16* x, int64_t ldx, const TokenChunks& tc, const QuantWeight& w, float* y,
                        int64_t ldy, Accumulate mode, int rows_per_warp, cudaStream_t stream) {
  if (rows_per_warp == 1) return LaunchGemvTokensRows<F, 1>(x, ldx, tc, w, y, ldy, mode, stream);
  if (rows_per_warp == 4) return LaunchGemvTokensRows<F, 4>(x, ldx, tc, w, y, ldy, mode, stream);
  return LaunchGemvTokensRows<F, 2>(x, ldx, tc, w, y, ldy, mode, stream);
}

template <int NT>
constexpr int kMmaReduceFloats = gemv::kWarps * NT * 4 * 32;

// Shared bytes of the tensor-core kernel for 8 * nt tokens.
int64_t MmaSmemBytes(int64_t k, int nt) { return int64_t{gemv::kWarps} * nt * 4 * 32 * 4 + mma::XBytes(k, nt); }

// The tensor-core path (kernels/quant_mma.cuh): 8 warps per block, a warp
// group of `slices` warps per 16-row tile, passes over tiles as the CUDA-core
// kernel does; partial tiles reduced across slices in order through shared
// memory ([warp][NT][4][32] floats, then x).
template <QuantFormat F, int NT>
__global__ void __launch_bounds__(kThreads)
    QuantMmaKernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, TokenChunks tc, QuantWeight w, float* y,
                   int64_t ldy, Accumulate mode, int passes, bool prefetch) {
  extern __shared__ uint4 smem[];
  float* red_s = reinterpret_cast<float*>(smem);
  uint4* x_s = smem + kMmaReduceFloats<NT> / 4;
  const mma::Split split = mma::MakeSplit(F, w.k);
  const ChunkOfBlock chunk = ThisBlocksChunk(tc);
  const int count = chunk.count;
  x += chunk.t0 * ldx;
  y += chunk.t0 * ldy;
  if (prefetch && chunk.t0 == 0) PrefetchFirstPassRows(w, mma::kTileRows * split.groups, passes, chunk.row_block);
  ptx::griddepcontrol_wait();  // x and y come from earlier kernels
  ptx::griddepcontrol_launch_dependents();
  mma::StageX<F, NT>(x_s, w.k, count, [&](int i) { return x + i * ldx; });

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / split.slices, slice = warp % split.slices;
  const int rows_per_pass = mma::kTileRows * split.groups;
  for (int pass = chunk.row_block; pass < passes; pass += chunk.row_blocks) {
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

template <QuantFormat F, int NT>
Status LaunchMma(const __nv_bfloat16* x, int64_t ldx, const TokenChunks& tc, const QuantWeight& w, float* y,
                 int64_t ldy, Accumulate mode, cudaStream_t stream) {
  const mma::Split split = mma::MakeSplit(F, w.k);
  const int rows_per_pass = mma::kTileRows * split.groups;
  const int passes = static_cast<int>((w.n + rows_per_pass - 1) / rows_per_pass);
  const int blocks = ChunkedBlocks(passes, tc.chunks);
  const size_t smem = MmaSmemBytes(w.k, NT);
  auto kernel = QuantMmaKernel<F, NT>;
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
          cudaSuccess)
    return Launched("QuantLinear: shared memory attribute");
  return LaunchedEx(LaunchKernel(kernel, dim3(blocks), dim3(kThreads), smem, stream, x, ldx, tc, w, y, ldy, mode,
                                 passes, ProgrammaticLaunchEnabled()),
                    "QuantLinear tensor-core launch");
}

template <QuantFormat F>
Status LaunchMmaTokens(const __nv_bfloat16* x, int64_t ldx, const TokenChunks& tc, const QuantWeight& w, float* y,
                       int64_t ldy, Accumulate mode, cudaStream_t stream) {
  if (tc.per_chunk <= 8) return LaunchMma<F, 1>(x, ldx, tc, w, y, ldy, mode, stream);
  return LaunchMma<F, 2>(x, ldx, tc, w, y, ldy, mode, stream);
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

Status DequantizeToBf16(const QuantWeight& w, __nv_bfloat16* out, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape("DequantizeToBf16", w.format, w.n, w.k));
  if (!Aligned(w.data, 16) || !Aligned(out, 16))
    return Status::InvalidArgument("DequantizeToBf16: data and out must be non-null and 16-byte aligned");
  if (w.format == QuantFormat::kBF16) {
    if (cudaMemcpyAsync(out, w.data, size_t(w.n) * size_t(w.k) * 2, cudaMemcpyDeviceToDevice, stream) != cudaSuccess)
      return Launched("DequantizeToBf16 copy");
    return Status::OK();
  }
  if (!Aligned(w.scales, 4)) return Status::InvalidArgument("DequantizeToBf16: int8/int4 weight without scales");
  const int64_t octets = int64_t{w.n} * (w.k / 8);
  DequantizeToBf16Kernel<<<static_cast<unsigned>((octets + 255) / 256), 256, 0, stream>>>(w, out);
  return Launched("DequantizeToBf16");
}

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
  // One launch: the chunks of per_pass tokens side by side on the grid.
  TokenChunks tc;
  tc.m = m;
  tc.per_chunk = static_cast<int>(std::min<int64_t>(per_pass, m));
  const int64_t chunks = (m + per_pass - 1) / per_pass;
  if (chunks > (int64_t{1} << 24))  // the grid's x extent stays far below 2^31
    return Status::InvalidArgument("QuantLinear: m " + std::to_string(m) + " is more rows than one launch takes");
  tc.chunks = static_cast<int>(chunks);
  switch (w.format) {
    case QuantFormat::kBF16:
      return tensor ? LaunchMmaTokens<QuantFormat::kBF16>(x, ldx, tc, w, y, ldy, mode, stream)
                    : LaunchGemvTokens<QuantFormat::kBF16>(x, ldx, tc, w, y, ldy, mode, rows_per_warp, stream);
    case QuantFormat::kInt8:
      return tensor ? LaunchMmaTokens<QuantFormat::kInt8>(x, ldx, tc, w, y, ldy, mode, stream)
                    : LaunchGemvTokens<QuantFormat::kInt8>(x, ldx, tc, w, y, ldy, mode, rows_per_warp, stream);
    case QuantFormat::kInt4:
      return tensor ? LaunchMmaTokens<QuantFormat::kInt4>(x, ldx, tc, w, y, ldy, mode, stream)
                    : LaunchGemvTokens<QuantFormat::kInt4>(x, ldx, tc, w, y, ldy, mode, rows_per_warp, stream);
  }
  return Status::OK();
}

}  // namespace detail

Status QuantLinearRmsNormed(const RmsNormedRow& in, const QuantWeight& w, float* y, Accumulate mode,
                            cudaStream_t stream, const RouterTail* route) {
  GROVE_RETURN_IF_ERROR(CheckShape("QuantLinearRmsNormed", w.format, w.n, w.k));
  if (!Aligned(in.x, 4) || !Aligned(in.weight, 4) || !Aligned(w.data, 16) || !Aligned(y, 4))
    return Status::InvalidArgument("QuantLinearRmsNormed: x, weight and y must be non-null and 4-byte aligned, "
                                   "w.data 16-byte aligned");
  if (in.normed != nullptr && !Aligned(in.normed, 16))
    return Status::InvalidArgument("QuantLinearRmsNormed: normed must be 16-byte aligned");
  if (w.format != QuantFormat::kBF16 && !Aligned(w.scales, 4))
    return Status::InvalidArgument("QuantLinearRmsNormed: int8/int4 weight without scales");
  if (!(in.eps >= 0.f))
    return Status::InvalidArgument("QuantLinearRmsNormed: eps must be >= 0");
  if (static_cast<int64_t>(gemv::ReduceBytes(kDefaultGemvRows) + gemv::XTileBytes(w.k, 1)) > kMaxSmemBytes)
    return Status::InvalidArgument("QuantLinearRmsNormed: k " + std::to_string(w.k) +
                                   " too long for the activation row in shared memory");
  RouterTail tail;
  if (route != nullptr) {
    GROVE_RETURN_IF_ERROR(CheckRouterArgs(route->args));
    if (route->args.logits != y || route->args.tokens != 1 || route->args.experts != w.n || !route->counter)
      return Status::InvalidArgument("QuantLinearRmsNormed: the route needs logits == y, tokens 1, experts == n (" +
                                     std::to_string(w.n) + ") and a counter");
    tail = *route;
  }
  const NormedInput norm{in.x, in.weight, in.eps, in.normed};
  switch (w.format) {
    case QuantFormat::kBF16:
      return LaunchGemv<QuantFormat::kBF16, 1, kDefaultGemvRows, true>(nullptr, w.k, TokenChunks{}, w, y, w.n, mode,
                                                                        stream, norm, tail);
    case QuantFormat::kInt8:
      return LaunchGemv<QuantFormat::kInt8, 1, kDefaultGemvRows, true>(nullptr, w.k, TokenChunks{}, w, y, w.n, mode,
                                                                        stream, norm, tail);
    case QuantFormat::kInt4:
      return LaunchGemv<QuantFormat::kInt4, 1, kDefaultGemvRows, true>(nullptr, w.k, TokenChunks{}, w, y, w.n, mode,
                                                                        stream, norm, tail);
  }
  return Status::InvalidArgument("QuantLinearRmsNormed: unknown format");
}

Status QuantLinear(const __nv_bfloat16* x, int64_t ldx, int64_t m, const QuantWeight& w, float* y, int64_t ldy,
                   Accumulate mode, void* /*workspace*/, size_t /*workspace_bytes*/, cudaStream_t stream) {
  return detail::QuantLinearOnPath(detail::QuantLinearPath::kAuto, x, ldx, m, w, y, ldy, mode, stream);
}

}  // namespace grove::kernels
