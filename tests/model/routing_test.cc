// Routing replay and aux-loss-free load balancing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <numeric>

#include "model/moe.h"
#include "model/transformer.h"
#include "tests/model/test_util.h"

namespace grove::model {
namespace {

std::unique_ptr<Model> Tiny(double gamma = 0.001) {
  auto c = ModelConfig::LoadFile(testing::SourcePath("configs/model/tiny.toml"));
  EXPECT_TRUE(c.ok()) << c.status();
  c->bias_gamma = gamma;
  return std::move(*Model::Create(*c, 11));
}

std::vector<ScoreRequest> RandomBatch(int n, int len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<ScoreRequest> b(n);
  for (int i = 0; i < n; ++i) {
    b[i].tokens.resize(len - i);
    for (auto& t : b[i].tokens) t = int32_t(rng() % 55);
    b[i].score_from = 2;
  }
  return b;
}

TEST(RoutingReplay, ReproducesForwardAndSurvivesBiasUpdate) {
  auto m = Tiny();
  auto batch = RandomBatch(3, 30, 1);
  auto base = m->Score(batch, false);
  ASSERT_TRUE(base.ok());
  auto replay = batch;
  for (size_t i = 0; i < batch.size(); ++i) replay[i].replay_routes = base->routes[i];
  auto same = m->Score(replay, false);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->routes, base->routes);
  EXPECT_EQ(same->logprobs, base->logprobs);  // same code path, same shapes: bit-identical

  // Push the biases hard so the model's own choice changes.
  std::vector<std::vector<int64_t>> load = base->expert_load;
  for (auto& l : load) std::reverse(l.begin(), l.end());
  for (int k = 0; k < 200; ++k) ASSERT_TRUE(m->UpdateRouterBias(base->expert_load).ok());
  auto own = m->Score(batch, false);
  ASSERT_TRUE(own.ok());
  EXPECT_NE(own->routes, base->routes) << "bias update should change the model's own choices";
  auto replayed = m->Score(replay, false);
  ASSERT_TRUE(replayed.ok());
  EXPECT_EQ(replayed->routes, base->routes);
  // The bias only steers selection, so with the same experts the outputs are unchanged.
  EXPECT_EQ(replayed->logprobs, base->logprobs);
}

TEST(RoutingReplay, RejectsBadRoutes) {
  auto m = Tiny();
  auto batch = RandomBatch(2, 10, 2);
  batch[0].replay_routes = {1, 2, 3};
  auto r = m->Score(batch, false);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  const int64_t row = m->config().moe_layers() * m->config().top_k;
  batch[0].replay_routes.assign(9 * row, 0);
  r = m->Score(batch, false);  // request 1 lacks routes
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  batch[1].replay_routes.assign(8 * row, 0);
  batch[1].replay_routes[5] = 999;
  r = m->Score(batch, false);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("expert id 999"), std::string::npos) << r.status();
}

TEST(ScoreValidation, NamesTheTokenOutsideTheVocabulary) {
  auto m = Tiny();
  const int32_t V = int32_t(m->config().vocab_size);
  // Positions inside the scan's 8-wide blocks and in its tail, both bounds.
  for (const auto& [at, token] : std::vector<std::pair<int, int32_t>>{{0, -1}, {5, V}, {9, V + 7}, {10, -3}}) {
    auto batch = RandomBatch(2, 11, 2);
    batch[0].tokens[at] = token;  // 11 tokens: one 8-wide block and a tail of 3
    auto r = m->Score(batch, false);
    ASSERT_FALSE(r.ok()) << "token " << token << " at " << at;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("score request 0: token " + std::to_string(token) + " at " + std::to_string(at)),
              std::string::npos)
        << r.status();
  }
}

// Requests are checked on several threads; the error is still the first
// bad request's in batch order, whichever thread found which first.
TEST(ScoreValidation, ReportsTheFirstBadRequestInBatchOrder) {
  auto m = Tiny();
  const int32_t V = int32_t(m->config().vocab_size);
  for (int first_bad : {0, 3, 11}) {
    auto batch = RandomBatch(16, 30, 2);  // 30 .. 15 tokens
    for (int i = first_bad; i < 16; i += 2) batch[i].tokens[4] = V + i;  // every other request after it
    batch[15].tokens.resize(1);                                         // and a short one last
    auto r = m->Score(batch, false);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("score request " + std::to_string(first_bad) + ": token " +
                                        std::to_string(V + first_bad)),
              std::string::npos)
        << r.status();
  }
}

double MaxOverMean(const std::vector<std::vector<int64_t>>& load) {
  double worst = 0;
  for (const auto& l : load) {
    const double mean = std::accumulate(l.begin(), l.end(), 0.0) / double(l.size());
    worst = std::max(worst, double(*std::max_element(l.begin(), l.end())) / mean);
  }
  return worst;
}

TEST(LoadBalancing, MoeBlockLoadBecomesUniformOnRandomInputs) {
  // Router skewed toward a few experts; inputs fresh Gaussian every step.
  const int64_t H = 32, E = 16, K = 4, F = 4, n = 512;
  MoeShape s{H, E, K, F, 0, true, true, 1.0};
  std::mt19937_64 rng(1);
  std::vector<float> router = testing::RandomVector<float>(E * H, rng, 0.2), bias(E, 0.0f);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t h = 0; h < H; ++h) router[e * H + h] += 0.06f * float(e) * (h % 2 ? 1.0f : 0.5f);
  std::vector<float> w = testing::RandomVector<float>(F * H, rng), w2 = testing::RandomVector<float>(H * F, rng);
  MoeWeights<float> mw;
  mw.router = router.data();
  mw.bias = bias.data();
  for (int64_t e = 0; e < E; ++e) { mw.w1.push_back(w.data()); mw.w3.push_back(w.data()); mw.w2.push_back(w2.data()); }
  auto skew_on_fresh = [&](int64_t tokens, uint64_t seed) {
    std::mt19937_64 r(seed);
    std::vector<float> x = testing::RandomVector<float>(tokens * H, r), out(tokens * H);
    std::vector<int64_t> load(E, 0);
    MoeSaved<float> sv;
    MoeForward(s, mw, x.data(), tokens, {0, tokens}, nullptr, 0.0, out.data(), &sv, load.data());
    return std::make_pair(MaxOverMean({load}), load);
  };
  const double before = skew_on_fresh(8192, 99).first;
  for (int step = 0; step < 300; ++step) {
    auto [skew, load] = skew_on_fresh(n, 1000 + step);
    UpdateBias(bias.data(), load.data(), E, 0.002);
  }
  const double after = skew_on_fresh(8192, 99).first;
  std::printf("MoE block, max/mean expert load: before %.3f after %.3f\n", before, after);
  EXPECT_GT(before, 1.3);
  EXPECT_LT(after, 1.1);  // sampling noise alone gives ~1.04 on 8192 tokens
}

TEST(LoadBalancing, WholeModelBiasUpdatesReduceSkew) {
  auto m = Tiny(/*gamma=*/0.01);
  // Skew the routers: scaled rows make the high-index experts' scores spread.
  const ModelConfig& c = m->config();
  for (int64_t l = c.dense_layers; l < c.layers; ++l) {
    const TensorInfo* r = m->layout().Find("layers." + std::to_string(l) + ".moe.router");
    for (int64_t e = 0; e < c.experts; ++e)
      for (int64_t h = 0; h < c.hidden; ++h) m->params()[r->offset + e * c.hidden + h] *= float(1 + 4 * e);
  }
  // At init the token identity dominates the hidden state, so loads move in
  // chunks of whole token types and a fixed-step sign update keeps
  // oscillating: compare the average skew of the first and last batches.
  double first = 0, last = 0;
  const int steps = 60;
  for (int step = 0; step < steps; ++step) {
    auto r = m->Score(RandomBatch(6, 96, 200 + step), false);
    ASSERT_TRUE(r.ok());
    if (step < 5) first += MaxOverMean(r->expert_load) / 5;
    if (step >= steps - 20) last += MaxOverMean(r->expert_load) / 20;
    ASSERT_TRUE(m->UpdateRouterBias(r->expert_load).ok());
  }
  std::printf("tiny model, max/mean expert load: first batches %.3f last batches %.3f\n", first, last);
  EXPECT_GT(first, 1.6);
  EXPECT_LT(last, 0.8 * first);
}

TEST(LoadBalancing, UpdateRejectsWrongShapes) {
  auto m = Tiny();
  EXPECT_FALSE(m->UpdateRouterBias({}).ok());
  EXPECT_FALSE(m->UpdateRouterBias(std::vector<std::vector<int64_t>>(3, std::vector<int64_t>(2, 0))).ok());
}

}  // namespace
}  // namespace grove::model
