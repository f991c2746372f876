// SwiGLU's per-element arithmetic (fp32), shared by the elementwise kernels
// (swiglu.cu) and the grouped GEMM's fused backward epilogue, so that both
// compute the same function the same way.
#pragma once

namespace grove::kernels {

__device__ __forceinline__ float SwiGluSigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

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
