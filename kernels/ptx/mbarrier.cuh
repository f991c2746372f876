// mbarrier: the shared-memory transaction barrier (sm_90 for the tx-count
// forms) that the bulk copy engine (TMA) and warp-specialized pipelines
// signal completion on. Phases alternate parity 0, 1, 0, ...
#pragma once

#include <cstdint>

#include "kernels/ptx/common.cuh"

namespace grove::ptx {

// mbarrier.init.shared::cta.b64: `arrivals` arrivals complete a phase.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals)
               : "memory");
}

// fence.mbarrier_init.release.cluster: makes mbarrier.init visible to the
// async proxy (TMA) and other threads; issue once after the inits, before
// the barrier that publishes them.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// mbarrier.arrive.shared::cta.b64: one arrival on the current phase.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile(
      "{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
          smem_addr(bar))
      : "memory");
}

// mbarrier.arrive.expect_tx.shared::cta.b64: one arrival, and the phase also
// waits for `tx_bytes` bytes of async copies completing on this barrier.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
  asm volatile(
      "{\n .reg .b64 state;\n"
      " mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(smem_addr(bar)),
      "r"(tx_bytes)
      : "memory");
}

// mbarrier.try_wait.parity.shared::cta.b64: true once the phase with the
// given parity has completed (a fresh barrier counts its phase "parity 1"
// as complete, so producers may wait parity 1 first on empty slots).
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Spins on mbarrier_try_wait_parity (each try already suspends the thread
// for a hardware-chosen time, so the loop does not hammer shared memory).
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait_parity(bar, parity)) {
  }
}

}  // namespace grove::ptx
