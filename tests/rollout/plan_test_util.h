// Helpers shared by the precision-plan tests (CPU and GPU).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "model/config.h"
#include "model/transformer.h"

namespace grove::rollout::plan_testing {

// A file of the source tree: GROVE_SOURCE_DIR (set by CTest), else the
// working directory.
inline std::string SourcePath(const std::string& rel) {
  const char* root = std::getenv("GROVE_SOURCE_DIR");
  return std::string(root ? root : ".") + "/" + rel;
}

// configs/model/tiny.toml with a vocabulary padded to a multiple of 8
// (GpuTransformer's rule) and weights large enough that int4's error stands
// far above the bf16 forward's rounding (as gpu_transformer_test's tiny
// config).
inline model::ModelConfig TinyGpuConfig() {
  auto c = model::ModelConfig::LoadFile(SourcePath("configs/model/tiny.toml"));
  EXPECT_TRUE(c.ok()) << c.status();
  model::ModelConfig m = c.ok() ? *c : model::ModelConfig{};
  m.vocab_size = 64;
  m.init_std = 0.08;
  return m;
}

// n random sequences of len tokens, scored from len / 3 on.
inline std::vector<model::ScoreRequest> RandomSequences(const model::ModelConfig& c, int n, int len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<model::ScoreRequest> b(n);
  for (auto& r : b) {
    r.tokens.resize(len);
    for (auto& t : r.tokens) t = int32_t(rng() % c.vocab_size);
    r.score_from = len / 3;
  }
  return b;
}

}  // namespace grove::rollout::plan_testing
