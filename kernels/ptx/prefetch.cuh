// Cache prefetch hints.
#pragma once

namespace grove::ptx {

// prefetch.global.L2: brings the 128-byte line holding `ptr` (global memory)
// into L2. A hint: no register result, no fault semantics to rely on, so only
// addresses inside an allocation should be passed.
__device__ __forceinline__ void prefetch_global_L2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(ptr));
}

}  // namespace grove::ptx
