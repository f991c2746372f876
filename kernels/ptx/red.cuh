// Reductions into global memory without a result (fire and forget).
#pragma once

namespace grove::ptx {

// red.global.add.v2.f32 (sm_90): *ptr += x, *(ptr + 1) += y, done in L2;
// ptr 8-byte aligned. The thread does not wait for the old values (a plain
// read-modify-write costs it a round trip to memory). Each add is atomic per
// element and rounds to nearest even, so one add per element per launch
// gives the bits of a load, an fp32 add and a store (subnormal operands or
// results aside, which atomic float adds may flush to zero).
__device__ __forceinline__ void red_global_add_v2_f32(float* ptr, float x, float y) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(ptr), "f"(x), "f"(y) : "memory");
}

}  // namespace grove::ptx
