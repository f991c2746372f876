// Token permutation to experts and back, for the grouped expert GEMM.
//
// A token t routed to experts ids[t, 0..top_k) owns the "slots" t*top_k + j.
// MoeRouteIndex groups the slots by expert into "rows" 0..tokens*top_k:
// rows of expert e are expert_offsets[e] .. expert_offsets[e+1]-1 (the layout
// GroupedGemm takes), ordered inside an expert by slot (a stable counting
// sort: the result is a function of ids alone, deterministic). Then
//   MoePermute:         a[r] = x[slot_of_row[r] / top_k]           (gather)
//   MoeCombine:         y[t] (+)= sum_j gates[t,j] * c[row_of_slot[t*top_k+j]]
//   MoeCombineBackward: dc[row_of_slot[t*k+j]] = gates[t,j] * dy[t],
//                       dgates[t,j] = dot(dy[t], c[row_of_slot[t*k+j]])
//   MoePermuteBackward: dx[t] (+)= sum_j da[row_of_slot[t*top_k+j]]
// which are model/moe.h's dispatch, gated sum and their gradients. Sums are
// fp32 with one rounding to bf16 at the end (with accumulate, the old value
// of y / dx is part of that fp32 sum).
//
// Device pointers; bf16 tensors 16-byte aligned with hidden a multiple of 8.
// No host sync anywhere. Contract the kernels cannot check without a sync:
// ids < experts (MoeRouteIndex drops an out-of-range slot: its row_of_slot
// is -1 and every later kernel treats it as gate 0 / no row), and the index
// arrays come from MoeRouteIndex for the same tokens and top_k.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

inline constexpr int kMoeMaxExperts = 256;

size_t MoeRouteIndexWorkspaceBytes(int tokens, int top_k, int experts);

// ids uint16 [tokens, top_k] -> expert_offsets int32 [experts + 1],
// row_of_slot int32 [tokens * top_k], slot_of_row int32 [tokens * top_k]
// (inverse permutation; entries past expert_offsets[experts] are -1 when
// slots were dropped), expert_load int32 [experts] (rows per expert; may be
// null). experts in 1..kMoeMaxExperts.
Status MoeRouteIndex(const uint16_t* ids, int tokens, int top_k, int experts, void* workspace,
                     size_t workspace_bytes, int32_t* expert_offsets, int32_t* row_of_slot, int32_t* slot_of_row,
                     int32_t* expert_load, cudaStream_t stream);

// MoeRouteIndex in one launch (one block) for small batches: the same
// outputs bit for bit, no workspace; tokens * top_k must be at most
// kMoeRouteIndexOneBlockSlots (InvalidArgument otherwise). For decode steps,
// where the three launches of MoeRouteIndex cost more than the work.
inline constexpr int kMoeRouteIndexOneBlockSlots = 256;
Status MoeRouteIndexOneBlock(const uint16_t* ids, int tokens, int top_k, int experts, int32_t* expert_offsets,
                             int32_t* row_of_slot, int32_t* slot_of_row, int32_t* expert_load, cudaStream_t stream);

// x [tokens, hidden] -> a [rows, hidden], rows = tokens * top_k; both index
// arrays from MoeRouteIndex (a row no slot points at is zeroed).
Status MoePermute(const __nv_bfloat16* x, const int32_t* row_of_slot, const int32_t* slot_of_row, __nv_bfloat16* a,
                  int rows, int top_k, int hidden, cudaStream_t stream);

// c [rows, hidden] (expert outputs), gates fp32 [tokens, top_k] -> y [tokens, hidden].
Status MoeCombine(const __nv_bfloat16* c, const float* gates, const int32_t* row_of_slot, __nv_bfloat16* y,
                  bool accumulate, int tokens, int top_k, int hidden, cudaStream_t stream);

// dy [tokens, hidden] -> dc [rows, hidden] bf16 (overwritten), dgates fp32
// [tokens, top_k] (overwritten; dot products in fp32).
Status MoeCombineBackward(const __nv_bfloat16* dy, const __nv_bfloat16* c, const float* gates,
                          const int32_t* row_of_slot, __nv_bfloat16* dc, float* dgates, int tokens, int top_k,
                          int hidden, cudaStream_t stream);

// da [rows, hidden] -> dx [tokens, hidden].
Status MoePermuteBackward(const __nv_bfloat16* da, const int32_t* row_of_slot, __nv_bfloat16* dx, bool accumulate,
                          int tokens, int top_k, int hidden, cudaStream_t stream);

}  // namespace grove::kernels
