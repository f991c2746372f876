// ParamLayout: where every named tensor of the model lives in the one flat
// float buffer that holds all parameters (and, with the same layout, the
// gradient and any optimizer state).
//
// Tensor names (L = layer index, e = expert index), shapes row-major, a
// Linear weight stored [out, in] (y = x W^T):
//   embed                         [vocab, hidden]
//   layers.L.attn_norm            [hidden]               RMSNorm weight
//   layers.L.attn.wq              [heads*head_dim, hidden]
//   layers.L.attn.wk / .wv        [kv_heads*head_dim, hidden]
//   layers.L.attn.wo              [hidden, heads*head_dim]
//   layers.L.ffn_norm             [hidden]
//   dense layers:   layers.L.mlp.w1 / .w3 [dense_hidden, hidden] (gate / up), .w2 [hidden, dense_hidden]
//   MoE layers:     layers.L.moe.router      [experts, hidden]
//                   layers.L.moe.router_bias [experts]   selection bias, NOT trainable
//                   layers.L.moe.experts.e.w1 / .w3 [expert_hidden, hidden], .w2 [hidden, expert_hidden]
//                   layers.L.moe.shared.w1 / .w3 [shared_experts*expert_hidden, hidden],
//                   layers.L.moe.shared.w2 [hidden, shared_experts*expert_hidden]
//                   (the shared experts side by side: their sum is one wider SwiGLU)
//   norm                          [hidden]               final RMSNorm
//   lm_head                       [vocab, hidden]        untied from embed
// Tensors are laid out in this order, densely, offsets in elements.
// `trainable` is false only for router_bias: its gradient is always zero and
// an optimizer must leave it alone (it moves by UpdateRouterBias()).
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/config.h"

namespace grove::model {

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;  // elements from the buffer start
  int64_t numel = 0;
  bool trainable = true;
};

class ParamLayout {
 public:
  ParamLayout() = default;
  explicit ParamLayout(const ModelConfig& config);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  int64_t total() const { return total_; }
  // nullptr when absent.
  const TensorInfo* Find(const std::string& name) const;
  // Offset of a tensor that must exist (model-internal names only).
  int64_t Offset(const std::string& name) const;

 private:
  void Add(std::string name, std::vector<int64_t> shape, bool trainable = true);
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  int64_t total_ = 0;
};

}  // namespace grove::model
