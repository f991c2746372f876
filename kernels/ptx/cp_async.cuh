// cp.async: asynchronous 16-byte copies global -> shared (sm_80+), grouped
// and waited on per thread.
#pragma once

#include <cstdint>

#include "kernels/ptx/common.cuh"

namespace grove::ptx {

// cp.async.ca.shared.global, 16 bytes, cached in L1 and L2.
__device__ __forceinline__ void cp_async_ca_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src)
               : "memory");
}

// cp.async.cg.shared.global, 16 bytes, cached in L2 only (streamed tiles).
__device__ __forceinline__ void cp_async_cg_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src)
               : "memory");
}

// cp.async.cg with a source size: copies `src_bytes` (0..16) and fills the
// rest of the 16 bytes with zeros. src_bytes == 0 reads nothing, so
// `gmem_src` may then be any valid-looking address (it is not dereferenced).
__device__ __forceinline__ void cp_async_cg_16_zfill(void* smem_dst, const void* gmem_src,
                                                     uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

// cp.async.ca with a source size, 4 bytes: copies `src_bytes` (0 or 4) and
// zero-fills the rest (a single fp32 whose source may be only 4-byte aligned).
__device__ __forceinline__ void cp_async_ca_4_zfill(void* smem_dst, const void* gmem_src,
                                                    uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

// cp.async.commit_group: closes the group of this thread's copies issued so far.
__device__ __forceinline__ void cp_async_commit_group() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// cp.async.wait_group N: waits until at most N of this thread's groups are
// still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// cp.async.wait_all: waits for every copy this thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

}  // namespace grove::ptx
