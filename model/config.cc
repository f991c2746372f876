#include "model/config.h"

#include <cmath>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

namespace grove::model {
namespace {

const char* ScoreFuncName(ScoreFunc f) { return f == ScoreFunc::kSigmoid ? "sigmoid" : "softmax"; }

Result<ScoreFunc> ParseScoreFunc(const std::string& s) {
  if (s == "softmax") return ScoreFunc::kSoftmax;
  if (s == "sigmoid") return ScoreFunc::kSigmoid;
  return Status::InvalidArgument("model.score_func must be \"softmax\" or \"sigmoid\", got \"" + s + "\"");
}

}  // namespace

Status ModelConfig::Validate() const {
  auto need = [](bool ok, const std::string& what) {
    return ok ? Status::OK() : Status::InvalidArgument("model config: " + what);
  };
  GROVE_RETURN_IF_ERROR(need(vocab_size > 0, "vocab_size must be > 0"));
  GROVE_RETURN_IF_ERROR(need(hidden > 0, "hidden must be > 0"));
  GROVE_RETURN_IF_ERROR(need(layers > 0, "layers must be > 0"));
  GROVE_RETURN_IF_ERROR(need(heads > 0 && kv_heads > 0, "heads and kv_heads must be > 0"));
  GROVE_RETURN_IF_ERROR(need(heads % kv_heads == 0, "kv_heads must divide heads"));
  GROVE_RETURN_IF_ERROR(need(head_dim > 0 && head_dim % 2 == 0, "head_dim must be even and > 0"));
  GROVE_RETURN_IF_ERROR(need(max_seq_len > 1, "max_seq_len must be > 1"));
  GROVE_RETURN_IF_ERROR(need(rope_base > 1.0, "rope_base must be > 1"));
  GROVE_RETURN_IF_ERROR(need(norm_eps > 0.0, "norm_eps must be > 0"));
  GROVE_RETURN_IF_ERROR(need(dense_layers >= 0 && dense_layers <= layers, "dense_layers must be in [0, layers]"));
  GROVE_RETURN_IF_ERROR(need(experts >= 0 && experts <= 65535, "experts must be in [0, 65535]"));
  bool any_dense = dense_layers > 0 || experts == 0;
  GROVE_RETURN_IF_ERROR(need(!any_dense || dense_hidden > 0, "dense_hidden must be > 0 when a layer is dense"));
  if (experts > 0 && dense_layers < layers) {
    GROVE_RETURN_IF_ERROR(need(top_k > 0 && top_k <= experts, "top_k must be in [1, experts]"));
    GROVE_RETURN_IF_ERROR(need(expert_hidden > 0, "expert_hidden must be > 0"));
    GROVE_RETURN_IF_ERROR(need(shared_experts >= 0, "shared_experts must be >= 0"));
  }
  GROVE_RETURN_IF_ERROR(need(route_scale > 0.0, "route_scale must be > 0"));
  GROVE_RETURN_IF_ERROR(need(balance_alpha >= 0.0, "balance_alpha must be >= 0"));
  GROVE_RETURN_IF_ERROR(need(bias_gamma >= 0.0, "bias_gamma must be >= 0"));
  GROVE_RETURN_IF_ERROR(need(init_std > 0.0, "init_std must be > 0"));
  // Configs also arrive inside checkpoint files, so sizes are bounded before
  // anyone loops over layers and experts or multiplies sizes in int64: a
  // hostile or mistyped size is refused here instead of hanging ParamLayout,
  // overflowing ActiveParams or allocating without bound.
  GROVE_RETURN_IF_ERROR(need(std::isfinite(rope_base) && std::isfinite(norm_eps) && std::isfinite(route_scale) &&
                                 std::isfinite(balance_alpha) && std::isfinite(bias_gamma) && std::isfinite(init_std),
                             "rope_base, norm_eps, route_scale, balance_alpha, bias_gamma and init_std must be finite"));
  constexpr int64_t kMaxWidth = int64_t{1} << 24;  // any one width or the vocabulary
  const std::pair<int64_t, const char*> widths[] = {{vocab_size, "vocab_size"},   {hidden, "hidden"},
                                                    {head_dim, "head_dim"},       {max_seq_len, "max_seq_len"},
                                                    {dense_hidden, "dense_hidden"}, {expert_hidden, "expert_hidden"}};
  for (const auto& [value, name] : widths) {
    GROVE_RETURN_IF_ERROR(need(value <= kMaxWidth, std::string(name) + " must be <= " + std::to_string(kMaxWidth)));
  }
  GROVE_RETURN_IF_ERROR(need(layers <= 4096, "layers must be <= 4096"));
  GROVE_RETURN_IF_ERROR(need(heads <= 65536, "heads must be <= 65536"));
  GROVE_RETURN_IF_ERROR(need(top_k <= 65535 && shared_experts <= 65535, "top_k and shared_experts must be <= 65535"));
  // Every size is now small enough that these products are exact in double.
  const double moe = static_cast<double>(moe_layers());
  const double tensors = 1.0 + 12.0 * static_cast<double>(layers) + moe * 3.0 * static_cast<double>(experts);
  GROVE_RETURN_IF_ERROR(need(tensors <= double(int64_t{1} << 20), "layers x experts makes more than 2^20 tensors"));
  const double h = static_cast<double>(hidden);
  const double attn = h * static_cast<double>(heads + kv_heads) * static_cast<double>(head_dim) * 2 + 2 * h;
  const double dense = 3 * h * static_cast<double>(dense_hidden);
  const double expert = static_cast<double>(experts) * h +
                        3 * h * static_cast<double>(expert_hidden) * static_cast<double>(experts + shared_experts);
  const double total = 2 * static_cast<double>(vocab_size) * h + h + static_cast<double>(layers) * attn +
                       (static_cast<double>(layers) - moe) * dense + moe * expert;
  GROVE_RETURN_IF_ERROR(need(total <= double(int64_t{1} << 40), "the model has more than 2^40 parameters"));
  return Status::OK();
}

Result<ModelConfig> ModelConfig::FromConfig(const Config& m) {
  GROVE_RETURN_IF_ERROR(m.CheckKeys({"vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim",
                                     "max_seq_len", "rope_base", "norm_eps", "dense_layers", "dense_hidden",
                                     "experts", "top_k", "shared_experts", "expert_hidden", "score_func",
                                     "norm_topk", "route_scale", "balance_alpha", "bias_gamma", "init_std"}));
  ModelConfig c;
  GROVE_ASSIGN_OR_RETURN(c.vocab_size, m.Int("vocab_size"));
  GROVE_ASSIGN_OR_RETURN(c.hidden, m.Int("hidden"));
  GROVE_ASSIGN_OR_RETURN(c.layers, m.Int("layers"));
  GROVE_ASSIGN_OR_RETURN(c.heads, m.Int("heads"));
  GROVE_ASSIGN_OR_RETURN(c.kv_heads, m.Int("kv_heads", c.heads));
  GROVE_ASSIGN_OR_RETURN(c.head_dim, m.Int("head_dim", c.heads > 0 ? c.hidden / c.heads : 0));
  GROVE_ASSIGN_OR_RETURN(c.max_seq_len, m.Int("max_seq_len"));
  GROVE_ASSIGN_OR_RETURN(c.rope_base, m.Double("rope_base", 10000.0));
  GROVE_ASSIGN_OR_RETURN(c.norm_eps, m.Double("norm_eps", 1e-6));
  GROVE_ASSIGN_OR_RETURN(c.dense_layers, m.Int("dense_layers", 0));
  GROVE_ASSIGN_OR_RETURN(c.dense_hidden, m.Int("dense_hidden", 0));
  GROVE_ASSIGN_OR_RETURN(c.experts, m.Int("experts", 0));
  GROVE_ASSIGN_OR_RETURN(c.top_k, m.Int("top_k", 0));
  GROVE_ASSIGN_OR_RETURN(c.shared_experts, m.Int("shared_experts", 0));
  GROVE_ASSIGN_OR_RETURN(c.expert_hidden, m.Int("expert_hidden", 0));
  GROVE_ASSIGN_OR_RETURN(std::string sf, m.String("score_func", "softmax"));
  GROVE_ASSIGN_OR_RETURN(c.score_func, ParseScoreFunc(sf));
  GROVE_ASSIGN_OR_RETURN(c.norm_topk, m.Bool("norm_topk", c.score_func == ScoreFunc::kSigmoid));
  GROVE_ASSIGN_OR_RETURN(c.route_scale, m.Double("route_scale", 1.0));
  GROVE_ASSIGN_OR_RETURN(c.balance_alpha, m.Double("balance_alpha", 0.0));
  GROVE_ASSIGN_OR_RETURN(c.bias_gamma, m.Double("bias_gamma", 1e-3));
  GROVE_ASSIGN_OR_RETURN(c.init_std, m.Double("init_std", 0.02));
  GROVE_RETURN_IF_ERROR(c.Validate().WithContext(m.source()));
  return c;
}

Result<ModelConfig> ModelConfig::LoadFile(const std::string& path) {
  GROVE_ASSIGN_OR_RETURN(Config cfg, Config::LoadFile(path));
  if (!cfg.Has("model")) return Status::InvalidArgument(path + ": no [model] section");
  return FromConfig(cfg.Section("model"));
}

std::string ModelConfig::ToJson() const {
  nlohmann::ordered_json j;
  j["vocab_size"] = vocab_size; j["hidden"] = hidden; j["layers"] = layers; j["heads"] = heads;
  j["kv_heads"] = kv_heads; j["head_dim"] = head_dim; j["max_seq_len"] = max_seq_len;
  j["rope_base"] = rope_base; j["norm_eps"] = norm_eps; j["dense_layers"] = dense_layers;
  j["dense_hidden"] = dense_hidden; j["experts"] = experts; j["top_k"] = top_k;
  j["shared_experts"] = shared_experts; j["expert_hidden"] = expert_hidden;
  j["score_func"] = ScoreFuncName(score_func); j["norm_topk"] = norm_topk; j["route_scale"] = route_scale;
  j["balance_alpha"] = balance_alpha; j["bias_gamma"] = bias_gamma; j["init_std"] = init_std;
  return j.dump();
}

Result<ModelConfig> ModelConfig::FromJson(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Status::Corruption("model config JSON does not parse");
  ModelConfig c;
  try {
    c.vocab_size = j.at("vocab_size").get<int64_t>(); c.hidden = j.at("hidden").get<int64_t>();
    c.layers = j.at("layers").get<int64_t>(); c.heads = j.at("heads").get<int64_t>();
    c.kv_heads = j.at("kv_heads").get<int64_t>(); c.head_dim = j.at("head_dim").get<int64_t>();
    c.max_seq_len = j.at("max_seq_len").get<int64_t>(); c.rope_base = j.at("rope_base").get<double>();
    c.norm_eps = j.at("norm_eps").get<double>(); c.dense_layers = j.at("dense_layers").get<int64_t>();
    c.dense_hidden = j.at("dense_hidden").get<int64_t>(); c.experts = j.at("experts").get<int64_t>();
    c.top_k = j.at("top_k").get<int64_t>(); c.shared_experts = j.at("shared_experts").get<int64_t>();
    c.expert_hidden = j.at("expert_hidden").get<int64_t>();
    GROVE_ASSIGN_OR_RETURN(c.score_func, ParseScoreFunc(j.at("score_func").get<std::string>()));
    c.norm_topk = j.at("norm_topk").get<bool>(); c.route_scale = j.at("route_scale").get<double>();
    c.balance_alpha = j.at("balance_alpha").get<double>(); c.bias_gamma = j.at("bias_gamma").get<double>();
    c.init_std = j.at("init_std").get<double>();
  } catch (const nlohmann::json::exception& e) {
    return Status::Corruption(std::string("model config JSON: ") + e.what());
  }
  GROVE_RETURN_IF_ERROR(c.Validate());
  return c;
}

int64_t ModelConfig::ActiveParams() const {
  int64_t attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 2 * hidden;
  int64_t total = 2 * vocab_size * hidden + hidden;
  for (int64_t l = 0; l < layers; ++l) {
    total += attn;
    if (is_moe_layer(l)) {
      total += experts * hidden + 3 * hidden * expert_hidden * (top_k + shared_experts);
    } else {
      total += 3 * hidden * dense_hidden;
    }
  }
  return total;
}

}  // namespace grove::model
