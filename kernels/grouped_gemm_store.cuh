// Epilogue helper shared by the grouped GEMM kernels: stores two adjacent
// fp32 accumulators (columns col, col + 1; col even, row stride a multiple
// of 8) as float2 or bf16x2.
#pragma once

#include <cuda_bf16.h>

namespace grove::kernels::detail {

__device__ __forceinline__ void StorePair(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}

__device__ __forceinline__ void StorePair(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

}  // namespace grove::kernels::detail
