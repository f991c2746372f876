#include "rollout/sampled_mismatch.h"

#include <cstdlib>

#include <gtest/gtest.h>

#include "rollout/precision_format.h"

namespace grove::rollout {
namespace {

std::string SourcePath(const std::string& rel) {
  const char* root = std::getenv("GROVE_SOURCE_DIR");
  return std::string(root ? root : ".") + "/" + rel;
}

// Hand-made numbers: 1 MoE layer, top-2; prompt of 2, completion of 3, so
// rows 1, 2, 3 are the ones that sampled the 3 tokens (row 0 is the prompt's).
TEST(SampledMismatch, MeansAndRoutesByHand) {
  std::vector<std::vector<int32_t>> prompts = {{5, 6}};
  model::Completion<float> c;
  c.tokens = {7, 8, 9};
  c.logprobs = {-1.0f, -2.0f, -0.5f};
  c.routes = {9, 9, /*row 1*/ 0, 1, /*row 2*/ 2, 3, /*row 3*/ 4, 5};
  model::ScoreResult<float> s;
  s.logprobs = {{-1.125f, -1.75f, -0.5f}};
  s.routes = {{8, 8, /*row 1*/ 1, 0, /*row 2*/ 2, 6, /*row 3*/ 4, 5}};  // row 0 differs but sampled nothing
  auto m = CompareSampledTokens(prompts, {c}, s, 1, 2);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->tokens, 3);
  EXPECT_DOUBLE_EQ(m->mean_diff, (0.125 - 0.25 + 0.0) / 3);
  EXPECT_DOUBLE_EQ(m->mean_sq_diff, (0.125 * 0.125 + 0.25 * 0.25) / 3);
  EXPECT_DOUBLE_EQ(m->max_abs_diff, 0.25);
  EXPECT_DOUBLE_EQ(m->routes_differ, 1.0 / 3);  // row 1 is the same set in another order

  SampledMismatch total;
  Accumulate(*m, total);
  Accumulate(*m, total);
  EXPECT_EQ(total.tokens, 6);
  EXPECT_DOUBLE_EQ(total.mean_diff, m->mean_diff);

  s.logprobs[0].pop_back();
  EXPECT_EQ(CompareSampledTokens(prompts, {c}, s, 1, 2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ScoreRequestsFor(prompts, {c, c}).status().code(), StatusCode::kInvalidArgument);
  model::Completion<float> empty;
  EXPECT_EQ(ScoreRequestsFor(prompts, {empty}).status().code(), StatusCode::kInvalidArgument);
}

// The CPU engine's own record equals its Score (the contract of
// Completion::logprobs): the measure reads ~0 there, and clearly more when
// the sampler held int4 weights and the learner the full ones.
TEST(SampledMismatch, CpuEngineAgainstItsOwnScoreAndAgainstFullPrecision) {
  auto c = model::ModelConfig::LoadFile(SourcePath("configs/model/tiny.toml"));
  ASSERT_TRUE(c.ok());
  auto m = model::Model::Create(*c, 3);
  ASSERT_TRUE(m.ok());
  std::vector<std::vector<int32_t>> prompts(6, std::vector<int32_t>{4, 17, 23, 8});
  model::SamplingOptions so;
  so.seed = 9;
  so.max_new_tokens = 16;
  auto gen = (*m)->Generate(prompts, so);
  ASSERT_TRUE(gen.ok());
  auto reqs = ScoreRequestsFor(prompts, *gen);
  ASSERT_TRUE(reqs.ok());
  auto score = (*m)->Score(*reqs, false);
  ASSERT_TRUE(score.ok());
  auto same = CompareSampledTokens(prompts, *gen, *score, c->moe_layers(), c->top_k);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->tokens, 6 * 16);
  // Cached decode vs one full forward: the same math summed in another
  // order, fp32 (2^-24 relative per operation) through a few layers.
  EXPECT_LT(same->max_abs_diff, 1e-4);
  EXPECT_EQ(same->routes_differ, 0.0);

  // Sample from the int4 round trip, score with the full weights.
  const std::vector<float> full((*m)->params().begin(), (*m)->params().end());
  std::vector<actors::TensorSpec> specs;
  for (const auto& t : (*m)->layout().tensors())
    specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  std::vector<float> q = full;
  QuantizeInPlace(specs, q, [](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
    return IsQuantizedTensor(t) ? std::optional(PrecisionFormat::kInt4) : std::nullopt;
  });
  std::copy(q.begin(), q.end(), (*m)->params().begin());
  auto gen4 = (*m)->Generate(prompts, so);
  ASSERT_TRUE(gen4.ok());
  std::copy(full.begin(), full.end(), (*m)->params().begin());
  auto reqs4 = ScoreRequestsFor(prompts, *gen4);
  ASSERT_TRUE(reqs4.ok());
  auto score4 = (*m)->Score(*reqs4, false);
  ASSERT_TRUE(score4.ok());
  auto differ = CompareSampledTokens(prompts, *gen4, *score4, c->moe_layers(), c->top_k);
  ASSERT_TRUE(differ.ok());
  EXPECT_GT(differ->mean_sq_diff, 100 * same->mean_sq_diff + 1e-12);
  EXPECT_GT(differ->max_abs_diff, 1e-4);
}

}  // namespace
}  // namespace grove::rollout
