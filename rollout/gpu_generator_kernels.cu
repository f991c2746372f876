#include "rollout/gpu_generator_kernels.h"

#include <string>

#include "kernels/launch.cuh"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/rmsnorm_row.cuh"
#include "kernels/swiglu_math.cuh"

namespace grove::rollout::gpu {
namespace {

constexpr int kNormThreads = kernels::kRmsNormRowThreads;

// Every kernel here may be launched with programmatic dependent launch
// (kernels/launch.cuh): each waits for its predecessor before touching memory.
__device__ __forceinline__ void WaitForPredecessor() {
  ptx::griddepcontrol_wait();
  ptx::griddepcontrol_launch_dependents();
}

Status LaunchStatus(const char* who, cudaError_t launch = cudaSuccess) {
  const cudaError_t err = launch != cudaSuccess ? launch : cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string(who) + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

__global__ void EmbedKernel(const int32_t* tokens, const float* table, float* x, int vocab, int hidden) {
  WaitForPredecessor();
  const int r = blockIdx.x;
  const int t = tokens[r];
  float* xr = x + int64_t(r) * hidden;
  const bool ok = t >= 0 && t < vocab;
  const float* src = table + int64_t(ok ? t : 0) * hidden;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) xr[j] = ok ? src[j] : 0.f;
}

__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(const float* x, const float* w, bf16* y, int hidden, float eps) {
  __shared__ float part[kNormThreads / 32];
  WaitForPredecessor();
  const int r = blockIdx.x;
  const float* xr = x + int64_t(r) * hidden;
  const float rstd = kernels::BlockRowRstd<kNormThreads>(xr, hidden, eps, part);
  bf16* yr = y + int64_t(r) * hidden;
  for (int j = threadIdx.x; j < hidden; j += kNormThreads) yr[j] = __float2bfloat16(xr[j] * rstd * w[j]);
}

__global__ void SwiGluKernel(const float* ab, int width, bf16* h, int64_t count) {
  WaitForPredecessor();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, j = i % width;
    const float g = ab[r * 2 * width + j], u = ab[r * 2 * width + width + j];
    h[i] = __float2bfloat16(kernels::SiluExact(g) * u);
  }
}

__global__ void GatherKernel(const bf16* src, const int32_t* index, bf16* dst, int hidden) {
  WaitForPredecessor();
  const int r = blockIdx.x;
  const bf16* s = src + int64_t(index[r]) * hidden;
  bf16* d = dst + int64_t(r) * hidden;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) d[j] = s[j];
}

}  // namespace

Status EmbedRows(const int32_t* tokens, const float* table, float* x, int rows, int vocab, int hidden,
                 cudaStream_t stream) {
  if (rows == 0) return Status::OK();
  return LaunchStatus("EmbedRows", kernels::LaunchKernel(EmbedKernel, dim3(rows), dim3(256), 0, stream, tokens, table,
                                                         x, vocab, hidden));
}

Status RmsNormRows(const float* x, const float* w, bf16* y, int rows, int hidden, float eps, cudaStream_t stream) {
  if (rows == 0) return Status::OK();
  return LaunchStatus("RmsNormRows", kernels::LaunchKernel(RmsNormKernel, dim3(rows), dim3(kNormThreads), 0, stream,
                                                           x, w, y, hidden, eps));
}

Status SwiGluRows(const float* ab, int rows, int width, bf16* h, cudaStream_t stream) {
  const int64_t count = int64_t(rows) * width;
  if (count == 0) return Status::OK();
  const int64_t blocks = (count + 255) / 256;
  return LaunchStatus("SwiGluRows", kernels::LaunchKernel(SwiGluKernel, dim3(unsigned(blocks < 4096 ? blocks : 4096)),
                                                          dim3(256), 0, stream, ab, width, h, count));
}

Status GatherRows(const bf16* src, const int32_t* index, bf16* dst, int rows, int hidden, cudaStream_t stream) {
  if (rows == 0) return Status::OK();
  return LaunchStatus("GatherRows",
                      kernels::LaunchKernel(GatherKernel, dim3(rows), dim3(256), 0, stream, src, index, dst, hidden));
}

}  // namespace grove::rollout::gpu
