#include "rollout/gpu_precision_plan_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>

namespace grove::rollout::gpu_plan {
namespace {

constexpr int kGroup = 128;  // int4 group, as QuantizeInt4Grouped's default

cudaStream_t S(void* s) { return static_cast<cudaStream_t>(s); }

struct MaxOp {  // fmaxf: a NaN operand yields the other, as before
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

template <typename T, typename Op>
__device__ T WarpReduce(T v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ double WarpSum(double v) { return WarpReduce(v, SumOp{}); }

// Block-wide reduction of blockDim.x (a multiple of 32, <= 1024) threads,
// `init` the operation's identity; every thread gets the result. The warps'
// partials are combined in warp order (the same sum every run).
template <typename T, typename Op>
__device__ T BlockReduce(T v, T* sh, T init, Op op) {
  v = WarpReduce(v, op);
  const int w = threadIdx.x / 32, nw = blockDim.x / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh[w] = v;
  __syncthreads();
  T r = init;
  for (int i = 0; i < nw; ++i) r = op(r, sh[i]);
  return r;
}
__device__ float BlockMax(float v, float* sh) { return BlockReduce(v, sh, -FLT_MAX, MaxOp{}); }
__device__ float BlockSumF(float v, float* sh) { return BlockReduce(v, sh, 0.f, SumOp{}); }
__device__ double BlockSum(double v, double* sh) { return BlockReduce(v, sh, 0.0, SumOp{}); }

// One block of 128 threads per (group, row): the CPU's amax / 7, then
// clamp(nearbyint(w / scale), -7, 7) * scale (IEEE division and rounding
// to nearest even, as the CPU's; no contraction can apply).
__global__ void Int4RoundTrip(float* w, int64_t cols) {
  __shared__ float sh[32];
  const int64_t r = blockIdx.y, c = int64_t(blockIdx.x) * kGroup + threadIdx.x;
  float* row = w + r * cols;
  const float v = c < cols ? row[c] : 0.f;
  const float scale = BlockMax(fabsf(v), sh) / 7.0f;
  if (c >= cols) return;
  const float q = scale > 0 ? fminf(fmaxf(rintf(v / scale), -7.0f), 7.0f) : 0.0f;
  // Through an integer as the CPU's packed value: -0 (a small negative
  // weight rounded to 0) dequantizes to +0 there.
  row[c] = float(int(q)) * scale;
}

// One block per row: amax / 127, inv = 1 / scale, clamp(nearbyint(w * inv))
// * scale, as QuantizeInt8PerRow + DequantizeInt8.
__global__ void Int8RoundTrip(float* w, int64_t cols) {
  __shared__ float sh[32];
  float* row = w + int64_t(blockIdx.x) * cols;
  float amax = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) amax = fmaxf(amax, fabsf(row[c]));
  const float scale = BlockMax(amax, sh) / 127.0f;
  const float inv = scale > 0 ? 1.0f / scale : 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float q = fminf(fmaxf(rintf(row[c] * inv), -127.0f), 127.0f);
    row[c] = float(int(q)) * scale;  // through int8 as on the CPU (-0 -> +0)
  }
}

// RoundToBf16's bit arithmetic (ties to even; NaN stays a quiet NaN).
__global__ void Bf16RoundTrip(float* w, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = w[i];
    uint32_t u = __float_as_uint(x);
    if (isnan(x)) {
      w[i] = __uint_as_float((u | 0x00400000u) & 0xFFFF0000u);
      continue;
    }
    u += 0x7FFFu + ((u >> 16) & 1u);
    w[i] = __uint_as_float(u & 0xFFFF0000u);
  }
}

__global__ void GatherRowsKernel(const __nv_bfloat16* x, const int32_t* rows, float* out, int64_t hidden) {
  const int64_t p = blockIdx.x;
  const __nv_bfloat16* src = x + int64_t(rows[p]) * hidden;
  for (int64_t d = threadIdx.x; d < hidden; d += blockDim.x) out[p * hidden + d] = __bfloat162float(src[d]);
}

__global__ void SwiGluKernel(const float* a, const float* b, float* h, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = a[i];
    h[i] = x * (1.0f / (1.0f + expf(-x))) * b[i];
  }
}

__global__ void WeightedSqDiffKernel(const float* y, const float* ref, const int32_t* unit, const double* weight,
                                     double* error, int64_t hidden) {
  __shared__ double sh[32];
  const int64_t p = blockIdx.x;
  double s = 0;
  for (int64_t d = threadIdx.x; d < hidden; d += blockDim.x) {
    const double diff = double(y[p * hidden + d]) - double(ref[p * hidden + d]);
    s += diff * diff;
  }
  s = BlockSum(s, sh);
  if (threadIdx.x == 0) atomicAdd(error + unit[p], weight[p] * s);
}

// One block per row: the CPU's log-softmax (z - max - log sum exp(z - max),
// in float), then the KL sum in double.
__global__ void RowKlKernel(const float* zp, const float* zq, double* kl, int64_t vocab) {
  __shared__ float shf[32];
  __shared__ double shd[32];
  const float* p = zp + int64_t(blockIdx.x) * vocab;
  const float* q = zq + int64_t(blockIdx.x) * vocab;
  float mp = -FLT_MAX, mq = -FLT_MAX;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    mp = fmaxf(mp, p[v]);
    mq = fmaxf(mq, q[v]);
  }
  mp = BlockMax(mp, shf);
  mq = BlockMax(mq, shf);
  float sp = 0, sq = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    sp += expf(p[v] - mp);
    sq += expf(q[v] - mq);
  }
  const float lse_p = mp + logf(BlockSumF(sp, shf));
  const float lse_q = mq + logf(BlockSumF(sq, shf));
  double s = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const double lq = double(q[v] - lse_q), lp = double(p[v] - lse_p);
    s += exp(lq) * (lq - lp);
  }
  s = BlockSum(s, shd);
  if (threadIdx.x == 0) atomicAdd(kl, s > 0 ? s : 0.0);
}

int Blocks(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 65535 * 8)); }

}  // namespace

void RoundTripInt4(float* w, int64_t rows, int64_t cols, void* stream) {
  if (rows == 0 || cols == 0) return;
  Int4RoundTrip<<<dim3(unsigned((cols + kGroup - 1) / kGroup), unsigned(rows)), kGroup, 0, S(stream)>>>(w, cols);
}

void RoundTripInt8(float* w, int64_t rows, int64_t cols, void* stream) {
  if (rows == 0 || cols == 0) return;
  Int8RoundTrip<<<unsigned(rows), 256, 0, S(stream)>>>(w, cols);
}

void RoundTripBf16(float* w, int64_t rows, int64_t cols, void* stream) {
  if (rows == 0 || cols == 0) return;
  Bf16RoundTrip<<<Blocks(rows * cols, 256), 256, 0, S(stream)>>>(w, rows * cols);
}

void GatherRowsToF32(const void* x_bf16, const int32_t* rows, float* out, int64_t n, int64_t hidden, void* stream) {
  if (n == 0) return;
  GatherRowsKernel<<<unsigned(n), 128, 0, S(stream)>>>(static_cast<const __nv_bfloat16*>(x_bf16), rows, out, hidden);
}

void SwiGlu(const float* a, const float* b, float* h, int64_t n, void* stream) {
  if (n == 0) return;
  SwiGluKernel<<<Blocks(n, 256), 256, 0, S(stream)>>>(a, b, h, n);
}

void AccumulateWeightedSqDiff(const float* y, const float* ref, const int32_t* unit, const double* weight,
                              double* error, int64_t n, int64_t hidden, void* stream) {
  if (n == 0) return;
  WeightedSqDiffKernel<<<unsigned(n), 256, 0, S(stream)>>>(y, ref, unit, weight, error, hidden);
}

void AccumulateRowKl(const float* zp, const float* zq, double* kl, int64_t rows, int64_t vocab, void* stream) {
  if (rows == 0) return;
  RowKlKernel<<<unsigned(rows), 256, 0, S(stream)>>>(zp, zq, kl, vocab);
}

namespace {

constexpr int kRelativeChangeThreads = 256;

// Block b: elements (as float4 where both pointers allow) i = b*T + t,
// stepping by blocks*T; each thread's sums in its fixed element order, then
// the warp butterfly, then the warps in order.
__global__ void RelativeChangeBlockKernel(const float* w, const float* ref, int64_t n, bool vec4, double* partials) {
  double d2 = 0, r2 = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vec4) {
    const int64_t n4 = n / 4;
    const float4* w4 = reinterpret_cast<const float4*>(w);
    const float4* r4 = reinterpret_cast<const float4*>(ref);
    for (int64_t i = first; i < n4; i += stride) {
      const float4 a = w4[i], r = r4[i];
      const double e[4] = {double(a.x) - r.x, double(a.y) - r.y, double(a.z) - r.z, double(a.w) - r.w};
      d2 += e[0] * e[0];
      d2 += e[1] * e[1];
      d2 += e[2] * e[2];
      d2 += e[3] * e[3];
      r2 += double(r.x) * r.x;
      r2 += double(r.y) * r.y;
      r2 += double(r.z) * r.z;
      r2 += double(r.w) * r.w;
    }
    tail = n4 * 4;
  }
  for (int64_t i = tail + first; i < n; i += stride) {
    const double e = double(w[i]) - ref[i];
    d2 += e * e;
    r2 += double(ref[i]) * ref[i];
  }
  __shared__ double sh[2][kRelativeChangeThreads / 32];
  d2 = WarpSum(d2);
  r2 = WarpSum(r2);
  if (threadIdx.x % 32 == 0) {
    sh[0][threadIdx.x / 32] = d2;
    sh[1][threadIdx.x / 32] = r2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double bd = 0, br = 0;
    for (int i = 0; i < int(blockDim.x / 32); ++i) {
      bd += sh[0][i];
      br += sh[1][i];
    }
    partials[blockIdx.x] = bd;
    partials[gridDim.x + blockIdx.x] = br;
  }
}

__global__ void SumPartialsInOrderKernel(const double* partials, int blocks, double* sums) {
  double d2 = 0, r2 = 0;
  for (int b = 0; b < blocks; ++b) {
    d2 += partials[b];
    r2 += partials[blocks + b];
  }
  sums[0] = d2;
  sums[1] = r2;
}

}  // namespace

void RelativeChangeSums(const float* w, const float* ref, int64_t n, double* partials, double* sums, void* stream) {
  const bool vec4 = reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(ref) % 16 == 0;
  RelativeChangeBlockKernel<<<kRelativeChangeBlocks, kRelativeChangeThreads, 0, S(stream)>>>(w, ref, n, vec4,
                                                                                              partials);
  SumPartialsInOrderKernel<<<1, 1, 0, S(stream)>>>(partials, kRelativeChangeBlocks, sums);
}

}  // namespace grove::rollout::gpu_plan
