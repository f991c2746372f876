// One thread streaming global memory into a ring of shared-memory slots
// with 1-D bulk copies (sm_90), at most `in_flight` copies outstanding: the
// HBM read ceiling (hbm_read.cu) and the streaming side of the load-latency
// probe (dataflow_step.cu). Device code.
#pragma once

#include <cstdint>

#include "kernels/ptx/mbarrier.cuh"
#include "kernels/ptx/tma.cuh"

namespace grove::bench {

// kSlots slots of slot_bytes at `ring`, an mbarrier each at `bars` (shared
// memory); in_flight in [1, kSlots]. Used by one thread.
template <int kSlots>
struct BulkReadRing {
  uint8_t* ring;
  uint64_t* bars;
  uint32_t slot_bytes;
  uint32_t in_flight;
  uint32_t issued = 0;

  __device__ void Init() {
    for (int i = 0; i < kSlots; ++i) ptx::mbarrier_init(&bars[i], 1);
    ptx::fence_mbarrier_init();
  }
  // Copies slot_bytes from src into the next slot once the copy in_flight
  // back has landed (which is also, or came after, that slot's last use).
  __device__ void Read(const void* src) {
    if (issued >= in_flight) Wait(issued - in_flight);
    const uint32_t slot = issued % kSlots;
    ptx::mbarrier_arrive_expect_tx(&bars[slot], slot_bytes);
    ptx::cp_async_bulk_g2s(ring + size_t(slot) * slot_bytes, src, slot_bytes, &bars[slot]);
    ++issued;
  }
  // Every copy landed (none may be in flight when the block exits).
  __device__ void Drain() {
    for (uint32_t b = issued > in_flight ? issued - in_flight : 0; b < issued; ++b) Wait(b);
  }

 private:
  __device__ void Wait(uint32_t copy) { ptx::mbarrier_wait_parity(&bars[copy % kSlots], (copy / kSlots) & 1u); }
};

}  // namespace grove::bench
