// cp.async.bulk.tensor: the Hopper tensor memory accelerator (TMA), copying
// a box of a tensor described by a CUtensorMap from global to shared memory
// and completing on an mbarrier (sm_90+). Host side: kernels/ptx/tensor_map.h.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "kernels/ptx/common.cuh"

namespace grove::ptx {

// cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes:
// copies the box at (c0 innermost, c1) into `smem_dst` (aligned as the map's
// swizzle needs: 1024 bytes for 128B swizzle) and signals its byte count on
// `bar`. Out-of-range elements of the box are written as zeros and still
// count towards the bytes.
__device__ __forceinline__ void cp_async_bulk_tensor_2d_g2s(void* smem_dst,
                                                            const CUtensorMap* tensor_map,
                                                            int32_t c0, int32_t c1,
                                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
}

// cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes: copies
// `bytes` contiguous bytes (a multiple of 16; both addresses 16-byte
// aligned) from global memory into `smem_dst` and signals them on `bar`; no
// tensor map (a 1-D bulk copy).
__device__ __forceinline__ void cp_async_bulk_g2s(void* smem_dst, const void* gmem_src, uint32_t bytes,
                                                  uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(gmem_src)), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// The same for a 3-D tensor map: the box at (c0 innermost, c1, c2).
__device__ __forceinline__ void cp_async_bulk_tensor_3d_g2s(void* smem_dst,
                                                            const CUtensorMap* tensor_map,
                                                            int32_t c0, int32_t c1, int32_t c2,
                                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2),
      "r"(smem_addr(bar))
      : "memory");
}

// cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group:
// adds the box at `smem_src` (laid out and aligned as the map's swizzle
// says) into global memory at (c0 innermost, c1), element-wise, in the
// map's data type; elements outside the tensor are dropped. Asynchronous:
// commit with cp_async_bulk_commit_group and wait (at least for the reads of
// `smem_src`) with cp_async_bulk_wait_group_read before reusing the buffer.
// The caller orders its generic-proxy writes of `smem_src` first
// (fence_proxy_async_shared_cta, then a barrier with the writers).
__device__ __forceinline__ void cp_reduce_async_bulk_tensor_2d_s2g_add(const CUtensorMap* tensor_map,
                                                                      int32_t c0, int32_t c1,
                                                                      const void* smem_src) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%1, %2}], [%3];\n" ::"l"(reinterpret_cast<uint64_t>(tensor_map)),
      "r"(c0), "r"(c1), "r"(smem_addr(smem_src))
      : "memory");
}

// cp.async.bulk.commit_group: closes this thread's bulk-group of the bulk
// stores / reductions issued since the last commit.
__device__ __forceinline__ void cp_async_bulk_commit_group() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// cp.async.bulk.wait_group.read N: waits until at most N of this thread's
// bulk-groups still read their shared-memory sources.
template <int N>
__device__ __forceinline__ void cp_async_bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// cp.async.bulk.wait_group N: waits until at most N of this thread's
// bulk-groups are incomplete (their global writes done).
template <int N>
__device__ __forceinline__ void cp_async_bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// prefetch.tensormap: pulls a __grid_constant__ tensor map into the
// descriptor cache ahead of its first use.
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* tensor_map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tensor_map))
               : "memory");
}

// fence.proxy.async.shared::cta: orders this thread's ordinary shared-memory
// writes before later reads by the async proxy (wgmma operands, TMA stores).
__device__ __forceinline__ void fence_proxy_async_shared_cta() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace grove::ptx
