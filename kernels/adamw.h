// Fused AdamW step over one flat fp32 parameter buffer (decoupled weight
// decay, bias-corrected moments), optionally writing the bf16 compute copy
// of the updated parameters in the same pass. The gradient is read scaled,
// g = grad_scale * grad (gradient clipping folded in: the buffer itself is
// left unscaled, which saves a whole read-modify-write pass over it):
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)
// Device pointers, 16-byte aligned; count a multiple of 4; step t >= 1.
//
// With bf16 moments (the second overload) m and v are computed in fp32 from
// the stored values, the parameter is updated with those, and they are
// stored rounded stochastically with kernels/stochastic_round.h's bits for
// global index index_base + i and the step (learner::AdamW's on the host):
// 22 bytes of traffic a parameter instead of 30.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

struct AdamWHyper {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.f;
  int64_t step = 1;  // 1 for the first update
  float grad_scale = 1.f;  // finite, >= 0 (e.g. max_norm / norm when clipping)
};

// param, exp_avg (m) and exp_avg_sq (v) are updated in place; grad is read;
// param_bf16 (may be null) receives the updated parameters rounded to bf16.
Status AdamWStep(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                 __nv_bfloat16* param_bf16, int64_t count, const AdamWHyper& hyper,
                 cudaStream_t stream);
// m and v 8-byte aligned here; index_base a multiple of 4.
Status AdamWStep(float* param, const float* grad, __nv_bfloat16* exp_avg, __nv_bfloat16* exp_avg_sq,
                 __nv_bfloat16* param_bf16, int64_t count, int64_t index_base, const AdamWHyper& hyper,
                 cudaStream_t stream);

}  // namespace grove::kernels
