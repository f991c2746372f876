// Thread-block clusters (sm_90+): rank, cluster-wide barrier, addressing a
// peer CTA's shared memory, arriving on a peer's mbarrier, and the TMA load
// that multicasts one box into several CTAs of the cluster.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "kernels/ptx/common.cuh"

namespace grove::ptx {

// %cluster_ctarank: this CTA's index inside its cluster.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

// barrier.cluster.arrive.release + barrier.cluster.wait.acquire: every
// thread of every CTA in the cluster must execute it (none may have exited).
// The non-.aligned form, so threads of a warp may arrive at different times.
__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release;\n"
      "barrier.cluster.wait.acquire;\n" ::
          : "memory");
}

// mapa.shared::cluster: the shared::cluster address of the variable at
// `smem_ptr` in the CTA of rank `cta_rank`.
__device__ __forceinline__ uint32_t mapa_shared_cluster(const void* smem_ptr, uint32_t cta_rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(out)
               : "r"(smem_addr(smem_ptr)), "r"(cta_rank));
  return out;
}

// mbarrier.arrive.release.cluster.shared::cluster.b64: one arrival on an
// mbarrier of any CTA in the cluster (address from mapa_shared_cluster).
__device__ __forceinline__ void mbarrier_arrive_cluster(uint32_t cluster_bar_addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(
                   cluster_bar_addr)
               : "memory");
}

// cp.async.bulk.tensor.2d...multicast::cluster: one TMA load of the box at
// (c0, c1) written to the same shared-memory offset `smem_dst` in every CTA
// whose bit is set in `cta_mask`, each signalling its own mbarrier at the
// offset of `bar`.
__device__ __forceinline__ void cp_async_bulk_tensor_2d_g2s_multicast(
    void* smem_dst, const CUtensorMap* tensor_map, int32_t c0, int32_t c1, uint64_t* bar,
    uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(smem_addr(bar)),
      "h"(cta_mask)
      : "memory");
}

}  // namespace grove::ptx
