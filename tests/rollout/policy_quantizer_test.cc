#include "rollout/policy_quantizer.h"

#include <cstdlib>
#include <random>

#include <gtest/gtest.h>

namespace grove::rollout {
namespace {

std::string SourcePath(const std::string& rel) {
  const char* root = std::getenv("GROVE_SOURCE_DIR");
  return std::string(root ? root : ".") + "/" + rel;
}

Result<QuantizeSettings> Parse(const std::string& toml) {
  GROVE_ASSIGN_OR_RETURN(Config c, Config::Parse(toml, "test.toml"));
  return ParseQuantizeSettings(c.Section("rollout"));
}

TEST(QuantizeSettings, ParsesModesAndRejectsUnknownValues) {
  auto d = Parse("[rollout]\n");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->mode, QuantizeMode::kInt8);
  EXPECT_EQ(d->plan_bits, 5.0);
  auto p = Parse("[rollout]\nquantize = \"plan\"\nplan_bits = 6\nplan_every_versions = 4\nplan_weight_change = 0.1\n");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->mode, QuantizeMode::kPlan);
  EXPECT_EQ(p->plan_bits, 6.0);
  EXPECT_EQ(p->replan.every_versions, 4);
  EXPECT_EQ(p->replan.max_rel_change, 0.1);
  EXPECT_EQ(Parse("[rollout]\nquantize = \"int4\"\n")->mode, QuantizeMode::kInt4);
  EXPECT_EQ(Parse("[rollout]\nquantize = \"none\"\n")->mode, QuantizeMode::kNone);
  auto bad = Parse("[rollout]\nquantize = \"fp8\"\n");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().ToString().find("fp8"), std::string::npos);
  EXPECT_NE(bad.status().ToString().find("test.toml"), std::string::npos);
  EXPECT_FALSE(Parse("[rollout]\nplan_bits = 3.0\n").ok());
  EXPECT_FALSE(Parse("[rollout]\nplan_bits = \"five\"\n").ok());
  EXPECT_FALSE(Parse("[rollout]\nplan_sequences = 0\n").ok());
  EXPECT_FALSE(Parse("[rollout]\nplan_weight_change = -1\n").ok());
}

struct Fixture {
  std::unique_ptr<model::Model> m;
  std::vector<actors::TensorSpec> specs;
  std::vector<float> full;
  std::vector<std::vector<int32_t>> prompts;
};

Fixture Make() {
  Fixture f;
  auto c = model::ModelConfig::LoadFile(SourcePath("configs/model/tiny.toml"));
  EXPECT_TRUE(c.ok());
  f.m = std::move(*model::Model::Create(*c, 21));
  f.m->set_threads(2);
  for (const auto& t : f.m->layout().tensors()) f.specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  f.full.assign(f.m->params().begin(), f.m->params().end());
  std::mt19937_64 rng(2);
  for (int i = 0; i < 4; ++i) {
    f.prompts.emplace_back(5);
    for (auto& t : f.prompts.back()) t = int32_t(3 + rng() % 50);
  }
  return f;
}

TEST(PolicyQuantizer, PlanModeInstallsThePlannedFormatsAndReplansWhenWeightsMove) {
  Fixture f = Make();
  QuantizeSettings s;
  s.mode = QuantizeMode::kPlan;
  s.plan_bits = 5.0;
  s.plan_max_new_tokens = 16;
  s.replan = {.every_versions = 0, .max_rel_change = 0.05};
  PolicyQuantizer q(s, f.prompts, 2);
  std::vector<float> flat = f.full;
  ASSERT_TRUE(q.Install(1, f.specs, flat, *f.m).ok());
  ASSERT_TRUE(q.plan().has_value());
  EXPECT_EQ(q.plans_made(), 1);
  EXPECT_LE(q.plan()->bits_per_weight(), 5.0);
  EXPECT_GT(q.plan()->bits_per_weight(), 4.25);
  // The model holds exactly the plan's round trip of the received weights.
  std::vector<float> want = f.full;
  QuantizeInPlace(f.specs, want, q.plan()->Chooser());
  EXPECT_TRUE(std::equal(want.begin(), want.end(), f.m->params().begin()));
  EXPECT_TRUE(std::equal(want.begin(), want.end(), flat.begin()));
  EXPECT_GT(q.mismatch().tokens, 0);
  EXPECT_GT(q.mismatch().mean_kl, 0.0);
  EXPECT_LT(q.mismatch().mean_kl, 0.1);
  const std::string detail = q.Detail();
  EXPECT_EQ(detail.rfind("plan ", 0), 0u) << detail;
  EXPECT_NE(detail.find(" int4, "), std::string::npos) << detail;
  EXPECT_NE(detail.find("KL"), std::string::npos) << detail;
  // A small step keeps the plan, a large one remakes it.
  std::vector<float> v2 = f.full;
  for (float& x : v2) x *= 1.01f;
  std::vector<float> flat2 = v2;
  ASSERT_TRUE(q.Install(2, f.specs, flat2, *f.m).ok());
  EXPECT_EQ(q.plans_made(), 1);
  std::vector<float> want2 = v2;
  QuantizeInPlace(f.specs, want2, q.plan()->Chooser());
  EXPECT_TRUE(std::equal(want2.begin(), want2.end(), f.m->params().begin()));
  std::vector<float> v3 = f.full;
  for (float& x : v3) x *= 1.2f;
  ASSERT_TRUE(q.Install(3, f.specs, v3, *f.m).ok());
  EXPECT_EQ(q.plans_made(), 2);
}

TEST(PolicyQuantizer, UniformModes) {
  Fixture f = Make();
  for (QuantizeMode mode : {QuantizeMode::kNone, QuantizeMode::kInt8, QuantizeMode::kInt4}) {
    QuantizeSettings s;
    s.mode = mode;
    PolicyQuantizer q(s, {}, 2);
    std::vector<float> flat = f.full;
    ASSERT_TRUE(q.Install(1, f.specs, flat, *f.m).ok());
    EXPECT_FALSE(q.plan().has_value());
    const double bits = q.report().bits_per_weight;
    if (mode == QuantizeMode::kNone) {
      EXPECT_EQ(bits, 32.0);
      EXPECT_TRUE(std::equal(f.full.begin(), f.full.end(), f.m->params().begin()));
    } else {
      EXPECT_LT(bits, mode == QuantizeMode::kInt4 ? 8.0 : 12.0) << q.Detail();
      EXPECT_FALSE(std::equal(f.full.begin(), f.full.end(), f.m->params().begin()));
    }
  }
  QuantizeSettings plan;
  plan.mode = QuantizeMode::kPlan;
  PolicyQuantizer no_prompts(plan, {}, 2);
  std::vector<float> flat = f.full;
  EXPECT_EQ(no_prompts.Install(1, f.specs, flat, *f.m).code(), StatusCode::kFailedPrecondition);
  std::vector<float> short_flat(10);
  EXPECT_EQ(no_prompts.Install(1, f.specs, short_flat, *f.m).code(), StatusCode::kInvalidArgument);
}

// What an engine that quantizes on the GPU is handed: the same choice
// Install applies on the CPU, the same storage bits, the weights untouched.
TEST(PolicyQuantizer, FormatsIsInstallsChoiceWithoutTouchingTheWeights) {
  Fixture f = Make();
  for (QuantizeMode mode : {QuantizeMode::kNone, QuantizeMode::kInt8, QuantizeMode::kInt4, QuantizeMode::kPlan}) {
    QuantizeSettings s;
    s.mode = mode;
    s.plan_max_new_tokens = 8;
    PolicyQuantizer cpu(s, f.prompts, 2), gpu(s, f.prompts, 2);
    std::vector<float> installed = f.full;
    ASSERT_TRUE(cpu.Install(1, f.specs, installed, *f.m).ok());
    const std::vector<float> untouched = f.full;
    auto plan_model = model::Model::Create(f.m->config(), 5);
    ASSERT_TRUE(plan_model.ok());
    (*plan_model)->set_threads(f.m->threads());  // same sums, same plan
    Result<FormatChooser> choose = gpu.Formats(1, f.m->config(), f.specs, untouched, plan_model->get());
    ASSERT_TRUE(choose.ok()) << choose.status();
    EXPECT_TRUE(std::equal(untouched.begin(), untouched.end(), f.full.begin()));
    std::vector<float> applied = f.full;
    QuantizeInPlace(f.specs, applied, *choose);
    EXPECT_TRUE(std::equal(applied.begin(), applied.end(), installed.begin())) << int(mode);
    EXPECT_DOUBLE_EQ(gpu.report().bits_per_weight, cpu.report().bits_per_weight) << int(mode);
    EXPECT_EQ(gpu.report().tensors_quantized, cpu.report().tensors_quantized);
    EXPECT_EQ(gpu.Detail().empty(), false);
    if (mode == QuantizeMode::kPlan) {
      EXPECT_EQ(gpu.plans_made(), 1);
      EXPECT_GT(gpu.mismatch().tokens, 0);
      EXPECT_NEAR(gpu.mismatch().mean_kl, cpu.mismatch().mean_kl, 1e-12);
    }
  }
  // Plan mode calibrates on a CPU model: none given is a clear error.
  QuantizeSettings plan;
  plan.mode = QuantizeMode::kPlan;
  PolicyQuantizer q(plan, f.prompts, 2);
  Result<FormatChooser> none = q.Formats(1, f.m->config(), f.specs, f.full, nullptr);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(none.status().ToString().find("CPU model"), std::string::npos);
}

}  // namespace
}  // namespace grove::rollout
