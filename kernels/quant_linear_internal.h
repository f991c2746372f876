// Internal to QuantLinear: its two kernels by name, for the tests and the
// benchmark that compare them. QuantLinear is QuantLinearOnPath(kAuto, ...).
#pragma once

#include "kernels/quant_linear.h"

namespace grove::kernels::detail {

enum class QuantLinearPath {
  kAuto,        // kCudaCore for m == 1, kTensorCore otherwise
  kCudaCore,    // kernels/quant_gemv.cuh: fp32 FMAs on w = q * scale, kDefaultGemvRows (2) rows per warp
  kTensorCore,  // mma.sync m16n8k16 on bf16 q (exact), scales applied to the fp32 sums
  // The CUDA-core GEMV with 1 or 4 weight rows per warp (fewer: more blocks
  // for small n; more: more 16-byte loads in flight per lane). The same bits
  // as kCudaCore (a row's FMAs and reduction order do not depend on it); for
  // the benchmark to pick kDefaultGemvRows (quant_linear.cu) from.
  kCudaCoreRows1,
  kCudaCoreRows4,
};

Status QuantLinearOnPath(QuantLinearPath path, const __nv_bfloat16* x, int64_t ldx, int64_t m, const QuantWeight& w,
                         float* y, int64_t ldy, Accumulate mode, cudaStream_t stream);

}  // namespace grove::kernels::detail
