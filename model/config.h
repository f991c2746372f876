// ModelConfig: every size and switch of the MoE transformer, read from the
// [model] section of a TOML experiment file.
//
// Contract: FromConfig() rejects unknown keys (typos) and inconsistent sizes
// with InvalidArgument naming the key; a returned config is always valid.
// ToJson()/FromJson() round-trip exactly; checkpoints carry the JSON.
#pragma once

#include <cstdint>
#include <string>

#include "base/config.h"
#include "base/result.h"

namespace grove::model {

enum class ScoreFunc { kSoftmax, kSigmoid };

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden = 0;          // residual width H
  int64_t layers = 0;
  int64_t heads = 0;           // query heads
  int64_t kv_heads = 0;        // key/value heads (GQA); divides heads
  int64_t head_dim = 0;        // even (RoPE rotates pairs)
  int64_t max_seq_len = 0;     // longest sequence (prompt + completion)
  double rope_base = 10000.0;
  double norm_eps = 1e-6;
  int64_t dense_layers = 0;    // the first `dense_layers` layers use a dense SwiGLU
  int64_t dense_hidden = 0;    // SwiGLU width of the dense layers
  int64_t experts = 0;         // routed experts per MoE layer (0: every layer dense)
  int64_t top_k = 0;           // routed experts per token
  int64_t shared_experts = 0;  // always-on experts per MoE layer
  int64_t expert_hidden = 0;   // SwiGLU width of one expert (routed and shared)
  ScoreFunc score_func = ScoreFunc::kSoftmax;
  bool norm_topk = false;      // gate = score / sum of selected scores
  double route_scale = 1.0;    // multiplies every routed gate
  double balance_alpha = 0.0;  // sequence-wise balance loss weight (0: off)
  double bias_gamma = 1e-3;    // aux-loss-free bias update step
  double init_std = 0.02;

  static Result<ModelConfig> FromConfig(const Config& model_section);
  // Loads `path` and reads its [model] section.
  static Result<ModelConfig> LoadFile(const std::string& path);
  static Result<ModelConfig> FromJson(const std::string& json);
  std::string ToJson() const;
  Status Validate() const;

  int64_t moe_layers() const { return experts > 0 ? layers - dense_layers : 0; }
  bool is_moe_layer(int64_t layer) const { return experts > 0 && layer >= dense_layers; }
  // Index of `layer` among the MoE layers (-1 for a dense layer).
  int64_t moe_index(int64_t layer) const { return is_moe_layer(layer) ? layer - dense_layers : -1; }
  // Parameters used for one token (embedding row and lm head counted in full).
  int64_t ActiveParams() const;
};

}  // namespace grove::model
