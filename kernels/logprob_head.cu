#include "kernels/logprob_head.h"

#include <algorithm>
#include <string>

#include "kernels/vector_io.cuh"

namespace grove::kernels {
namespace {

constexpr int kThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ void Load8(const float* p, float (&v)[8]) { LoadF32x8(p, v); }
__device__ __forceinline__ void Load8(const __nv_bfloat16* p, float (&v)[8]) { LoadBf16x8(p, v); }

// A running (max, sum of exp(x - max)) pair in base 2: x is prescaled by
// log2(e), so exp2f (one ex2.approx, relative error ~2^-22) does the work.
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum Merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * exp2f(a.m - m) + b.s * exp2f(b.m - m)};
}

// lse of the row in natural log units, block-wide (all threads get it).
template <typename T>
__device__ float RowLse(const T* row, int vocab) {
  __shared__ MaxSum warp_part[kThreads / 32];
  MaxSum acc{-INFINITY, 0.f};
  for (int c = threadIdx.x * 8; c < vocab; c += kThreads * 8) {
    float v[8];
    Load8(row + c, v);
    float m = acc.m;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[i] *= kLog2e;
      m = fmaxf(m, v[i]);
    }
    if (m == -INFINITY) continue;  // all -inf so far (masked logits): nothing to add
    float s = acc.m == -INFINITY ? 0.f : acc.s * exp2f(acc.m - m);
#pragma unroll
    for (int i = 0; i < 8; ++i) s += exp2f(v[i] - m);
    acc = {m, s};
  }
  for (int o = 16; o > 0; o /= 2) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o)};
    acc = Merge(acc, other);
  }
  if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = acc;
  __syncthreads();
  MaxSum all = warp_part[0];
  for (int w = 1; w < kThreads / 32; ++w) all = Merge(all, warp_part[w]);
  __syncthreads();  // warp_part is reused by the next row
  return (all.m + log2f(all.s)) * kLn2;
}

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__global__ void ForwardKernel(const T* logits, const int32_t* targets, float* logp, float* lse, int rows,
                              int vocab) {
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = logits + static_cast<int64_t>(r) * vocab;
    const float l = RowLse(row, vocab);
    if (threadIdx.x == 0) {
      const int target = targets[r];
      lse[r] = l;
      logp[r] = (target >= 0 && target < vocab) ? ToFloat(row[target]) - l : 0.f;
    }
  }
}

template <typename T>
__global__ void BackwardKernel(const T* logits, const int32_t* targets, const float* lse, const float* dlogp,
                               __nv_bfloat16* dlogits, int rows, int vocab) {
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = logits + static_cast<int64_t>(r) * vocab;
    __nv_bfloat16* out = dlogits + static_cast<int64_t>(r) * vocab;
    const int target = targets[r];
    const bool valid = target >= 0 && target < vocab;
    const float g = valid ? dlogp[r] : 0.f;
    const float shift = lse[r] * kLog2e;
    for (int c = threadIdx.x * 8; c < vocab; c += kThreads * 8) {
      float v[8];
      Load8(row + c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float p = exp2f(fmaf(v[i], kLog2e, -shift));
        v[i] = g * ((c + i == target ? 1.f : 0.f) - p);
      }
      StoreBf16x8(out + c, v);
    }
  }
}

// One warp per row over its blocks' (m, s), merged as RowLse merges its
// partial (max, sum) pairs (in base 2: m prescaled by log2 e), in the order
// of the lanes' strided walk and the fixed butterfly: the same bits every run.
__global__ void FromBlockStatsKernel(const float2* __restrict__ stats, const float* __restrict__ target_logit,
                                     const int32_t* __restrict__ targets, float* __restrict__ logp,
                                     float* __restrict__ lse, int rows, int vocab, int blocks) {
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  for (int64_t r = int64_t{blockIdx.x} * warps + threadIdx.x / 32; r < rows; r += int64_t{gridDim.x} * warps) {
    const float2* row = stats + r * blocks;
    MaxSum acc{-INFINITY, 0.f};
    for (int j = lane; j < blocks; j += 32) acc = Merge(acc, {row[j].x * kLog2e, row[j].y});
    for (int o = 16; o > 0; o /= 2)
      acc = Merge(acc, {__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o)});
    if (lane == 0) {
      const float l = (acc.m + log2f(acc.s)) * kLn2;
      const int target = targets[r];
      lse[r] = l;
      logp[r] = (target >= 0 && target < vocab) ? target_logit[r] - l : 0.f;
    }
  }
}

// No __restrict__ on shifted / dlogits: they may be one buffer.
__global__ void BackwardFromShiftedKernel(const __nv_bfloat16* shifted, const float2* __restrict__ stats,
                                          const int32_t* __restrict__ targets, const float* __restrict__ lse,
                                          const float* __restrict__ dlogp, __nv_bfloat16* dlogits, int rows,
                                          int vocab, int blocks) {
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t at = static_cast<int64_t>(r) * vocab;
    const int target = targets[r];
    const bool valid = target >= 0 && target < vocab;
    const float g = valid ? dlogp[r] : 0.f;
    const float l = lse[r];
    for (int c = threadIdx.x * 8; c < vocab; c += kThreads * 8) {
      // u + (m_j - lse): m_j - lse <= 0 is exact enough in fp32 and u is
      // small wherever p matters (logprob_head.h, grouped_gemm.h).
      const float shift = stats[static_cast<int64_t>(r) * blocks + c / kLogitBlockColumns].x - l;
      float v[8];
      LoadBf16x8(shifted + at + c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float p = exp2f((v[i] + shift) * kLog2e);
        v[i] = g * ((c + i == target ? 1.f : 0.f) - p);
      }
      StoreBf16x8(dlogits + at + c, v);
    }
  }
}

Status Check(const char* what, const void* logits, const void* a, const void* b, const void* c, int rows,
             int vocab) {
  if (rows < 0 || vocab < 8 || vocab % 8 != 0 || vocab > kLogProbMaxVocab)
    return Status::InvalidArgument(std::string(what) + ": need rows >= 0 and vocab a multiple of 8 in 8.." +
                                   std::to_string(kLogProbMaxVocab) + "; got rows " + std::to_string(rows) +
                                   ", vocab " + std::to_string(vocab));
  if (rows > 0 && (!logits || !a || !b || !c)) return Status::InvalidArgument(std::string(what) + ": null pointer");
  if (reinterpret_cast<uintptr_t>(logits) % 16 != 0)
    return Status::InvalidArgument(std::string(what) + ": logits must be 16-byte aligned");
  return Status::OK();
}

Status Launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string(what) + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

int Blocks(int rows) { return rows < 65536 ? rows : 65536; }

template <typename T>
Status Forward(const T* logits, const int32_t* targets, float* logp, float* lse, int rows, int vocab,
               cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(Check("TokenLogProbForward", logits, targets, logp, lse, rows, vocab));
  if (rows == 0) return Status::OK();
  ForwardKernel<T><<<Blocks(rows), kThreads, 0, stream>>>(logits, targets, logp, lse, rows, vocab);
  return Launched("TokenLogProbForward");
}

template <typename T>
Status Backward(const T* logits, const int32_t* targets, const float* lse, const float* dlogp,
                __nv_bfloat16* dlogits, int rows, int vocab, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(Check("TokenLogProbBackward", logits, targets, lse, dlogp, rows, vocab));
  if (rows == 0) return Status::OK();
  if (!dlogits || reinterpret_cast<uintptr_t>(dlogits) % 16 != 0)
    return Status::InvalidArgument("TokenLogProbBackward: dlogits must be non-null and 16-byte aligned");
  BackwardKernel<T><<<Blocks(rows), kThreads, 0, stream>>>(logits, targets, lse, dlogp, dlogits, rows, vocab);
  return Launched("TokenLogProbBackward");
}

}  // namespace

Status TokenLogProbFromBlockStats(const float2* block_stats, const float* target_logit, const int32_t* targets,
                                  float* logp, float* lse, int rows, int vocab, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(Check("TokenLogProbFromBlockStats", block_stats, targets, logp, lse, rows, vocab));
  if (rows == 0) return Status::OK();
  if (!target_logit) return Status::InvalidArgument("TokenLogProbFromBlockStats: null target_logit");
  constexpr int kWarps = 8;
  const int grid = static_cast<int>(std::min<int64_t>((int64_t{rows} + kWarps - 1) / kWarps, 65536));
  FromBlockStatsKernel<<<grid, 32 * kWarps, 0, stream>>>(block_stats, target_logit, targets, logp, lse, rows,
                                                          vocab, LogitBlocks(vocab));
  return Launched("TokenLogProbFromBlockStats");
}

Status TokenLogProbBackwardFromShifted(const __nv_bfloat16* shifted, const float2* block_stats,
                                       const int32_t* targets, const float* lse, const float* dlogp,
                                       __nv_bfloat16* dlogits, int rows, int vocab, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(Check("TokenLogProbBackwardFromShifted", shifted, targets, lse, dlogp, rows, vocab));
  if (rows == 0) return Status::OK();
  if (!block_stats || !dlogits || reinterpret_cast<uintptr_t>(dlogits) % 16 != 0)
    return Status::InvalidArgument(
        "TokenLogProbBackwardFromShifted: block_stats and dlogits must be non-null, dlogits 16-byte aligned");
  BackwardFromShiftedKernel<<<Blocks(rows), kThreads, 0, stream>>>(shifted, block_stats, targets, lse, dlogp,
                                                                    dlogits, rows, vocab, LogitBlocks(vocab));
  return Launched("TokenLogProbBackwardFromShifted");
}

Status TokenLogProbForward(const float* logits, const int32_t* targets, float* logp, float* lse, int rows, int vocab,
                           cudaStream_t stream) {
  return Forward(logits, targets, logp, lse, rows, vocab, stream);
}
Status TokenLogProbForward(const __nv_bfloat16* logits, const int32_t* targets, float* logp, float* lse, int rows,
                           int vocab, cudaStream_t stream) {
  return Forward(logits, targets, logp, lse, rows, vocab, stream);
}
Status TokenLogProbBackward(const float* logits, const int32_t* targets, const float* lse, const float* dlogp,
                            __nv_bfloat16* dlogits, int rows, int vocab, cudaStream_t stream) {
  return Backward(logits, targets, lse, dlogp, dlogits, rows, vocab, stream);
}
Status TokenLogProbBackward(const __nv_bfloat16* logits, const int32_t* targets, const float* lse,
                            const float* dlogp, __nv_bfloat16* dlogits, int rows, int vocab, cudaStream_t stream) {
  return Backward(logits, targets, lse, dlogp, dlogits, rows, vocab, stream);
}

}  // namespace grove::kernels
