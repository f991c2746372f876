// Internal to QuantLinear: its two kernels by name, for the tests and the
// benchmark that compare them. QuantLinear is QuantLinearOnPath(kAuto, ...).
#pragma once

#include "kernels/quant_linear.h"

namespace grove::kernels::detail {

enum class QuantLinearPath {
  kAuto,        // kCudaCore for m == 1, kTensorCore otherwise
  kCudaCore,    // kernels/quant_gemv.cuh: fp32 FMAs on w = q * scale, 2 rows per warp
  kTensorCore,  // mma.sync m16n8k16 on bf16 q (exact), scales applied to the fp32 sums
};

Status QuantLinearOnPath(QuantLinearPath path, const __nv_bfloat16* x, int64_t ldx, int64_t m, const QuantWeight& w,
                         float* y, int64_t ldy, Accumulate mode, cudaStream_t stream);

}  // namespace grove::kernels::detail
