// The MoE router after its logits GEMM, as model/moe.h defines it: per token
// t, scores s = softmax(logits_t) or sigmoid(logits_t); the experts are the
// top_k of s + bias (ties: lower id), or the replayed ids when given; gate_j
// = s_{id_j} (norm_topk: divided by the sum of the selected scores) *
// route_scale. The bias only steers selection. One warp per token, fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

inline constexpr int kRouterMaxExperts = 256;
inline constexpr int kRouterMaxTopK = 16;

struct RouterArgs {
  const float* logits = nullptr;        // [tokens, experts]
  const float* bias = nullptr;          // [experts]; null = no bias
  const uint16_t* replay_ids = nullptr; // [tokens, top_k]; null = select
  float* scores = nullptr;              // [tokens, experts] out (kept for backward)
  uint16_t* ids = nullptr;              // [tokens, top_k] out, in selection order
  float* gates = nullptr;               // [tokens, top_k] out
  int tokens = 0;
  int experts = 0;                      // 1..kRouterMaxExperts
  int top_k = 0;                        // 1..min(experts, kRouterMaxTopK)
  bool sigmoid = false;                 // false: softmax
  bool norm_topk = false;
  float route_scale = 1.f;
};

// Replayed ids must be < experts (checked on the device: an out-of-range id
// gives gate 0 and is written back as given).
Status RouterTopK(const RouterArgs& args, cudaStream_t stream);

}  // namespace grove::kernels
