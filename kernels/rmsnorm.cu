#include "kernels/rmsnorm.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/vector_io.cuh"

namespace grove::kernels {
namespace {

constexpr int kWarps = 4;  // rows in flight per block, one warp per row
// Backward partial-sum rows: 8 blocks of 4 warps per H100 SM, enough warps
// in flight for a memory-bound pass (264 blocks ran at 37% of copy rate).
constexpr int kMaxBlocks = 1056;

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// One warp per row; lanes walk 8-element chunks (16-byte loads).
__global__ void RmsNormForwardKernel(const __nv_bfloat16* __restrict__ x,
                                     const float* __restrict__ w, __nv_bfloat16* __restrict__ y,
                                     float* __restrict__ rstd_out, int tokens, int hidden,
                                     float eps) {
  const int lane = threadIdx.x % 32;
  const int chunks = hidden / 8;
  for (int row = blockIdx.x * kWarps + threadIdx.x / 32; row < tokens;
       row += gridDim.x * kWarps) {
    const __nv_bfloat16* xr = x + static_cast<int64_t>(row) * hidden;
    float ss = 0.f;
    for (int c = lane; c < chunks; c += 32) {
      float v[8];
      LoadBf16x8(xr + 8 * c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
    }
    const float rstd = rsqrtf(WarpSum(ss) / hidden + eps);
    if (lane == 0 && rstd_out) rstd_out[row] = rstd;
    __nv_bfloat16* yr = y + static_cast<int64_t>(row) * hidden;
    for (int c = lane; c < chunks; c += 32) {
      float v[8], wv[8];
      LoadBf16x8(xr + 8 * c, v);
      LoadF32x8(w + 8 * c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = v[i] * rstd * wv[i];
      StoreBf16x8(yr + 8 * c, v);
    }
  }
}

// dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w, xhat = x * rstd.
// Each warp also sums dy * xhat of its rows into its own shared-memory row;
// the block then writes the sum of its warps' rows to partial[blockIdx.x].
__global__ void RmsNormBackwardKernel(const __nv_bfloat16* __restrict__ dy,
                                      const __nv_bfloat16* __restrict__ x,
                                      const float* __restrict__ w,
                                      const float* __restrict__ rstd_in,
                                      __nv_bfloat16* __restrict__ dx, float* __restrict__ partial,
                                      int tokens, int hidden) {
  extern __shared__ float dw_rows[];  // [kWarps][hidden]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = hidden / 8;
  float* my_dw = dw_rows + warp * hidden;
  for (int j = lane; j < hidden; j += 32) my_dw[j] = 0.f;  // layout [8][chunks]
  for (int row = blockIdx.x * kWarps + warp; row < tokens; row += gridDim.x * kWarps) {
    const int64_t off = static_cast<int64_t>(row) * hidden;
    const float rstd = rstd_in[row];
    float dot = 0.f;
    for (int c = lane; c < chunks; c += 32) {
      float xv[8], dyv[8], wv[8];
      LoadBf16x8(x + off + 8 * c, xv);
      LoadBf16x8(dy + off + 8 * c, dyv);
      LoadF32x8(w + 8 * c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float xhat = xv[i] * rstd;
        dot += dyv[i] * wv[i] * xhat;
        // Column 8c+i lives at [i][c]: lanes (consecutive c) hit
        // consecutive banks; each lane owns its columns, so no race.
        my_dw[i * chunks + c] += dyv[i] * xhat;
      }
    }
    const float mean_dot = WarpSum(dot) / hidden;
    for (int c = lane; c < chunks; c += 32) {
      float xv[8], dyv[8], wv[8], out[8];
      LoadBf16x8(x + off + 8 * c, xv);
      LoadBf16x8(dy + off + 8 * c, dyv);
      LoadF32x8(w + 8 * c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = rstd * (dyv[i] * wv[i] - xv[i] * rstd * mean_dot);
      StoreBf16x8(dx + off + 8 * c, out);
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < kWarps; ++r) s += dw_rows[r * hidden + (j % 8) * chunks + j / 8];
    partial[static_cast<int64_t>(blockIdx.x) * hidden + j] = s;
  }
}

// dweight[j] = sum over blocks of partial[b][j] in a fixed order (so the
// result is deterministic): block x takes 32 columns; thread (ty, tx) sums
// blocks ty, ty + 32, ... of column 32x + tx (a warp reads 128 contiguous
// bytes), then the 32 partial sums of a column are added in ty order. (One
// thread per column looping over all blocks ran ~25 us: too few loads in
// flight.) out[j] = total, or out[j] + total when accumulating.
__global__ void SumPartialsKernel(const float* __restrict__ partial, int blocks, int hidden,
                                  float* __restrict__ out, bool accumulate) {
  __shared__ float part[32][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int j = blockIdx.x * 32 + tx;
  float s = 0.f;
  if (j < hidden)
    for (int b = ty; b < blocks; b += 32) s += partial[static_cast<int64_t>(b) * hidden + j];
  part[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && j < hidden) {
    float total = 0.f;
    for (int r = 0; r < 32; ++r) total += part[r][tx];
    out[j] = accumulate ? out[j] + total : total;
  }
}

// RmsNormBackwardResidual's kernel. A row stays in registers between its
// two phases (the dot product mean(g * xhat), then dx), so dy and x are read
// from memory once. kWarpsPerRow warps share a row; a thread owns the row's
// chunks r, r + kRowThreads, ... (at most kFusedChunks of them), the same
// columns in every row, so it sums its dweight terms across its rows in
// registers, and at the end the block adds its row groups' sums in group
// order into partial[blockIdx.x]. Same per-element math as
// RmsNormBackwardKernel.
constexpr int kFusedThreads = 256;
constexpr int kFusedChunks = 4;  // 32 fp32 of dy, x and dweight per thread
static_assert(kRmsNormMaxHidden <= (kFusedThreads / 32) * 32 * kFusedChunks * 8,
              "the widest row must fit one block's registers");

template <int kWarpsPerRow>
__global__ void __launch_bounds__(kFusedThreads)
    RmsNormBackwardResidualKernel(const float* __restrict__ dy, const __nv_bfloat16* __restrict__ x,
                                  const float* __restrict__ w, const float* __restrict__ rstd_in,
                                  float* __restrict__ dres, __nv_bfloat16* __restrict__ dres_bf16,
                                  float* __restrict__ partial, int tokens, int hidden,
                                  bool accumulate_residual) {
  constexpr int kRowThreads = 32 * kWarpsPerRow;
  constexpr int kRowsPerBlock = kFusedThreads / kRowThreads;
  extern __shared__ float group_dw[];                 // [kRowsPerBlock][hidden]
  __shared__ float warp_dot[2][kFusedThreads / 32];   // by iteration parity
  const int group = threadIdx.x / kRowThreads, r = threadIdx.x % kRowThreads;
  const int chunks = hidden / 8;
  float dw[kFusedChunks][8] = {};
  // The loop bound is the same for the whole block (rows past the end idle
  // through it), so the __syncthreads below are reached by every thread.
  for (int row0 = blockIdx.x * kRowsPerBlock, it = 0; row0 < tokens;
       row0 += gridDim.x * kRowsPerBlock, ++it) {
    const int row = row0 + group;
    const bool live = row < tokens;
    const int64_t off = static_cast<int64_t>(row) * hidden;
    const float rstd = live ? rstd_in[row] : 0.f;
    float g[kFusedChunks][8], xhat[kFusedChunks][8];  // dy, x * rstd; 0 off the row
#pragma unroll
    for (int i = 0; i < kFusedChunks; ++i) {
      const int c = r + i * kRowThreads;
      if (live && c < chunks) {
        LoadF32x8(dy + off + 8 * c, g[i]);
        LoadBf16x8(x + off + 8 * c, xhat[i]);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) g[i][k] = xhat[i][k] = 0.f;
      }
    }
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kFusedChunks; ++i) {
      const int c = r + i * kRowThreads;
      if (c >= chunks) continue;
      float wv[8];
      LoadF32x8(w + 8 * c, wv);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        xhat[i][k] *= rstd;
        dot += g[i][k] * wv[k] * xhat[i][k];
        dw[i][k] += g[i][k] * xhat[i][k];
      }
    }
    dot = WarpSum(dot);
    if constexpr (kWarpsPerRow > 1) {
      // A buffer is rewritten two iterations later, after the next
      // iteration's barrier, which every thread passes only once done reading.
      float* part = warp_dot[it & 1];
      if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = dot;
      __syncthreads();
      dot = 0.f;
#pragma unroll
      for (int q = 0; q < kWarpsPerRow; ++q) dot += part[group * kWarpsPerRow + q];
    }
    const float mean_dot = dot / hidden;
    if (!live) continue;
#pragma unroll
    for (int i = 0; i < kFusedChunks; ++i) {
      const int c = r + i * kRowThreads;
      if (c >= chunks) continue;
      float wv[8], d[8];
      LoadF32x8(w + 8 * c, wv);
      if (accumulate_residual) {
        LoadF32x8(dres + off + 8 * c, d);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) d[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) d[k] += rstd * (g[i][k] * wv[k] - xhat[i][k] * mean_dot);
      StoreF32x8(dres + off + 8 * c, d);
      StoreBf16x8(dres_bf16 + off + 8 * c, d);
    }
  }
#pragma unroll
  for (int i = 0; i < kFusedChunks; ++i) {
    const int c = r + i * kRowThreads;
    if (c < chunks) StoreF32x8(group_dw + group * hidden + 8 * c, dw[i]);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < hidden; j += kFusedThreads) {
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < kRowsPerBlock; ++q) s += group_dw[q * hidden + j];
    partial[static_cast<int64_t>(blockIdx.x) * hidden + j] = s;
  }
}

Status CheckShape(int tokens, int hidden) {
  if (tokens < 0) return Status::InvalidArgument("RMSNorm: tokens < 0");
  if (hidden <= 0 || hidden % 8 != 0 || hidden > kRmsNormMaxHidden)
    return Status::InvalidArgument("RMSNorm: hidden must be a positive multiple of 8, at most " +
                                   std::to_string(kRmsNormMaxHidden) + ", got " +
                                   std::to_string(hidden));
  return Status::OK();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Status LaunchStatus(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

int BackwardBlocks(int tokens) {
  return std::max(1, std::min(kMaxBlocks, (tokens + kWarps - 1) / kWarps));
}

}  // namespace

Status RmsNormForward(const __nv_bfloat16* x, const float* weight, __nv_bfloat16* y, float* rstd,
                      int tokens, int hidden, float eps, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape(tokens, hidden));
  if (!(eps > 0.f)) return Status::InvalidArgument("RMSNorm: eps must be positive");
  if (tokens == 0) return Status::OK();
  if (!x || !weight || !y || !Aligned16(x) || !Aligned16(weight) || !Aligned16(y))
    return Status::InvalidArgument("RMSNorm: x, weight, y must be non-null and 16-byte aligned");
  const int blocks = std::min((tokens + kWarps - 1) / kWarps, 65535);
  RmsNormForwardKernel<<<blocks, kWarps * 32, 0, stream>>>(x, weight, y, rstd, tokens, hidden,
                                                           eps);
  return LaunchStatus("RMSNorm forward launch");
}

size_t RmsNormBackwardWorkspaceBytes(int tokens, int hidden) {
  return static_cast<size_t>(BackwardBlocks(tokens)) * std::max(hidden, 0) * sizeof(float);
}

Status RmsNormBackward(const __nv_bfloat16* dy, const __nv_bfloat16* x, const float* weight,
                       const float* rstd, __nv_bfloat16* dx, float* dweight, void* workspace,
                       int tokens, int hidden, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape(tokens, hidden));
  if (!weight || !dweight) return Status::InvalidArgument("RMSNorm backward: null weight/dweight");
  if (tokens == 0) {
    // No rows: the gradient of the weight is zero.
    if (cudaMemsetAsync(dweight, 0, sizeof(float) * hidden, stream) != cudaSuccess)
      return LaunchStatus("RMSNorm backward memset");
    return Status::OK();
  }
  if (!dy || !x || !rstd || !dx || !workspace || !Aligned16(dy) || !Aligned16(x) ||
      !Aligned16(weight) || !Aligned16(dx) || !Aligned16(workspace))
    return Status::InvalidArgument(
        "RMSNorm backward: pointers must be non-null and 16-byte aligned");
  const int blocks = BackwardBlocks(tokens);
  const size_t smem = static_cast<size_t>(kWarps) * hidden * sizeof(float);
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(RmsNormBackwardKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess)
    return LaunchStatus("RMSNorm backward shared memory attribute");
  float* partial = static_cast<float*>(workspace);
  RmsNormBackwardKernel<<<blocks, kWarps * 32, smem, stream>>>(dy, x, weight, rstd, dx, partial,
                                                               tokens, hidden);
  GROVE_RETURN_IF_ERROR(LaunchStatus("RMSNorm backward launch"));
  SumPartialsKernel<<<(hidden + 31) / 32, 1024, 0, stream>>>(partial, blocks, hidden, dweight,
                                                              /*accumulate=*/false);
  return LaunchStatus("RMSNorm weight-gradient reduction launch");
}

namespace {

// Fewest warps per row that hold the row (rows <= 1024 wide: one warp);
// the grid at most BackwardBlocks(tokens), the blocks the workspace holds.
template <int kWarpsPerRow>
Status LaunchBackwardResidual(const RmsNormBackwardResidualArgs& a, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kFusedThreads / (32 * kWarpsPerRow);
  if (a.hidden > 32 * kWarpsPerRow * kFusedChunks * 8) {
    if constexpr (kWarpsPerRow < kFusedThreads / 32) {
      return LaunchBackwardResidual<2 * kWarpsPerRow>(a, stream);
    } else {
      return Status::Internal("RMSNorm backward: row wider than a block holds");
    }
  }
  const int blocks =
      std::min(BackwardBlocks(a.tokens), (a.tokens + kRowsPerBlock - 1) / kRowsPerBlock);
  const size_t smem = static_cast<size_t>(kRowsPerBlock) * a.hidden * sizeof(float);
  float* partial = static_cast<float*>(a.workspace);
  RmsNormBackwardResidualKernel<kWarpsPerRow><<<blocks, kFusedThreads, smem, stream>>>(
      a.dy, a.x, a.weight, a.rstd, a.dres, a.dres_bf16, partial, a.tokens, a.hidden,
      a.accumulate_residual);
  GROVE_RETURN_IF_ERROR(LaunchStatus("RMSNorm backward (residual) launch"));
  SumPartialsKernel<<<(a.hidden + 31) / 32, 1024, 0, stream>>>(partial, blocks, a.hidden,
                                                                 a.grad_w,
                                                                 a.accumulate_weight_grad);
  return LaunchStatus("RMSNorm weight-gradient reduction launch");
}

}  // namespace

Status RmsNormBackwardResidual(const RmsNormBackwardResidualArgs& a, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape(a.tokens, a.hidden));
  if (!a.grad_w) return Status::InvalidArgument("RMSNorm backward: null grad_w");
  if (a.tokens == 0) {
    // No rows: the weight's gradient is zero.
    if (!a.accumulate_weight_grad &&
        cudaMemsetAsync(a.grad_w, 0, sizeof(float) * a.hidden, stream) != cudaSuccess)
      return LaunchStatus("RMSNorm backward memset");
    return Status::OK();
  }
  if (!a.dy || !a.x || !a.weight || !a.rstd || !a.dres || !a.dres_bf16 || !a.workspace ||
      !Aligned16(a.dy) || !Aligned16(a.x) || !Aligned16(a.weight) || !Aligned16(a.dres) ||
      !Aligned16(a.dres_bf16) || !Aligned16(a.workspace))
    return Status::InvalidArgument(
        "RMSNorm backward: pointers must be non-null and 16-byte aligned");
  return LaunchBackwardResidual<1>(a, stream);
}

}  // namespace grove::kernels
