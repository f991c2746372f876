// Release/acquire accesses at GPU scope, for grid-wide synchronization
// between the blocks of one persistent kernel (kernels/decode_step.cu's
// grid barrier). A block's threads order their writes before its thread 0's
// release add by a CTA barrier; the reader's thread 0 acquires, then a CTA
// barrier orders the rest of its block after it (PTX memory model:
// causality through bar.sync and morally strong release/acquire pairs).
#pragma once

#include <cstdint>

namespace grove::ptx {

// red.release.gpu.global.add.u32: *p += v, releasing this thread's (and,
// cumulatively, what it has observed of its CTA's) earlier writes.
__device__ __forceinline__ void red_release_gpu_add(uint32_t* p, uint32_t v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// ld.acquire.gpu.global.u32: later accesses of this thread are ordered after it.
__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

}  // namespace grove::ptx
