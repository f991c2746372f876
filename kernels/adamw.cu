#include "kernels/adamw.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace grove::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void AdamWKernel(float* __restrict__ param, const float* __restrict__ grad,
                            float* __restrict__ m, float* __restrict__ v,
                            __nv_bfloat16* __restrict__ param_bf16, int64_t quads, float lr,
                            float beta1, float beta2, float eps, float wd, float inv_bc1,
                            float inv_bc2, float grad_scale) {
  for (int64_t q = blockIdx.x * int64_t{kThreads} + threadIdx.x; q < quads;
       q += int64_t{gridDim.x} * kThreads) {
    float4 p = reinterpret_cast<float4*>(param)[q];
    const float4 g = reinterpret_cast<const float4*>(grad)[q];
    float4 mm = reinterpret_cast<float4*>(m)[q];
    float4 vv = reinterpret_cast<float4*>(v)[q];
    float* pp = &p.x;
    const float* gg = &g.x;
    float* mp = &mm.x;
    float* vp = &vv.x;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float gi = grad_scale * gg[i];
      mp[i] = beta1 * mp[i] + (1.f - beta1) * gi;
      vp[i] = beta2 * vp[i] + (1.f - beta2) * gi * gi;
      const float update = (mp[i] * inv_bc1) / (sqrtf(vp[i] * inv_bc2) + eps);
      pp[i] -= lr * (update + wd * pp[i]);
    }
    reinterpret_cast<float4*>(param)[q] = p;
    reinterpret_cast<float4*>(m)[q] = mm;
    reinterpret_cast<float4*>(v)[q] = vv;
    if (param_bf16) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(p.x, p.y), hi = __floats2bfloat162_rn(p.z, p.w);
      uint2 raw;
      raw.x = *reinterpret_cast<const uint32_t*>(&lo);
      raw.y = *reinterpret_cast<const uint32_t*>(&hi);
      reinterpret_cast<uint2*>(param_bf16)[q] = raw;
    }
  }
}

bool Aligned16(const void* p) { return p && reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

Status AdamWStep(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                 __nv_bfloat16* param_bf16, int64_t count, const AdamWHyper& h,
                 cudaStream_t stream) {
  if (count < 0 || count % 4 != 0)
    return Status::InvalidArgument("AdamW: count must be a non-negative multiple of 4, got " +
                                   std::to_string(count));
  if (h.step < 1) return Status::InvalidArgument("AdamW: step must be >= 1");
  if (!(h.beta1 >= 0.f && h.beta1 < 1.f && h.beta2 >= 0.f && h.beta2 < 1.f && h.eps > 0.f &&
        h.lr >= 0.f && h.weight_decay >= 0.f && h.grad_scale >= 0.f && std::isfinite(h.grad_scale)))
    return Status::InvalidArgument("AdamW: hyperparameters out of range");
  if (count == 0) return Status::OK();
  if (!Aligned16(param) || !Aligned16(grad) || !Aligned16(exp_avg) || !Aligned16(exp_avg_sq) ||
      (param_bf16 && reinterpret_cast<uintptr_t>(param_bf16) % 8 != 0))
    return Status::InvalidArgument("AdamW: buffers must be non-null and 16-byte aligned");
  // Bias corrections in double: 1 - beta^t loses everything in fp32 at small t.
  const float inv_bc1 = static_cast<float>(1.0 / (1.0 - std::pow(double{h.beta1}, double(h.step))));
  const float inv_bc2 = static_cast<float>(1.0 / (1.0 - std::pow(double{h.beta2}, double(h.step))));
  const int64_t quads = count / 4;
  // One quad per thread: a grid the size of the data, not a grid-stride loop
  // over a few blocks per SM. On an H100 (1.07e9 params, 2026-11-24) the full
  // grid moved 99.5% of the device copy rate, 132 x 8 / 16 / 32 blocks
  // looping 92-93% (kernel_bench's AdamW row: 92.8% -> 98.6%). The loop stays
  // for grids past the limit.
  const int blocks = static_cast<int>(std::min<int64_t>((quads + kThreads - 1) / kThreads, int64_t{1} << 30));
  AdamWKernel<<<blocks, kThreads, 0, stream>>>(param, grad, exp_avg, exp_avg_sq, param_bf16, quads,
                                               h.lr, h.beta1, h.beta2, h.eps, h.weight_decay,
                                               inv_bc1, inv_bc2, h.grad_scale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return Status::Internal(std::string("AdamW launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace grove::kernels
