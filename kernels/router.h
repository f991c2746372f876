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
  const uint16_t* replay_ids = nullptr; // [tokens, top_k] (row stride replay_stride); null = select
  float* scores = nullptr;              // [tokens, experts] out (kept for backward)
  uint16_t* ids = nullptr;              // [tokens, top_k] out, in selection order
  float* gates = nullptr;               // [tokens, top_k] out
  int tokens = 0;
  int experts = 0;                      // 1..kRouterMaxExperts
  int top_k = 0;                        // 1..min(experts, kRouterMaxTopK)
  bool sigmoid = false;                 // false: softmax
  bool norm_topk = false;
  float route_scale = 1.f;
  // Row stride of ids and gates in elements; 0 means top_k. Larger leaves
  // columns top_k.. of each row untouched (the rollout engine keeps its
  // shared experts' constant ids/gates there for the fused MoE).
  int out_stride = 0;
  // Optional second copy of the ids, row stride ids_copy_stride (>= top_k):
  // the rollout engine's per-layer routes record, written here instead of by
  // a separate copy.
  uint16_t* ids_copy = nullptr;
  int ids_copy_stride = 0;
  // Row stride of replay_ids in elements; 0 means top_k. The learner
  // uploads a batch's replayed routes as the requests hold them, [token]
  // [moe layer][top_k], and each layer reads its slice with stride
  // layers * top_k (no transposition on the host).
  int replay_stride = 0;
};

// Replayed ids must be < experts (checked on the device: an out-of-range id
// gives gate 0 and is written back as given).
Status RouterTopK(const RouterArgs& args, cudaStream_t stream);

// RouterTopK's argument checks (InvalidArgument naming the bad field), for
// other kernels that route (quant_linear.h's RouterTail).
Status CheckRouterArgs(const RouterArgs& args);

// The gradient of RouterTopK's gates with respect to the logits, as
// model/moe.h's MoeBackward computes it: the selection is a constant, the
// bias never gets a gradient. Per token, d/ds at the chosen experts
// (norm_topk: scale * (dgate_j - sum_i dgate_i s_i / z) / z with z the sum of
// the chosen scores; else scale * dgate_j), plus, when balance_alpha > 0, the
// sequence-wise balance loss alpha * sum_e f_e P_e through P (P_e = mean over
// the sequence of s_e / sum s), then through the sigmoid or the softmax.
// fp32, one warp per token; deterministic (the balance counts are integer
// atomics).
struct RouterBackwardArgs {
  const float* scores = nullptr;    // [tokens, experts] from RouterTopK
  const uint16_t* ids = nullptr;    // [tokens, top_k] from RouterTopK
  const float* dgates = nullptr;    // [tokens, top_k]
  float* dlogits = nullptr;         // [tokens, experts] out (overwritten)
  int tokens = 0;
  int experts = 0;
  int top_k = 0;
  bool sigmoid = false;
  bool norm_topk = false;
  float route_scale = 1.f;
  // Balance loss (model/moe.h, DeepSeek-V3 sequence-wise): 0 = off. When on,
  // seq_offsets int32 [sequences + 1] on the device partition the tokens
  // (seq_offsets[0] = 0, non-decreasing, seq_offsets[sequences] = tokens:
  // the caller's contract) and the workspace holds
  // RouterBackwardWorkspaceBytes(sequences, tokens, experts).
  float balance_alpha = 0.f;
  const int32_t* seq_offsets = nullptr;
  int sequences = 0;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // Optional (needs balance_alpha > 0): the balance loss's value, alpha *
  // sum over sequences of sum_e f_e P_e (what MoeForward returns), written
  // to this device float for logging. Per-token terms in fp32, summed in
  // double in a fixed order.
  float* balance_loss = nullptr;
};

size_t RouterBackwardWorkspaceBytes(int sequences, int tokens, int experts);

Status RouterBackward(const RouterBackwardArgs& args, cudaStream_t stream);

}  // namespace grove::kernels
