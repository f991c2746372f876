// The rollout engine's one-row decode step (batch 1) as one persistent
// kernel: embedding, every layer (fused RMSNorm + QKV, RoPE + KV append +
// split-KV attention, wo, RMSNorm + router + top-k, the MoE with its shared
// experts folded in, or a dense SwiGLU), the final norm and the lm_head,
// with grid-wide barriers between the stages instead of ~10 launches a
// layer. At batch 1 every launch costs ~5 us of launch, ramp and drain
// against 0.4-2 us of weight bytes (docs/rollout.md); here the stages meet at
// a barrier of ~1 us and every block streams its share of each weight with
// many 16-byte loads in flight.
//
// Same bits as the multi-launch step it replaces (rollout/gpu_generator.cc's
// Forward at rows == 1 with fuse_rmsnorm, split-KV attention with the fused
// append through the warp-walk chunk kernel (split_kv_tiled off:
// PagedAttentionSplitWalk), and the shared experts folded): every output row's sum is the
// gemv core's (kernels/quant_gemv.cuh: a row's value depends only on the
// row, x and k), attention is paged_kv_device.cuh's chunk function, the top-k
// is router_topk.cuh's warp, and the MoE's combine adds the slots' gated
// partials in slot order as MoeDecodeForward's combine does.
//
// Host header, no device code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"
#include "kernels/paged_kv.h"
#include "kernels/quant_linear.h"

namespace grove::kernels {

// The kernel's stages, as DecodeStepArgs::stage_clock names them.
enum class DecodeStage : int32_t {
  kStart = 0,      // the kernel began (no stage ends here)
  kEmbed,
  kQkv,            // RMSNorm + QKV linear
  kAttention,      // RoPE + KV append + split-KV chunks
  kMerge,          // the chunks' merge (long contexts; else inside kWo)
  kWo,
  kDenseW13,       // RMSNorm + dense W1|W3
  kDenseW2,        // SwiGLU + dense W2
  kRouterShared,   // RMSNorm + router logits + the shared experts' up projection
  kExpertUp,       // top-k + the routed experts' up projection
  kExpertDown,     // every slot's W2 + the gated combine
  kLmHead,         // final RMSNorm + lm_head
  kCount,
};
const char* DecodeStageName(DecodeStage stage);
// Most stage ends one launch records (16 layers x 7 stages, + 3).
inline constexpr int kDecodeStepMaxMarks = 256;

// One layer as the kernel reads it (an array of these in device memory).
struct DecodeStepLayer {
  QuantWeight qkv;  // [heads * hd + 2 * kv_heads * hd, hidden]: q | k | v rows
  QuantWeight wo;   // [hidden, heads * hd]
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  PagedKvCache kv;
  int32_t moe = 0;  // 0: dense SwiGLU (w13, w2); 1: MoE (router, w1 / w3 / w2 arrays)
  QuantWeight w13;  // dense: [2F, hidden], W1's rows then W3's
  QuantWeight w2;   // dense: [hidden, F]
  QuantWeight router;  // MoE: [experts, hidden]
  const float* router_bias = nullptr;  // [experts] or null
  // Device arrays [experts + shared_experts]: routed expert e, then the
  // shared experts as experts experts.. (gate 1, every token).
  const QuantWeight* expert_w1 = nullptr;  // [expert_hidden, hidden]; w3 the same shape and format
  const QuantWeight* expert_w3 = nullptr;
  const QuantWeight* expert_w2 = nullptr;  // [hidden, expert_hidden]
  uint16_t* routes = nullptr;       // optional: the top_k chosen ids also written here
};

struct DecodeStepArgs {
  const DecodeStepLayer* layers = nullptr;  // device array of num_layers
  int num_layers = 0;
  int hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  int experts = 0, top_k = 0, shared_experts = 0, expert_hidden = 0, dense_hidden = 0;
  float norm_eps = 0.f;
  bool sigmoid = false, norm_topk = false;
  float route_scale = 1.f;
  float attn_scale = 0.f;  // 0: 1 / sqrt(head_dim)

  const int32_t* token = nullptr;  // [1]; outside [0, vocab): a zero embedding
  PagedRows row;                   // rows == 1
  int max_pos = 0;                 // split-KV chunk bound (PagedAttentionSplitWalk's)
  const float* embed = nullptr;    // fp32 [vocab, hidden]
  const float* rope_cos = nullptr;
  const float* rope_sin = nullptr;
  const float* final_norm = nullptr;
  QuantWeight lm_head;  // [vocab, hidden]

  float* x = nullptr;       // [hidden]: the residual stream (out: after the last layer)
  float* logits = nullptr;  // [vocab] out
  // MoE outputs of the last MoE layer as the multi-launch step leaves them:
  // scores [experts]; ids / gates [top_k + shared_experts] (the shared
  // columns experts + s, gate 1).
  float* router_scores = nullptr;
  uint16_t* ids = nullptr;
  float* gates = nullptr;

  // Optional: device uint64 [2 * kDecodeStepMaxMarks]; block 0 writes (stage,
  // %globaltimer ns) pairs, one at the start and one at each stage's end
  // (after its grid barrier), for profiling (decode_bench --step_stages).
  uint64_t* stage_clock = nullptr;

  // DecodeStepWorkspaceBytes(*this) bytes, 256-byte aligned, zeroed once
  // before the first launch (the kernel leaves its barrier counters at zero).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

size_t DecodeStepWorkspaceBytes(const DecodeStepArgs& a);

// Whether the model's shapes are supported and the kernel fits an SM of the
// current device (InvalidArgument naming what does not); pointers are not
// looked at. For choosing this path before any weights are loaded.
Status DecodeStepFits(const DecodeStepArgs& a);

// Checks shapes and pointers (InvalidArgument), then launches. Limits:
// hidden, heads * head_dim, dense_hidden and expert_hidden multiples of 128
// (at most 8192), head_dim 32 / 64 / 128, top_k + shared_experts <= 16,
// experts <= kRouterMaxExperts. One cooperative launch (all blocks
// resident); graph-capturable.
Status DecodeStepOneRow(const DecodeStepArgs& a, cudaStream_t stream);

}  // namespace grove::kernels
