#include "kernels/rope.h"

#include "kernels/rope_math.cuh"

#include <algorithm>
#include <cmath>
#include <string>

namespace grove::kernels {
namespace {

constexpr int kThreads = 128;

// One block per token (grid-stride over a bounded grid, so each block's
// base^(-2i/head_dim), a double pow, is computed once and reused): the block
// computes the token's half cosines and sines (double, rounded to fp32 as
// the CPU tables are), then rotates every head's pairs, V pairs per thread.
template <int V>
__global__ void RopeKernel(__nv_bfloat16* x, const int32_t* positions, int tokens, int heads, int head_dim,
                           double base, int64_t row_stride, float sign) {
  __shared__ double inv_freq[kRopeMaxHeadDim / 2];
  __shared__ float cos_s[kRopeMaxHeadDim / 2];
  __shared__ float sin_s[kRopeMaxHeadDim / 2];
  const int half = head_dim / 2;
  const int groups = half / V;  // vectors per half-head
  for (int i = threadIdx.x; i < half; i += blockDim.x) inv_freq[i] = RopeInvFreq(i, head_dim, base);
  for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
    __nv_bfloat16* row = x + static_cast<int64_t>(t) * row_stride;
    // V == 8: this thread's first pair of vectors is loaded before the
    // angles, so the read's latency runs under the double sincos (each was
    // waited for in turn: 2.2 TB/s on the H100 at gpu-ref's shapes).
    uint4 first_lo = make_uint4(0, 0, 0, 0), first_hi = make_uint4(0, 0, 0, 0);
    if constexpr (V == 8) {
      if (threadIdx.x < heads * groups) {
        const __nv_bfloat16* lo =
            row + static_cast<int64_t>(threadIdx.x / groups) * head_dim + (threadIdx.x % groups) * V;
        first_lo = *reinterpret_cast<const uint4*>(lo);
        first_hi = *reinterpret_cast<const uint4*>(lo + half);
      }
    }
    const double pos = static_cast<double>(positions[t]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      double s, c;
      sincos(pos * inv_freq[i], &s, &c);
      cos_s[i] = static_cast<float>(c);
      sin_s[i] = sign * static_cast<float>(s);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < heads * groups; idx += blockDim.x) {
      const int h = idx / groups;
      const int i0 = (idx % groups) * V;
      __nv_bfloat16* lo = row + static_cast<int64_t>(h) * head_dim + i0;
      __nv_bfloat16* hi = lo + half;
      if constexpr (V == 8) {
        const bool first = idx == static_cast<int>(threadIdx.x);
        uint4 a_raw = first ? first_lo : *reinterpret_cast<const uint4*>(lo);
        uint4 b_raw = first ? first_hi : *reinterpret_cast<const uint4*>(hi);
        __nv_bfloat162* a2 = reinterpret_cast<__nv_bfloat162*>(&a_raw);
        __nv_bfloat162* b2 = reinterpret_cast<__nv_bfloat162*>(&b_raw);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const float2 a = __bfloat1622float2(a2[p]);
          const float2 b = __bfloat1622float2(b2[p]);
          const float c0 = cos_s[i0 + 2 * p], s0 = sin_s[i0 + 2 * p];
          const float c1 = cos_s[i0 + 2 * p + 1], s1 = sin_s[i0 + 2 * p + 1];
          float x0, y0, x1, y1;
          RotatePair(a.x, b.x, c0, s0, x0, y0);
          RotatePair(a.y, b.y, c1, s1, x1, y1);
          a2[p] = __floats2bfloat162_rn(x0, x1);
          b2[p] = __floats2bfloat162_rn(y0, y1);
        }
        *reinterpret_cast<uint4*>(lo) = a_raw;
        *reinterpret_cast<uint4*>(hi) = b_raw;
      } else {
        const float a = __bfloat162float(*lo), b = __bfloat162float(*hi);
        const float c = cos_s[i0], s = sin_s[i0];
        float x, y;
        RotatePair(a, b, c, s, x, y);
        *lo = __float2bfloat16_rn(x);
        *hi = __float2bfloat16_rn(y);
      }
    }
    __syncthreads();
  }
}

// One thread per (position, i): inv_freq and the angle exactly as
// RopeKernel computes them.
__global__ void RopeTableKernel(float2* table, int positions, int head_dim, double base) {
  const int half = head_dim / 2;
  const int64_t total = static_cast<int64_t>(positions) * half;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < total; k += int64_t{gridDim.x} * blockDim.x) {
    double s, c;
    sincos(static_cast<double>(k / half) * RopeInvFreq(static_cast<int>(k % half), head_dim, base), &s, &c);
    table[k] = make_float2(static_cast<float>(c), static_cast<float>(s));
  }
}

// x in place by -angle from the table, pair by pair: RopeKernel's backward
// arithmetic (RotatePair with -sin) with the table's cosines and sines.
__global__ void RopeBackwardFromTableKernel(__nv_bfloat16* x, int64_t pairs, int heads, int head_dim,
                                            int64_t row_stride, const float2* __restrict__ table,
                                            const int32_t* __restrict__ positions) {
  const int half = head_dim / 2, per_row = heads * half;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < pairs; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / per_row;
    const int rem = int(i - row * per_row), h = rem / half, k = rem % half;
    __nv_bfloat16* lo = x + row * row_stride + int64_t{h} * head_dim + k;
    const float2 cs = table[int64_t{positions[row]} * half + k];
    float a, b;
    RotatePair(__bfloat162float(*lo), __bfloat162float(lo[half]), cs.x, -cs.y, a, b);
    *lo = __float2bfloat16_rn(a);
    lo[half] = __float2bfloat16_rn(b);
  }
}

Status Rope(const char* what, __nv_bfloat16* x, const int32_t* positions, int tokens, int heads, int head_dim,
            double base, cudaStream_t stream, int64_t row_stride, float sign) {
  if (tokens < 0 || heads < 1 || head_dim < 2 || head_dim % 2 != 0 || head_dim > kRopeMaxHeadDim)
    return Status::InvalidArgument(std::string(what) + ": need tokens >= 0, heads >= 1, head_dim even in 2.." +
                                   std::to_string(kRopeMaxHeadDim) + "; got tokens " + std::to_string(tokens) +
                                   ", heads " + std::to_string(heads) + ", head_dim " + std::to_string(head_dim));
  if (!(base > 1.0) || !std::isfinite(base))
    return Status::InvalidArgument(std::string(what) + ": base must be a finite value > 1");
  const int64_t packed = static_cast<int64_t>(heads) * head_dim;
  if (row_stride == 0) row_stride = packed;
  if (row_stride < packed)
    return Status::InvalidArgument(std::string(what) + ": row_stride " + std::to_string(row_stride) +
                                   " < heads * head_dim " + std::to_string(packed));
  if (tokens == 0) return Status::OK();
  if (!x || !positions) return Status::InvalidArgument(std::string(what) + ": null pointer");
  const int blocks = tokens < 2048 ? tokens : 2048;  // ~16 per SM; each block reuses its inv_freq
  const bool vec = (head_dim / 2) % 8 == 0 && row_stride % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (vec)
    RopeKernel<8><<<blocks, kThreads, 0, stream>>>(x, positions, tokens, heads, head_dim, base, row_stride, sign);
  else
    RopeKernel<1><<<blocks, kThreads, 0, stream>>>(x, positions, tokens, heads, head_dim, base, row_stride, sign);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string(what) + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace

Status RopeCosSinTable(float2* table, int positions, int head_dim, double base, cudaStream_t stream) {
  if (positions < 0 || head_dim < 2 || head_dim % 2 != 0 || head_dim > kRopeMaxHeadDim || !(base > 1.0) ||
      !std::isfinite(base))
    return Status::InvalidArgument("RopeCosSinTable: need positions >= 0, head_dim even in 2.." +
                                   std::to_string(kRopeMaxHeadDim) + ", base a finite value > 1");
  if (positions == 0) return Status::OK();
  if (!table) return Status::InvalidArgument("RopeCosSinTable: null table");
  const int64_t total = static_cast<int64_t>(positions) * (head_dim / 2);
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 4096));
  RopeTableKernel<<<blocks, 256, 0, stream>>>(table, positions, head_dim, base);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string("RopeCosSinTable launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

Status RopeBackwardFromTable(__nv_bfloat16* dx, const int32_t* positions, int tokens, int heads, int head_dim,
                             const float2* table, cudaStream_t stream, int64_t row_stride) {
  if (tokens < 0 || heads < 1 || head_dim < 2 || head_dim % 2 != 0 || head_dim > kRopeMaxHeadDim)
    return Status::InvalidArgument("RopeBackwardFromTable: bad shape");
  if (row_stride == 0) row_stride = static_cast<int64_t>(heads) * head_dim;
  if (tokens == 0) return Status::OK();
  if (!dx || !positions || !table) return Status::InvalidArgument("RopeBackwardFromTable: null pointer");
  const int64_t pairs = static_cast<int64_t>(tokens) * heads * (head_dim / 2);
  RopeBackwardFromTableKernel<<<1024, 256, 0, stream>>>(dx, pairs, heads, head_dim, row_stride, table, positions);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return Status::Internal(std::string("RopeBackwardFromTable launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

Status RopeForward(__nv_bfloat16* x, const int32_t* positions, int tokens, int heads, int head_dim, double base,
                   cudaStream_t stream, int64_t row_stride) {
  return Rope("RopeForward", x, positions, tokens, heads, head_dim, base, stream, row_stride, 1.f);
}

Status RopeBackward(__nv_bfloat16* dx, const int32_t* positions, int tokens, int heads, int head_dim, double base,
                    cudaStream_t stream, int64_t row_stride) {
  return Rope("RopeBackward", dx, positions, tokens, heads, head_dim, base, stream, row_stride, -1.f);
}

}  // namespace grove::kernels
