// The one-block slot index of MoeRouteIndexOneBlock as a device function:
// the body of its kernel (moe_permute.cu) and the tail of the fused router
// GEMV (quant_linear.cu's RouterTail with an index), so both give the same
// index.
#pragma once

#include <cstdint>

#include "kernels/moe_permute.h"

namespace grove::kernels {

// One thread per slot: blockDim.x == kMoeRouteIndexOneBlockSlots, every
// thread of the block calls it, slots <= that. Histogram in shared memory,
// each expert's first row by a serial sum of the counts before it (<= 256
// terms), each slot's rank by counting the earlier slots of its expert (<=
// 255 shared reads, the same index across a warp: broadcasts). Rows by slot
// order inside an expert, as the three-launch path gives. ids are read
// through L2 (ld.cg), so a block may index ids it wrote itself before a
// __syncthreads.
__device__ __forceinline__ void RouteIndexOneBlock(const uint16_t* ids, int slots, int experts,
                                                   int32_t* expert_offsets, int32_t* row_of_slot,
                                                   int32_t* slot_of_row, int32_t* expert_load) {
  constexpr int kNone = 0xffff;  // a dropped slot (id >= experts)
  __shared__ int key[kMoeRouteIndexOneBlockSlots];
  __shared__ int32_t count[kMoeMaxExperts];
  __shared__ int32_t first[kMoeMaxExperts + 1];
  const int s = threadIdx.x;
  for (int e = s; e < experts; e += blockDim.x) count[e] = 0;
  int k = kNone;
  if (s < slots) {
    k = __ldcg(ids + s);
    if (k >= experts) k = kNone;
  }
  key[s] = k;
  __syncthreads();
  if (k != kNone) atomicAdd(&count[k], 1);
  __syncthreads();
  for (int e = s; e <= experts; e += blockDim.x) {
    int32_t run = 0;
    for (int i = 0; i < e; ++i) run += count[i];
    first[e] = run;
  }
  __syncthreads();
  for (int e = s; e <= experts; e += blockDim.x) {
    expert_offsets[e] = first[e];
    if (expert_load && e < experts) expert_load[e] = count[e];
  }
  if (s >= slots) return;
  if (k == kNone) {
    row_of_slot[s] = -1;
  } else {
    int32_t rank = 0;
    for (int i = 0; i < s; ++i) rank += key[i] == k;
    const int32_t row = first[k] + rank;
    row_of_slot[s] = row;
    slot_of_row[row] = s;
  }
  // Rows past the total belong to dropped slots: no slot. (Row s here; the
  // scatter above writes only rows below the total.)
  if (s >= first[experts]) slot_of_row[s] = -1;
}

}  // namespace grove::kernels
