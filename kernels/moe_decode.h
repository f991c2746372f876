// The routed experts of one MoE layer for the rollout engine, every active
// expert in one launch per stage (no per-expert launch), weights in any
// QuantFormat per expert (the precision plan mixes them within a layer):
//
//   out[t] (+)= sum_j gates[t, j] * W2_e (silu(W1_e x_t) * (W3_e x_t)),
//   e = ids[t, j], j < top_k,
//
// x bf16 [m, hidden], ids/gates from kernels/router.h's RouterTopK, out fp32
// [m, hidden]. The hidden activation h is rounded to bf16 before W2 (as the
// training path does). Deterministic: the top_k contributions of a token are
// summed in slot order, no atomics on out.
//
// Shapes: hidden and expert_hidden multiples of 128 (at most 5120), experts
// in 1..256, top_k in 1..min(experts, 16). Contract the launch cannot check
// without a host sync: w1/w3[e] are [expert_hidden, hidden] and w2[e]
// [hidden, expert_hidden] in a valid format with 16-byte aligned data. An id
// >= experts drops its slot (it adds nothing). Shared experts can ride along
// as extra experts routed for every token with gate 1 (one launch for all).
//
// Host header, no device code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"
#include "kernels/quant_linear.h"

namespace grove::kernels {

struct MoeDecodeArgs {
  const __nv_bfloat16* x = nullptr;  // [m, hidden]
  const uint16_t* ids = nullptr;     // [m, top_k] expert ids (< experts)
  const float* gates = nullptr;      // [m, top_k]
  // Device arrays of `experts` QuantWeight each: w1/w3 [expert_hidden,
  // hidden], w2 [hidden, expert_hidden]; w1[e] and w3[e] in the same format.
  const QuantWeight* w1 = nullptr;
  const QuantWeight* w3 = nullptr;
  const QuantWeight* w2 = nullptr;
  float* out = nullptr;  // [m, hidden]
  Accumulate mode = Accumulate::kAdd;
  int m = 0, hidden = 0, expert_hidden = 0, experts = 0, top_k = 0;
  void* workspace = nullptr;  // MoeDecodeWorkspaceBytes bytes, 256-byte aligned
  size_t workspace_bytes = 0;
  // Profiling only (eager launches): when set, three events recorded on the
  // stream after the route indexing, after the up stage and after the down
  // stage, so a caller can time the four stages. Leave null in graphs.
  const cudaEvent_t* stage_events = nullptr;
  // Group the slots by expert with MoeRouteIndexOneBlock (one launch instead
  // of three; the same index, so the same result) when m * top_k <=
  // kMoeRouteIndexOneBlockSlots; larger m ignores it.
  bool one_launch_index = false;
  // The widest format among the experts' weights (bf16, then int8, then
  // int4): a hint for the CUDA-core launches' blocks per SM only (what each
  // format's slabs run fastest with, kernels/moe_decode.cu), so any value
  // gives the same results.
  QuantFormat widest_format = QuantFormat::kBF16;
  // The automatic choice of the tensor-core pair: taken when the slots
  // average at least this many per expert (m * top_k >= this * experts) and
  // the activation tiles fit; else the CUDA-core pair. Both are checked
  // against the same reference; they differ in fp32 summation order. 0 (the
  // default): the tensor-core pair at every batch -- on gpu-ref (H100) it
  // was the faster pair from 1 token up (bf16 batch 1 / 8 / 32: 0.824 /
  // 1.772 / 2.55 ms per decode step against 0.873 / 1.983 / 3.48 with the
  // CUDA-core pair below 4 slots per expert).
  int mma_min_slots_per_expert = 0;
  // 16-row weight tiles per block of the tensor-core pair: 1, 2 or 4 (hidden
  // and expert_hidden are multiples of 128, so any of them divides). Changes
  // the fp32 summation order (8 / tiles warps split k per tile). 2: on
  // gpu-ref (H100, decode_bench) 1 was 3% faster at batch 1 in bf16 but 4-9%
  // slower at batches 8-256, 4 another 0-5% faster at 8-256 in int8 / int4
  // but 6-13% slower at batch 1.
  int mma_tiles_per_block = 2;
  // The tensor-core up stage of calls with m <= this loads W1's and W3's
  // chunks together (one loop over both, 2 blocks an SM) instead of W1's,
  // then W3's (3 blocks an SM): the same bits, so chosen per call. 32: on
  // gpu-ref (H100, decode_bench) paired was 5% faster at batch 1 in bf16 (2%
  // in int4), level at 8-32, 2-3% slower at 128-256.
  int mma_paired_up_max_tokens = 32;
  // The tensor-core pair's blocks of int8 and int4 experts prefetch their
  // weight rows into L2 as soon as their expert is known, before staging
  // their activations (a hint: the same loads, so the same bits). Not bf16:
  // its blocks already stream near the read rate from batch 16 up, where
  // the prefetch cost 3-5% (H100, gpu-ref).
  bool mma_prefetch_rows = false;
  // Optional: the RMSNorm after this layer folded into the combine: each
  // token's block, once its out row is final, writes normed = bf16(out *
  // rstd * norm_weight) [m, hidden], exactly as the engine's RmsNormRows
  // (kernels/rmsnorm_row.cuh), so the same bits and one launch fewer. Both
  // set or both null.
  const float* norm_weight = nullptr;
  __nv_bfloat16* normed = nullptr;
  float norm_eps = 0.f;
  // Optional: an event the combine launch waits for (cudaStreamWaitEvent),
  // e.g. a producer on another stream that also adds into `out` and must do
  // so first; the route index and the up and down launches do not wait.
  cudaEvent_t combine_after = nullptr;
};

// The values MoeDecodeArgs::mma_tiles_per_block takes.
inline bool ValidMoeMmaTilesPerBlock(int tiles) { return tiles == 1 || tiles == 2 || tiles == 4; }

size_t MoeDecodeWorkspaceBytes(int m, int hidden, int expert_hidden, int experts, int top_k);

// Graph-capturable (no host sync, no allocation).
Status MoeDecodeForward(const MoeDecodeArgs& args, cudaStream_t stream);

}  // namespace grove::kernels
