// Bit-manipulation instructions for unpacking quantized weights in registers.
#pragma once

#include <cstdint>

namespace grove::ptx {

// lop3.b32: d = LUT(a, b, c) bit by bit, where the 8-bit immediate kLut is the
// truth table indexed by (a << 2) | (b << 1) | c with a = 0xF0, b = 0xCC,
// c = 0xAA (e.g. (a & b) | c is (0xF0 & 0xCC) | 0xAA = 0xEA).
template <uint32_t kLut>
__device__ __forceinline__ uint32_t lop3_b32(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(kLut <= 0xFF, "lop3 takes an 8-bit truth table");
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return d;
}

// prmt.b32 (default mode): byte i of d is byte (selector nibble i) of the
// 8-byte value {b, a} (bytes 0-3 from a, 4-7 from b); a nibble with bit 3 set
// replicates the sign bit of the byte it selects instead.
__device__ __forceinline__ uint32_t prmt_b32(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

}  // namespace grove::ptx
