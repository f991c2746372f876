// mma.sync: the warp-level tensor-core matrix multiply (sm_80+).
#pragma once

#include <cstdint>

namespace grove::ptx {

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d = a * b + c for one
// warp, a 16x16 bf16 (row-major), b 16x8 bf16 (column-major, i.e. stored
// [n][k]), c/d 16x8 fp32. Fragment layout (g = lane / 4, q = lane % 4):
//   a[0]: row g,   k 2q..2q+1    a[1]: row g+8, k 2q..2q+1
//   a[2]: row g,   k 2q+8..+9    a[3]: row g+8, k 2q+8..+9
//   b[0]: k 2q..2q+1, col g       b[1]: k 2q+8..+9, col g
//   d[0..1]: row g, cols 2q..2q+1;  d[2..3]: row g+8, cols 2q..2q+1
// Each uint32_t holds two bf16, the lower k (or column) in the low half.
__device__ __forceinline__ void mma_m16n8k16_bf16_f32(float (&d)[4], const uint32_t (&a)[4],
                                                      const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace grove::ptx
