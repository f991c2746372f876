// The rotary embedding's rotation of one pair, shared by kernels::RopeForward
// / RopeBackward (rope.cu) and the grouped GEMM's rotary epilogue, which must
// give the same bits: the products and sums are spelled out with _rn
// intrinsics so that nvcc cannot contract them into FMAs differently in the
// two places.
#pragma once

namespace grove::kernels {

// base^(-2i/head_dim) in double: the frequency of pair i, one expression
// for every place that computes angles (RopeKernel, RopeTableKernel).
__device__ __forceinline__ double RopeInvFreq(int i, int head_dim, double base) {
  return pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
}

// (x, y) = (a cos - b sin, a sin + b cos) in fp32.
__device__ __forceinline__ void RotatePair(float a, float b, float cos_a, float sin_a, float& x, float& y) {
  x = __fsub_rn(__fmul_rn(a, cos_a), __fmul_rn(b, sin_a));
  y = __fadd_rn(__fmul_rn(a, sin_a), __fmul_rn(b, cos_a));
}

}  // namespace grove::kernels
