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
// flight.)
__global__ void SumPartialsKernel(const float* __restrict__ partial, int blocks, int hidden,
                                  float* __restrict__ out) {
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
    out[j] = total;
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
  SumPartialsKernel<<<(hidden + 31) / 32, 1024, 0, stream>>>(partial, blocks, hidden, dweight);
  return LaunchStatus("RMSNorm weight-gradient reduction launch");
}

}  // namespace grove::kernels
