// Cache prefetch hints.
#pragma once

#include <cstdint>

namespace grove::ptx {

// prefetch.global.L2: brings the 128-byte line holding `ptr` (global memory)
// into L2. A hint: no register result, no fault semantics to rely on, so only
// addresses inside an allocation should be passed.
__device__ __forceinline__ void prefetch_global_L2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(ptr));
}

// cp.async.bulk.prefetch.L2 (sm_90): brings `bytes` of global memory from
// `ptr` into L2, asynchronously, one instruction for the whole range (ptr
// 16-byte aligned, bytes a multiple of 16). A hint like the above.
__device__ __forceinline__ void prefetch_bulk_L2(const void* ptr, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(ptr), "r"(bytes) : "memory");
}

}  // namespace grove::ptx
