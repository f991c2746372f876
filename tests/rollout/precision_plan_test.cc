#include "rollout/precision_plan.h"

#include <chrono>
#include <cstdlib>
#include <random>

#include <gtest/gtest.h>

#include "tests/rollout/plan_test_util.h"

namespace grove::rollout {
namespace {

using plan_testing::RandomSequences;
using plan_testing::SourcePath;

std::unique_ptr<model::Model> TinyModel(uint64_t seed = 7) {
  auto c = model::ModelConfig::LoadFile(SourcePath("configs/model/tiny.toml"));
  EXPECT_TRUE(c.ok()) << c.status();
  auto m = model::Model::Create(*c, seed);
  EXPECT_TRUE(m.ok()) << m.status();
  (*m)->set_threads(2);
  return std::move(*m);
}


std::span<float> Tensor(model::Model& m, const std::string& name) {
  const model::TensorInfo* t = m.layout().Find(name);
  EXPECT_NE(t, nullptr) << name;
  return m.params().subspan(t->offset, t->numel);
}

// Random units whose error falls with precision: the budget always holds,
// and the extremes pick all-int4 / everything useful in bf16.
TEST(ChooseFormats, RespectsTheBudget) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(0, 1);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<PlanUnit> units(1 + rng() % 40);
    for (PlanUnit& p : units) {
      p.params = 1000 + int64_t(rng() % 100000);
      const double cols = 64 + double(rng() % 512);
      p.bits = {p.params * (4 + 32 / cols), p.params * (8 + 32 / cols), p.params * 16.0};
      const double e4 = u(rng);
      p.error = {e4, e4 * u(rng) * 0.1, e4 * u(rng) * 0.001};
    }
    for (double budget : {4.6, 5.0, 6.0, 8.5, 12.0}) {
      std::vector<PlanUnit> plan_units = units;
      ASSERT_TRUE(ChooseFormats(budget, plan_units).ok());
      PrecisionPlan plan{budget, plan_units};
      EXPECT_LE(plan.bits_per_weight(), budget + 1e-12) << "trial " << trial;
      // Greedy never does worse than all-int4.
      double e4 = 0;
      for (const PlanUnit& p : units) e4 += p.error[0];
      EXPECT_LE(plan.total_error(), e4);
    }
  }
  std::vector<PlanUnit> units(3);
  for (PlanUnit& p : units) {
    p.params = 128 * 128;
    p.bits = {p.params * 4.25, p.params * 8.25, p.params * 16.0};
    p.error = {1.0, 0.1, 0.01};
  }
  units[1].error = {0, 0, 0};  // never routed: no reason to upgrade
  std::vector<PlanUnit> all = units;
  ASSERT_TRUE(ChooseFormats(16.0, all).ok());
  EXPECT_EQ(all[0].format, PrecisionFormat::kBF16);
  EXPECT_EQ(all[1].format, PrecisionFormat::kInt4);
  EXPECT_EQ(all[2].format, PrecisionFormat::kBF16);
  std::vector<PlanUnit> none = units;
  ASSERT_TRUE(ChooseFormats(4.25, none).ok());
  for (const PlanUnit& p : none) EXPECT_EQ(p.format, PrecisionFormat::kInt4);
  EXPECT_EQ(ChooseFormats(4.0, none).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ChooseFormats(NAN, none).code(), StatusCode::kInvalidArgument);
}

TEST(PlanUnits, CoverEveryFfnWeightOnce) {
  auto m = TinyModel();
  const model::ModelConfig& c = m->config();
  std::vector<PlanUnit> units = PlanUnits(c);
  const int64_t moe = c.moe_layers();
  EXPECT_EQ(int64_t(units.size()), (c.layers - moe) + moe * (c.experts + (c.shared_experts > 0)));
  int64_t params = 0;
  for (const PlanUnit& u : units) params += u.params;
  int64_t ffn = 0;
  for (const auto& t : m->layout().tensors())
    if (t.name.find(".mlp.") != std::string::npos || t.name.find(".experts.") != std::string::npos ||
        t.name.find(".shared.") != std::string::npos)
      ffn += t.numel;
  EXPECT_EQ(params, ffn);
  // Attention and lm_head bf16, router/norms/embeddings fp32, experts their unit's format.
  units[2].format = PrecisionFormat::kInt8;
  PrecisionPlan plan{5.0, units};
  FormatChooser choose = plan.Chooser();
  EXPECT_EQ(choose({"layers.0.attn.wq", {128, 128}, 0, 0}), PrecisionFormat::kBF16);
  EXPECT_EQ(choose({"lm_head", {55, 128}, 0, 0}), PrecisionFormat::kBF16);
  EXPECT_EQ(choose({"layers.1.moe.router", {8, 128}, 0, 0}), std::nullopt);
  EXPECT_EQ(choose({"embed", {55, 128}, 0, 0}), std::nullopt);
  EXPECT_EQ(choose({units[2].tensors[1], {128, 128}, 0, 0}), PrecisionFormat::kInt8);
  EXPECT_EQ(choose({units[3].tensors[0], {128, 128}, 0, 0}), PrecisionFormat::kInt4);
  EXPECT_EQ(plan.count(PrecisionFormat::kInt8), 1);
  EXPECT_NE(plan.Summary().find(std::to_string(units.size() - 1) + " int4, 1 int8, 0 bf16"), std::string::npos)
      << plan.Summary();
}

// An expert the router always picks, whose weights have outliers that make
// int4 ruin it, is the one the planner spends its few extra bits on; an
// expert the router never picks has no cost at all.
TEST(PrecisionPlan, PicksTheSensitiveExpert) {
  auto m = TinyModel();
  const model::ModelConfig& c = m->config();
  const int64_t layer = c.dense_layers;  // the first MoE layer
  const std::string p = "layers." + std::to_string(layer) + ".moe.";
  Tensor(*m, p + "router_bias")[3] = 10.0f;   // always routed
  Tensor(*m, p + "router_bias")[5] = -10.0f;  // never routed
  for (const char* w : {"w1", "w3", "w2"}) {
    std::span<float> t = Tensor(*m, p + "experts.3." + w);
    for (size_t i = 0; i < t.size(); i += 128) t[i] = 2.0f;  // one outlier per 128-column group (std 0.02)
  }
  std::vector<model::ScoreRequest> calib = RandomSequences(c, 6, 40, 1);
  std::vector<PlanUnit> units = PlanUnits(c);
  ASSERT_TRUE(MeasureUnitErrors(*m, calib, units).ok());
  const PlanUnit* hot = nullptr;
  const PlanUnit* cold = nullptr;
  int64_t rows = 0;
  for (const auto& r : calib) rows += int64_t(r.tokens.size()) - 1;
  int64_t layer_rows = 0;
  for (const PlanUnit& u : units) {
    if (u.name == p + "experts.3") hot = &u;
    if (u.name == p + "experts.5") cold = &u;
    if (u.layer == layer && u.expert >= 0) layer_rows += u.rows_seen;
    if (u.rows_seen > 0) {  // finer formats are closer
      EXPECT_GT(u.error[0], u.error[1]) << u.name;
      EXPECT_GT(u.error[1], u.error[2]) << u.name;
      EXPECT_GT(u.error[2], 0) << u.name;
    }
  }
  ASSERT_TRUE(hot && cold);
  EXPECT_EQ(layer_rows, rows * c.top_k);  // every routed (row, slot) measured once
  EXPECT_EQ(hot->rows_seen, rows);
  EXPECT_EQ(cold->rows_seen, 0);
  EXPECT_EQ(cold->error[0], 0.0);
  for (const PlanUnit& u : units) {
    if (&u == hot) continue;
    EXPECT_GT(hot->error[0], u.error[0]) << u.name;
  }
  // Room for about one expert in int8 beyond all-int4.
  double params = 0, bits4 = 0;
  for (const PlanUnit& u : units) { params += u.params; bits4 += u.bits[0]; }
  const double budget = (bits4 + 1.2 * (hot->bits[1] - hot->bits[0])) / params;
  ASSERT_TRUE(ChooseFormats(budget, units).ok());
  PrecisionPlan plan{budget, units};
  EXPECT_LE(plan.bits_per_weight(), budget);
  EXPECT_EQ(hot->format, PrecisionFormat::kInt8);
  EXPECT_EQ(cold->format, PrecisionFormat::kInt4);
  EXPECT_EQ(plan.count(PrecisionFormat::kInt8) + plan.count(PrecisionFormat::kBF16), 1) << plan.Summary();
}

// The plan measured on a random tiny model: weights unchanged by measuring,
// a richer budget never increases the total error, the mismatch shrinks
// with precision, is exactly zero against itself, and routing changes show.
TEST(PrecisionPlan, MismatchFollowsPrecision) {
  auto m = TinyModel(11);
  const model::ModelConfig& c = m->config();
  std::vector<std::vector<int32_t>> prompts;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 4; ++i) {
    prompts.emplace_back(6);
    for (auto& t : prompts.back()) t = int32_t(3 + rng() % (c.vocab_size - 3));
  }
  const std::vector<float> full(m->params().begin(), m->params().end());
  auto calib = CalibrationBatch(*m, prompts, 24, 2, 9);
  ASSERT_TRUE(calib.ok()) << calib.status();
  ASSERT_EQ(calib->size(), 4u);
  EXPECT_EQ((*calib)[0].score_from, 6);
  std::vector<PlanUnit> units = PlanUnits(c);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(MeasureUnitErrors(*m, *calib, units).ok());
  std::cout << "measure units on the tiny model: "
            << std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() << " ms\n";
  EXPECT_TRUE(std::equal(full.begin(), full.end(), m->params().begin()));
  std::vector<actors::TensorSpec> specs;
  for (const auto& t : m->layout().tensors()) specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  // Errors are in KL units: a layer's int4 errors add up to the KL of that
  // layer alone in int4 (measured here independently through MeasureMismatch).
  for (int64_t layer = 0; layer < c.layers; ++layer) {
    double sum = 0;
    for (const PlanUnit& u : units)
      if (u.layer == layer) sum += u.error[0];
    PrecisionPlan one{0, units};
    for (PlanUnit& u : one.units) u.format = u.layer == layer ? PrecisionFormat::kInt4 : PrecisionFormat::kBF16;
    FormatChooser only_layer = [&](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
      auto f = one.Chooser()(t);
      return f == PrecisionFormat::kInt4 ? f : std::nullopt;
    };
    std::vector<float> q = full;
    QuantizeInPlace(specs, q, only_layer);
    std::copy(q.begin(), q.end(), m->params().begin());
    auto kl = MeasureMismatch(*m, full, *calib);
    ASSERT_TRUE(kl.ok());
    EXPECT_GT(sum, 0.0) << "layer " << layer;
    EXPECT_NEAR(sum, kl->mean_kl, 1e-6 * kl->mean_kl) << "layer " << layer;
  }
  std::copy(full.begin(), full.end(), m->params().begin());
  double last_error = INFINITY;
  for (double budget : {4.5, 5.0, 6.0, 16.0}) {
    std::vector<PlanUnit> u = units;
    ASSERT_TRUE(ChooseFormats(budget, u).ok());
    PrecisionPlan plan{budget, u};
    EXPECT_LE(plan.total_error(), last_error);
    last_error = plan.total_error();
  }
  auto mismatch_of = [&](const FormatChooser& choose) {
    std::vector<float> q = full;
    QuantizeInPlace(specs, q, choose);
    std::copy(q.begin(), q.end(), m->params().begin());
    auto r = MeasureMismatch(*m, full, *calib);
    EXPECT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(std::equal(q.begin(), q.end(), m->params().begin()));  // rollout weights restored
    return *r;
  };
  auto all = [](PrecisionFormat f) -> FormatChooser {
    return [f](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
      return IsQuantizedTensor(t) ? std::optional(f) : std::nullopt;
    };
  };
  MismatchReport none = mismatch_of([](const actors::TensorSpec&) { return std::nullopt; });
  EXPECT_EQ(none.mean_kl, 0.0);
  EXPECT_EQ(none.routes_differ, 0.0);
  int64_t scored = 0;
  for (const auto& r : *calib) scored += int64_t(r.tokens.size()) - r.score_from;
  EXPECT_EQ(none.tokens, scored);
  MismatchReport i4 = mismatch_of(all(PrecisionFormat::kInt4));
  MismatchReport i8 = mismatch_of(all(PrecisionFormat::kInt8));
  MismatchReport b16 = mismatch_of(all(PrecisionFormat::kBF16));
  std::cout << "KL int4 " << i4.mean_kl << " int8 " << i8.mean_kl << " bf16 " << b16.mean_kl << "; routes differ "
            << i4.routes_differ << " " << i8.routes_differ << " " << b16.routes_differ << "\n";
  EXPECT_GT(i4.mean_kl, i8.mean_kl);
  EXPECT_GT(i8.mean_kl, b16.mean_kl);
  EXPECT_GT(b16.mean_kl, 0.0);
  EXPECT_GE(i4.routes_differ, b16.routes_differ);
  // Routers turned around: nearly every token routes elsewhere.
  std::vector<float> flipped = full;
  for (const auto& t : m->layout().tensors())
    if (t.name.find("moe.router") != std::string::npos && t.name.find("bias") == std::string::npos)
      for (int64_t i = 0; i < t.numel; ++i) flipped[t.offset + i] = -flipped[t.offset + i];
  std::copy(flipped.begin(), flipped.end(), m->params().begin());
  auto r = MeasureMismatch(*m, full, *calib);
  ASSERT_TRUE(r.ok());
  EXPECT_GT(r->routes_differ, 0.9);
  EXPECT_GT(r->mean_kl, 0.0);
  EXPECT_FALSE(MeasureMismatch(*m, std::span<const float>(full).first(10), *calib).ok());
}

TEST(ReplanTrigger, VersionsAndWeightChange) {
  std::vector<float> w(100, 1.0f);
  ReplanTrigger every3({.every_versions = 3, .max_rel_change = 0});
  EXPECT_TRUE(every3.Due(0, w));
  every3.Planned(0, w);
  EXPECT_FALSE(every3.Due(2, w));
  EXPECT_TRUE(every3.Due(3, w));
  ReplanTrigger moved({.every_versions = 0, .max_rel_change = 0.05});
  moved.Planned(4, w);
  std::vector<float> v = w;
  for (int i = 0; i < 100; ++i) v[i] += 0.04f;  // relative change 0.04
  EXPECT_NEAR(moved.RelativeChange(v), 0.04, 1e-6);
  EXPECT_FALSE(moved.Due(100, v));
  for (int i = 0; i < 100; ++i) v[i] += 0.02f;
  EXPECT_TRUE(moved.Due(5, v));
  EXPECT_TRUE(moved.Due(5, std::vector<float>(3, 1.0f)));  // another model shape
}

// The trigger's sums run over 1M-element blocks on several threads: over
// 3.5 blocks of random weights they must equal one serial pass (to double
// rounding), and a change confined to the last partial block, or to the
// first element, must count exactly as much as anywhere else.
TEST(ReplanTrigger, RelativeChangeOverManyBlocksMatchesASerialPass) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> nd(0.f, 1.f);
  const size_t n = (size_t(7) << 20) / 2 + 123;
  std::vector<float> plan(n), now(n);
  for (size_t i = 0; i < n; ++i) {
    plan[i] = nd(rng);
    now[i] = plan[i] + 0.01f * nd(rng);
  }
  ReplanTrigger trigger({.every_versions = 0, .max_rel_change = 0.05});
  trigger.Planned(1, plan);
  double d2 = 0, r2 = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = double(now[i]) - plan[i];
    d2 += d * d;
    r2 += double(plan[i]) * plan[i];
  }
  EXPECT_NEAR(trigger.RelativeChange(now), std::sqrt(d2 / r2), 1e-12);
  EXPECT_EQ(trigger.RelativeChange(plan), 0.0);  // the copy Planned kept is exact
  for (size_t where : {n - 1, size_t(0), (size_t(3) << 20) + 5}) {
    std::vector<float> one = plan;
    one[where] += 1000.f;
    const double moved = double(one[where]) - plan[where];  // 1000 after float rounding
    EXPECT_NEAR(trigger.RelativeChange(one), std::abs(moved) / std::sqrt(r2), 1e-12) << "changed element " << where;
  }
}

}  // namespace
}  // namespace grove::rollout
