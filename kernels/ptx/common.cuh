// Small helpers the PTX wrappers share: shared-memory addresses as the
// 32-bit values PTX's .shared state space takes.
#pragma once

#include <cstdint>

namespace grove::ptx {

// The .shared::cta address of a generic pointer into shared memory
// (cvta.to.shared). Every wrapper that names shared memory takes this form.
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

}  // namespace grove::ptx
