// The bit recipes that turn packed int4 / int8 weights into floats in
// registers, written once for both sides: the device kernels call them with
// lop3/prmt (kernels/ptx/bit_ops.cuh), and the host compiles the same recipe
// against a software twin of each instruction, which the CPU tests check
// exhaustively against rollout/'s quantizers (tests/kernels/quant_unpack_test.cc).
//
// int4 (rollout/int4_quantizer.h's layout): a word holds 8 columns, nibble i
// = column kInt4NibbleOrder[i] = {0,2,4,6,1,3,5,7}, offset-binary u = q + 8.
//   pair k (k = 0..3) = lop3((word >> 4k), 0x000F000F, 0x43004300, (a&b)|c)
// is the bf16 pair (128 + u_{2k}, 128 + u_{2k+1}) (0x4300 is bf16 128.0 whose
// last mantissa bit weighs 1, so OR-ing u in adds it), and subtracting the
// bf16 pair (136, 136) gives (q_{2k}, q_{2k+1}) exactly. bf16 -> fp32 is a
// 16-bit shift (low half) or a mask (high half).
//
// int8 (row-major int8): byte i of a word is column i. prmt with b =
// 0x4B000000 (fp32 2^23) and selector 0x7540 | i builds the fp32 whose
// mantissa low byte is byte i of (word ^ 0x80808080), i.e. 2^23 + q + 128;
// subtracting 2^23 + 128 gives q exactly.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>

#include "kernels/ptx/bit_ops.cuh"
#define GROVE_QUANT_HD __host__ __device__ __forceinline__
#else
#define GROVE_QUANT_HD inline
#endif

namespace grove::kernels {

inline constexpr uint32_t kLop3AndOr = 0xEA;  // (a & b) | c
inline constexpr uint32_t kInt4PairMask = 0x000F000Fu;
inline constexpr uint32_t kBf16Pair128 = 0x43004300u;  // bf16 (128, 128)
inline constexpr uint32_t kBf16Pair136 = 0x43084308u;  // bf16 (136, 136)
inline constexpr uint32_t kF32Two23 = 0x4B000000u;     // fp32 2^23
inline constexpr float kF32Two23Plus128 = 8388736.0f;  // 2^23 + 128

// Software lop3.b32: bit j of the result is bit ((a_j << 2) | (b_j << 1) |
// c_j) of the truth table.
GROVE_QUANT_HD uint32_t Lop3Host(uint32_t lut, uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
  for (int j = 0; j < 32; ++j) {
    const uint32_t idx = (((a >> j) & 1u) << 2) | (((b >> j) & 1u) << 1) | ((c >> j) & 1u);
    d |= ((lut >> idx) & 1u) << j;
  }
  return d;
}

// Software prmt.b32 (default mode), as documented in bit_ops.cuh.
GROVE_QUANT_HD uint32_t PrmtHost(uint32_t a, uint32_t b, uint32_t selector) {
  const uint64_t bytes = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nib = (selector >> (4 * i)) & 0xFu;
    uint32_t byte = static_cast<uint32_t>(bytes >> (8 * (nib & 7u))) & 0xFFu;
    if (nib & 8u) byte = (byte & 0x80u) ? 0xFFu : 0x00u;
    d |= byte << (8 * i);
  }
  return d;
}

GROVE_QUANT_HD float BitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// bf16 bits -> fp32 (exact): the low and the high half of a bf16 pair.
GROVE_QUANT_HD float Bf16LowToFloat(uint32_t pair) { return BitsToFloat(pair << 16); }
GROVE_QUANT_HD float Bf16HighToFloat(uint32_t pair) { return BitsToFloat(pair & 0xFFFF0000u); }

// Step 1 of int4: the bf16 pair (128 + u_{2k}, 128 + u_{2k+1}), k = 0..3.
GROVE_QUANT_HD uint32_t Int4BiasedPair(uint32_t word, int k) {
#if defined(__CUDA_ARCH__)
  return ptx::lop3_b32<kLop3AndOr>(word >> (4 * k), kInt4PairMask, kBf16Pair128);
#else
  return Lop3Host(kLop3AndOr, word >> (4 * k), kInt4PairMask, kBf16Pair128);
#endif
}

// Step 2 of int4: bf16x2 subtract of (136, 136): the bf16 pair (q_{2k},
// q_{2k+1}). Exact on both sides: the operands and the difference are small
// integers, which bf16 holds exactly (the host twin computes in fp32 and
// truncates, exact for the same reason).
GROVE_QUANT_HD uint32_t Bf16PairMinus136(uint32_t biased) {
#if defined(__CUDA_ARCH__)
  __nv_bfloat162 v, c;
  std::memcpy(&v, &biased, 4);
  const uint32_t c_bits = kBf16Pair136;
  std::memcpy(&c, &c_bits, 4);
  const __nv_bfloat162 d = __hsub2(v, c);
  uint32_t out;
  std::memcpy(&out, &d, 4);
  return out;
#else
  const float lo = Bf16LowToFloat(biased) - 136.0f, hi = Bf16HighToFloat(biased) - 136.0f;
  uint32_t lo_bits, hi_bits;
  std::memcpy(&lo_bits, &lo, 4);
  std::memcpy(&hi_bits, &hi, 4);
  return (lo_bits >> 16) | (hi_bits & 0xFFFF0000u);
#endif
}

// One int4 word -> its 8 columns' q as bf16 pairs: pairs[k] = (q_{2k}, q_{2k+1}).
GROVE_QUANT_HD void Int4WordToBf16Pairs(uint32_t word, uint32_t (&pairs)[4]) {
  for (int k = 0; k < 4; ++k) pairs[k] = Bf16PairMinus136(Int4BiasedPair(word, k));
}

// One int4 word -> its 8 columns' q as fp32, in column order.
GROVE_QUANT_HD void Int4WordToFloats(uint32_t word, float (&q)[8]) {
  for (int k = 0; k < 4; ++k) {
    const uint32_t pair = Bf16PairMinus136(Int4BiasedPair(word, k));
    q[2 * k] = Bf16LowToFloat(pair);
    q[2 * k + 1] = Bf16HighToFloat(pair);
  }
}

// Byte i (0..3) of an int8x4 word as fp32, exact.
GROVE_QUANT_HD float Int8ByteToFloat(uint32_t word, int i) {
  const uint32_t offset = word ^ 0x80808080u;  // q + 128 per byte
#if defined(__CUDA_ARCH__)
  const uint32_t bits = ptx::prmt_b32(offset, kF32Two23, 0x7540u | static_cast<uint32_t>(i));
#else
  const uint32_t bits = PrmtHost(offset, kF32Two23, 0x7540u | static_cast<uint32_t>(i));
#endif
  return BitsToFloat(bits) - kF32Two23Plus128;
}

// One int8x4 word -> its 4 columns as fp32, in column order.
GROVE_QUANT_HD void Int8WordToFloats(uint32_t word, float (&q)[4]) {
  for (int i = 0; i < 4; ++i) q[i] = Int8ByteToFloat(word, i);
}

// Eight bf16 (a 16-byte chunk as four words) -> fp32, in column order.
GROVE_QUANT_HD void Bf16WordsToFloats(const uint32_t (&w)[4], float (&v)[8]) {
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = Bf16LowToFloat(w[k]);
    v[2 * k + 1] = Bf16HighToFloat(w[k]);
  }
}

}  // namespace grove::kernels
