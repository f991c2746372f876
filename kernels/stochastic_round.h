// Rounding fp32 to bf16 stochastically, written once for the device's fused
// AdamW (kernels/adamw.cu) and the host's (learner/adamw.cc), which must
// draw the same random bits for the same element and step so that the two
// optimizers stay comparable.
//
// Why stochastic: AdamW's moments kept in bf16 (as DeepSeek-V3 trains) with
// round-to-nearest stop moving. v <- 0.999 v + 0.001 g^2 changes v by less
// than half a bf16 ulp (2^-9 relative) unless g^2 is far from v, so v never
// decays and barely grows. Rounding up with probability equal to the
// discarded fraction makes the stored value an unbiased estimate of the
// fp32 one, so the moments follow their fp32 recurrences in expectation.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GROVE_SR_HD __host__ __device__ __forceinline__
#else
#define GROVE_SR_HD inline
#endif

namespace grove::kernels {

// A 32-bit integer mixer (xor-shift-multiply, full avalanche); the
// constants are the published "lowbias32" ones.
GROVE_SR_HD uint32_t MixBits32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The random bits of parameter `index` at optimizer step `step`: a pure
// function of both, so any thread (or the host) draws the same ones. The
// low 16 bits round the first moment, the high 16 the second. `step_key`
// is StochasticRoundStepKey(step, index >> 32): computed once for a run of
// indices that share their high half.
GROVE_SR_HD uint32_t StochasticRoundStepKey(int64_t step, uint64_t index_high) {
  return MixBits32(static_cast<uint32_t>(step) * 0x9e3779b9u ^ MixBits32(static_cast<uint32_t>(index_high) + 0x632be5abu));
}
GROVE_SR_HD uint32_t StochasticRoundBits(uint32_t step_key, uint64_t index) {
  return MixBits32(static_cast<uint32_t>(index) ^ step_key);
}

GROVE_SR_HD uint32_t FloatBits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

GROVE_SR_HD float FloatFromBits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// The bf16 bits of x rounded away from zero with probability (the dropped
// 16 bits) / 2^16, toward zero otherwise, using the low 16 bits of
// `random`. Exact bf16 values come back unchanged; infinities stay
// infinite and NaNs stay NaN (quiet). A finite x within an ulp of the
// largest bf16 may round to infinity, as round-to-nearest would.
GROVE_SR_HD uint16_t Bf16StochasticRound(float x, uint32_t random) {
  const uint32_t bits = FloatBits(x);
  if ((bits & 0x7f800000u) == 0x7f800000u)  // inf or NaN: no carry into the exponent
    return static_cast<uint16_t>((bits >> 16) | ((bits & 0x007fffffu) ? 0x0040u : 0u));
  // Adding r < 2^16 to the magnitude carries into bit 16 exactly when the
  // dropped part plus r reaches 2^16: with probability dropped / 2^16.
  return static_cast<uint16_t>((bits + (random & 0xffffu)) >> 16);
}

// Round to nearest even, for moments loaded from fp32 (a checkpoint).
GROVE_SR_HD uint16_t Bf16RoundNearest(float x) {
  const uint32_t bits = FloatBits(x);
  if ((bits & 0x7f800000u) == 0x7f800000u)
    return static_cast<uint16_t>((bits >> 16) | ((bits & 0x007fffffu) ? 0x0040u : 0u));
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

GROVE_SR_HD float Bf16BitsToFloat(uint16_t b) { return FloatFromBits(static_cast<uint32_t>(b) << 16); }

}  // namespace grove::kernels
