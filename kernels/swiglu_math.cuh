// SwiGLU's per-element arithmetic (fp32), shared by the elementwise kernels
// (swiglu.cu) and the grouped GEMM's fused forward and backward epilogues,
// so that they compute the same function the same way (the same bits).
#pragma once

namespace grove::kernels {

// The fast division (rcp.approx, 2 ulp; 0 for 1 + e^-x past 2^126, where
// the sigmoid is below 2^-126 anyway): the IEEE one is a ~10-instruction
// sequence that set the pace of the fused SwiGLU-forward epilogue's storers
// (grouped_gemm_wgmma.cu). Either is far inside the bf16 rounding every
// caller applies next.
__device__ __forceinline__ float SwiGluSigmoid(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

// h = silu(g) * u.
__device__ __forceinline__ float SwiGluForwardElement(float g, float u) {
  return g * SwiGluSigmoid(g) * u;
}

// dg = dh * u * silu'(g), du = dh * silu(g), with
// silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
__device__ __forceinline__ void SwiGluBackwardElement(float dh, float g, float u, float& dg,
                                                      float& du) {
  const float s = SwiGluSigmoid(g);
  dg = dh * u * s * (1.f + g * (1.f - s));
  du = dh * (g * s);
}

// silu(g) with the accurate expf, as the rollout engine's decode computes it
// (its SwiGLU kernels, the MoE decode slabs and the persistent decode step
// share it, so they give the same bits).
__device__ __forceinline__ float SiluExact(float g) { return g / (1.f + expf(-g)); }

}  // namespace grove::kernels
