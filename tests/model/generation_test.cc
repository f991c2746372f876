// KV-cache generation against the full forward.
#include <gtest/gtest.h>

#include <cmath>

#include "model/tokenizer.h"
#include "model/transformer.h"
#include "tests/model/test_util.h"

namespace grove::model {
namespace {

std::unique_ptr<Model> TinyModel(uint64_t seed) {
  auto c = ModelConfig::LoadFile(testing::SourcePath("configs/model/tiny.toml"));
  EXPECT_TRUE(c.ok()) << c.status();
  c->init_std = 0.1;  // peakier distributions than the default init
  auto m = Model::Create(*c, seed);
  EXPECT_TRUE(m.ok());
  return std::move(*m);
}

TEST(Generation, KvCacheLogitsEqualFullForward) {
  auto m = TinyModel(5);
  std::mt19937_64 rng(1);
  std::vector<int32_t> tokens(40);
  for (auto& t : tokens) t = int32_t(rng() % 55);
  auto full = m->FullLogits(tokens);
  ASSERT_TRUE(full.ok());
  for (int64_t split : {1, 7, 40}) {
    auto cached = m->CachedLogits(tokens, split);
    ASSERT_TRUE(cached.ok());
    ASSERT_EQ(cached->size(), full->size());
    // fp32 with different matrix shapes (1 row vs 40): rounding only; logits
    // are O(1), so 1e-4 absolute is ~100x the accumulated rounding.
    double worst = 0;
    for (size_t i = 0; i < full->size(); ++i) worst = std::max(worst, double(std::fabs((*cached)[i] - (*full)[i])));
    EXPECT_LT(worst, 1e-4) << "split " << split;
  }
}

TEST(Generation, LogprobsAndRoutesMatchScoring) {
  auto m = TinyModel(6);
  CharTokenizer tok;
  std::vector<std::vector<int32_t>> prompts = {*tok.Encode("12+7="), *tok.Encode("<think>3*4"), *tok.Encode("a")};
  SamplingOptions opt;
  opt.temperature = 0.8;
  opt.top_p = 0.95;
  opt.seed = 17;
  opt.max_new_tokens = 12;
  opt.stop_tokens = {tok.eos_id()};
  auto gen = m->Generate(prompts, opt);
  ASSERT_TRUE(gen.ok()) << gen.status();
  ASSERT_EQ(gen->size(), 3u);
  const int64_t row = m->config().moe_layers() * m->config().top_k;
  std::vector<ScoreRequest> batch;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Completion<float>& c = (*gen)[i];
    ASSERT_FALSE(c.tokens.empty());
    EXPECT_EQ(c.logprobs.size(), c.tokens.size());
    if (c.finish == FinishReason::kLength) {
      EXPECT_EQ(c.tokens.size(), 12u);
    }
    EXPECT_EQ(int64_t(c.routes.size()), int64_t(prompts[i].size() + c.tokens.size() - 1) * row);
    ScoreRequest r;
    r.tokens = prompts[i];
    r.tokens.insert(r.tokens.end(), c.tokens.begin(), c.tokens.end());
    r.score_from = int64_t(prompts[i].size());
    batch.push_back(r);
  }
  auto scored = m->Score(batch, false);
  ASSERT_TRUE(scored.ok());
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (size_t j = 0; j < (*gen)[i].logprobs.size(); ++j)
      EXPECT_NEAR((*gen)[i].logprobs[j], scored->logprobs[i][j], 1e-4) << i << "," << j;
    EXPECT_EQ((*gen)[i].routes, scored->routes[i]) << "prompt " << i;
  }
  // Same seed, same tokens; batch composition does not matter.
  auto again = m->Generate({prompts[1]}, opt);
  ASSERT_TRUE(again.ok());
  SamplingOptions opt2 = opt;
  auto solo = m->Generate(prompts, opt2);
  EXPECT_EQ((*solo)[1].tokens, (*gen)[1].tokens);
  opt2.seed = 18;
  auto other = m->Generate(prompts, opt2);
  bool any_diff = false;
  for (size_t i = 0; i < prompts.size(); ++i) any_diff |= (*other)[i].tokens != (*gen)[i].tokens;
  EXPECT_TRUE(any_diff);
}

TEST(Generation, StopsAndLimits) {
  auto m = TinyModel(7);
  SamplingOptions opt;
  opt.temperature = 0;  // greedy: the first greedy token becomes the stop token
  opt.max_new_tokens = 5;
  auto g = m->Generate({{1, 2, 3}}, opt);
  ASSERT_TRUE(g.ok());
  ASSERT_EQ((*g)[0].tokens.size(), 5u);
  EXPECT_EQ((*g)[0].finish, FinishReason::kLength);
  opt.stop_tokens = {(*g)[0].tokens[0]};
  auto s = m->Generate({{1, 2, 3}}, opt);
  ASSERT_EQ((*s)[0].tokens.size(), 1u);
  EXPECT_EQ((*s)[0].finish, FinishReason::kStop);
  // max_seq_len caps the completion.
  std::vector<int32_t> long_prompt(m->config().max_seq_len - 2, 4);
  opt.stop_tokens.clear();
  auto l = m->Generate({long_prompt}, opt);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ((*l)[0].tokens.size(), 2u);
  // Zero new tokens: prompt routes only.
  opt.max_new_tokens = 0;
  auto z = m->Generate({{1, 2, 3}}, opt);
  ASSERT_TRUE(z.ok());
  EXPECT_TRUE((*z)[0].tokens.empty());
  EXPECT_EQ(int64_t((*z)[0].routes.size()), 3 * m->config().moe_layers() * m->config().top_k);
  // Bad input is an error, not a crash.
  EXPECT_FALSE(m->Generate({{}}, opt).ok());
  EXPECT_FALSE(m->Generate({{99}}, opt).ok());
  EXPECT_FALSE(m->Generate({std::vector<int32_t>(m->config().max_seq_len, 1)}, opt).ok());
  opt.top_p = 0;
  EXPECT_FALSE(m->Generate({{1}}, opt).ok());
}

}  // namespace
}  // namespace grove::model
