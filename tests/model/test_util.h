// Helpers shared by the model tests.
#pragma once

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "model/config.h"

namespace grove::model::testing {

inline std::string SourcePath(const std::string& rel) {
  const char* root = std::getenv("GROVE_SOURCE_DIR");
  return std::string(root ? root : ".") + "/" + rel;
}

template <typename T>
std::vector<T> RandomVector(size_t n, std::mt19937_64& rng, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = T(d(rng));
  return v;
}

// A model small enough for finite differences over every tensor.
inline ModelConfig MicroConfig(ScoreFunc score, bool norm_topk, double alpha) {
  ModelConfig c;
  c.vocab_size = 11; c.hidden = 8; c.layers = 3; c.heads = 2; c.kv_heads = 1; c.head_dim = 4;
  c.max_seq_len = 16; c.dense_layers = 1; c.dense_hidden = 12; c.experts = 4; c.top_k = 2;
  c.shared_experts = 1; c.expert_hidden = 6; c.score_func = score; c.norm_topk = norm_topk;
  c.route_scale = 1.5; c.balance_alpha = alpha; c.init_std = 0.3;
  return c;
}

}  // namespace grove::model::testing
