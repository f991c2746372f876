#include "model/param_layout.h"

#include <glog/logging.h>

namespace grove::model {

void ParamLayout::Add(std::string name, std::vector<int64_t> shape, bool trainable) {
  TensorInfo t;
  t.numel = 1;
  for (int64_t d : shape) t.numel *= d;
  t.name = std::move(name);
  t.shape = std::move(shape);
  t.offset = total_;
  t.trainable = trainable;
  total_ += t.numel;
  index_[t.name] = tensors_.size();
  tensors_.push_back(std::move(t));
}

ParamLayout::ParamLayout(const ModelConfig& c) {
  const int64_t H = c.hidden, q = c.heads * c.head_dim, kv = c.kv_heads * c.head_dim;
  Add("embed", {c.vocab_size, H});
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    Add(p + "attn_norm", {H});
    Add(p + "attn.wq", {q, H});
    Add(p + "attn.wk", {kv, H});
    Add(p + "attn.wv", {kv, H});
    Add(p + "attn.wo", {H, q});
    Add(p + "ffn_norm", {H});
    if (!c.is_moe_layer(l)) {
      Add(p + "mlp.w1", {c.dense_hidden, H});
      Add(p + "mlp.w3", {c.dense_hidden, H});
      Add(p + "mlp.w2", {H, c.dense_hidden});
      continue;
    }
    Add(p + "moe.router", {c.experts, H});
    Add(p + "moe.router_bias", {c.experts}, /*trainable=*/false);
    for (int64_t e = 0; e < c.experts; ++e) {
      const std::string x = p + "moe.experts." + std::to_string(e) + ".";
      Add(x + "w1", {c.expert_hidden, H});
      Add(x + "w3", {c.expert_hidden, H});
      Add(x + "w2", {H, c.expert_hidden});
    }
    if (c.shared_experts > 0) {
      const int64_t F = c.shared_experts * c.expert_hidden;
      Add(p + "moe.shared.w1", {F, H});
      Add(p + "moe.shared.w3", {F, H});
      Add(p + "moe.shared.w2", {H, F});
    }
  }
  Add("norm", {H});
  Add("lm_head", {c.vocab_size, H});
}

const TensorInfo* ParamLayout::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

int64_t ParamLayout::Offset(const std::string& name) const {
  const TensorInfo* t = Find(name);
  CHECK(t != nullptr) << "no tensor " << name;
  return t->offset;
}

}  // namespace grove::model
