#include "learner/grpo_config.h"

#include <gtest/gtest.h>

namespace grove::learner {
namespace {

Result<GrpoConfig> ParseText(const std::string& toml) {
  Result<Config> c = Config::Parse(toml, "exp.toml");
  if (!c.ok()) return c.status();
  return ParseGrpoConfig(*c, "learner.grpo");
}

void ExpectError(const std::string& toml, const std::string& needle) {
  auto c = ParseText(toml);
  ASSERT_FALSE(c.ok()) << toml;
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(needle), std::string::npos) << c.status();
}

TEST(GrpoConfig, AbsentTableIsGrpoPreset) {
  auto c = ParseText("[other]\nx = 1\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->variant, GrpoVariant::kGrpo);
  EXPECT_TRUE(c->advantages.scale_by_std);
  EXPECT_EQ(c->advantages.std_kind, StdKind::kSample);
  EXPECT_DOUBLE_EQ(c->loss.clip_low, 0.2);
  EXPECT_DOUBLE_EQ(c->loss.clip_high, 0.2);
  EXPECT_DOUBLE_EQ(c->loss.beta, 0.04);
  EXPECT_EQ(c->loss.aggregation, LossAggregation::kSeqMeanTokenMean);
  EXPECT_EQ(c->loss.ratio_level, RatioLevel::kToken);
  EXPECT_DOUBLE_EQ(c->loss.tis_cap, 2.0);
  EXPECT_FALSE(c->dynamic_sampling);
  EXPECT_DOUBLE_EQ(c->max_grad_norm, 1.0);
  EXPECT_EQ(c->schedule.decay, LrDecay::kConstant);
}

TEST(GrpoConfig, DapoPresetAndOverride) {
  auto c = ParseText("[learner.grpo]\nvariant = \"dapo\"\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->loss.clip_low, 0.2);
  EXPECT_DOUBLE_EQ(c->loss.clip_high, 0.28);
  EXPECT_EQ(c->loss.aggregation, LossAggregation::kTokenMean);
  EXPECT_TRUE(c->dynamic_sampling);
  EXPECT_DOUBLE_EQ(c->loss.beta, 0.0);
  c = ParseText("[learner.grpo]\nvariant = \"dapo\"\nbeta = 0.01\nclip_high = 0.3\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->loss.beta, 0.01);  // explicit keys win over the preset
  EXPECT_DOUBLE_EQ(c->loss.clip_high, 0.3);
  EXPECT_EQ(c->loss.aggregation, LossAggregation::kTokenMean);
}

TEST(GrpoConfig, DrGrpoNeedsMaxTokens) {
  ExpectError("[learner.grpo]\nvariant = \"dr_grpo\"\n", "max_tokens");
  auto c = ParseText("[learner.grpo]\nvariant = \"dr_grpo\"\nmax_tokens = 256\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->advantages.scale_by_std);
  EXPECT_EQ(c->loss.aggregation, LossAggregation::kSeqMeanTokenSumNorm);
  EXPECT_EQ(c->loss.max_tokens, 256);
  EXPECT_DOUBLE_EQ(c->loss.beta, 0.0);
}

TEST(GrpoConfig, GspoPreset) {
  auto c = ParseText("[learner.grpo]\nvariant = \"gspo\"\n");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->loss.ratio_level, RatioLevel::kSequence);
  EXPECT_DOUBLE_EQ(c->loss.clip_low, 3e-4);
  EXPECT_DOUBLE_EQ(c->loss.clip_high, 4e-4);
  EXPECT_EQ(c->loss.aggregation, LossAggregation::kSeqMeanTokenMean);
}

TEST(GrpoConfig, FullTable) {
  auto c = ParseText(R"(
[learner.grpo]
variant = "grpo"
clip_low = 0.1
clip_high = 0.3
beta = 0
loss_aggregation = "token_mean"
ratio = "sequence"
tis_cap = 0
dual_clip = 3
scale_advantage_by_std = false
advantage_std = "population"
advantage_eps = 1e-4
dynamic_sampling = true
[learner.grpo.optimizer]
lr = 3e-4
beta1 = 0.8
beta2 = 0.95
eps = 1e-6
weight_decay = 0.1
max_grad_norm = 0.5
moments = "bf16"
[learner.grpo.schedule]
warmup_steps = 5
decay = "cosine"
total_steps = 100
min_lr = 1e-5
)");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->loss.clip_low, 0.1);
  EXPECT_EQ(c->loss.ratio_level, RatioLevel::kSequence);
  EXPECT_EQ(c->loss.tis_cap, 0.0);
  EXPECT_DOUBLE_EQ(c->loss.dual_clip, 3.0);
  EXPECT_EQ(c->advantages.std_kind, StdKind::kPopulation);
  EXPECT_DOUBLE_EQ(c->advantages.eps, 1e-4);
  EXPECT_DOUBLE_EQ(c->schedule.peak_lr, 3e-4);
  EXPECT_DOUBLE_EQ(c->optimizer.beta1, 0.8);
  EXPECT_DOUBLE_EQ(c->optimizer.beta2, 0.95);
  EXPECT_DOUBLE_EQ(c->optimizer.weight_decay, 0.1);
  EXPECT_DOUBLE_EQ(c->max_grad_norm, 0.5);
  EXPECT_EQ(c->optimizer.moments, MomentPrecision::kBf16);
  EXPECT_EQ(c->schedule.warmup_steps, 5);
  EXPECT_EQ(c->schedule.decay, LrDecay::kCosine);
  EXPECT_EQ(c->schedule.total_steps, 100);
}

TEST(GrpoConfig, ClearErrors) {
  ExpectError("[learner.grpo]\nvariant = \"ppo\"\n", "unknown GRPO variant 'ppo'");
  ExpectError("[learner.grpo]\nvariant = \"ppo\"\n", "learner.grpo.variant");
  ExpectError("[learner.grpo]\nclip_lo = 0.2\n", "learner.grpo.clip_lo");
  ExpectError("[learner.grpo]\nclip_low = -0.1\n", "clip_low");
  ExpectError("[learner.grpo]\nclip_high = -0.1\n", "clip_high");
  ExpectError("[learner.grpo]\nbeta = -0.01\n", "beta");
  ExpectError("[learner.grpo]\ndual_clip = 0.5\n", "dual_clip");
  ExpectError("[learner.grpo]\nbeta = \"high\"\n", "learner.grpo.beta");  // wrong type
  ExpectError("[learner.grpo]\nloss_aggregation = \"sum\"\n", "unknown loss aggregation");
  ExpectError("[learner.grpo]\nratio = \"tok\"\n", "learner.grpo.ratio");
  ExpectError("[learner.grpo]\nadvantage_std = \"biased\"\n", "advantage_std");
  ExpectError("[learner.grpo.optimizer]\nlearning_rate = 1e-3\n", "learner.grpo.optimizer.learning_rate");
  ExpectError("[learner.grpo.optimizer]\nbeta2 = 1.0\n", "beta2");
  ExpectError("[learner.grpo.optimizer]\nmax_grad_norm = -1\n", "max_grad_norm");
  ExpectError("[learner.grpo.optimizer]\nlr = 0\n", "learning rate");
  ExpectError("[learner.grpo.optimizer]\nmoments = \"fp16\"\n", "unknown precision 'fp16' (known: fp32, bf16)");
  ExpectError("[learner.grpo.optimizer]\nmoments = \"fp16\"\n", "learner.grpo.optimizer.moments");
  ExpectError("[learner.grpo.schedule]\ndecay = \"linear\"\n", "learner.grpo.schedule.decay");
  ExpectError("[learner.grpo.schedule]\ndecay = \"cosine\"\nwarmup_steps = 10\ntotal_steps = 5\n", "total_steps");
  ExpectError("[learner.grpo]\nvariant = \"dapo\"\nmax_tokens = 0\nloss_aggregation = \"seq_mean_token_sum_norm\"\n",
              "max_tokens");
}

}  // namespace
}  // namespace grove::learner
