// What the learner GPU tests share: a GRPO trainer whose step runs on the
// GPU, and random training groups (tokens, rewards, rollout log-probs).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "learner/grpo_trainer.h"
#include "model/config.h"
#include "model/transformer.h"

namespace grove::learner::testing {

// A small MoE model the GPU learner runs: one dense layer, then 8 experts
// (top 2, one shared), sigmoid routing.
inline model::ModelConfig SmallMoeConfig() {
  model::ModelConfig c;
  c.vocab_size = 64;
  c.hidden = 128;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 32;
  c.max_seq_len = 256;
  c.dense_layers = 1;
  c.dense_hidden = 256;
  c.experts = 8;
  c.top_k = 2;
  c.shared_experts = 1;
  c.expert_hidden = 128;
  c.score_func = model::ScoreFunc::kSigmoid;
  c.norm_topk = true;
  c.init_std = 0.05;
  return c;
}

// Step on the GPU, own routing (no replay), rate 1e-3, the KL term on
// (beta 0.04) so the reference enters the loss.
inline TrainerOptions GpuTrainerOptions() {
  TrainerOptions opt;
  opt.device = LearnerDevice::kGpu;
  opt.routing_replay = false;
  opt.grpo.schedule.peak_lr = 1e-3;
  opt.grpo.loss.beta = 0.04;
  return opt;
}

// A trainer on a fresh model of `c` from `seed`; null (and a test failure)
// when it cannot be made.
inline std::unique_ptr<GrpoTrainer> MakeGpuTrainer(const model::ModelConfig& c, uint64_t seed,
                                                   const TrainerOptions& opt = GpuTrainerOptions()) {
  auto m = model::Model::Create(c, seed);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  auto t = GrpoTrainer::Create(std::move(*m), opt);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

struct GroupShape {
  int groups = 4, samples = 4;
  int prompt_tokens = 12;
  int min_completion = 20, completion_spread = 30;  // lengths min .. min + spread - 1
  int reward_levels = 2;                            // reward (sample + group) % levels
  float logprob_noise = 0.f;  // rollout log-probs: uniform model's + N(0, noise)
};

// Random groups without routes (the trainer scores them with its own routing).
inline std::vector<TrainingGroup> RandomGroups(const model::ModelConfig& c, uint64_t seed,
                                               const GroupShape& shape = {}) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> tok(0, int(c.vocab_size) - 1);
  std::normal_distribution<float> noise(0.f, shape.logprob_noise > 0 ? shape.logprob_noise : 1.f);
  std::vector<TrainingGroup> out(shape.groups);
  for (int gi = 0; gi < shape.groups; ++gi) {
    TrainingGroup& g = out[gi];
    g.group_id = "g" + std::to_string(gi);
    for (int t = 0; t < shape.prompt_tokens; ++t) g.prompt_tokens.push_back(tok(rng));
    for (int s = 0; s < shape.samples; ++s) {
      TrainingSample smp;
      const int len = shape.min_completion + int(rng() % shape.completion_spread);
      for (int t = 0; t < len; ++t) {
        smp.tokens.push_back(tok(rng));
        smp.rollout_logprobs.push_back(-std::log(float(c.vocab_size)) +
                                       (shape.logprob_noise > 0 ? noise(rng) : 0.f));
      }
      smp.reward = double((s + gi) % shape.reward_levels);
      g.samples.push_back(std::move(smp));
    }
  }
  return out;
}

}  // namespace grove::learner::testing
