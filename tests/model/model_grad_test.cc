// The whole model's backward (embedding to lm head, dense and MoE layers,
// router paths and balance loss) against finite differences in double.
#include <gtest/gtest.h>

#include <cmath>

#include "model/transformer.h"
#include "tests/model/grad_check.h"
#include "tests/model/test_util.h"

namespace grove::model {
namespace {

struct Case {
  ScoreFunc score;
  bool norm_topk;
  double alpha;
};
class ModelGrad : public ::testing::TestWithParam<Case> {};

TEST_P(ModelGrad, EveryTensorMatchesFiniteDifferences) {
  const Case cs = GetParam();
  ModelConfig c = testing::MicroConfig(cs.score, cs.norm_topk, cs.alpha);
  auto made = Transformer<double>::Create(c, 42);
  ASSERT_TRUE(made.ok()) << made.status();
  Transformer<double>& m = **made;
  std::mt19937_64 rng(9);
  // Give the router bias non-zero values: it must still get no gradient.
  for (int64_t l = c.dense_layers; l < c.layers; ++l) {
    const TensorInfo* b = m.layout().Find("layers." + std::to_string(l) + ".moe.router_bias");
    for (int64_t i = 0; i < b->numel; ++i) m.params()[b->offset + i] = 0.05 * double(i);
  }
  std::vector<ScoreRequest> batch(2);
  batch[0].tokens = {1, 4, 7, 3, 9, 2, 5};
  batch[0].score_from = 3;
  batch[1].tokens = {1, 10, 0, 6};
  batch[1].score_from = 1;
  auto base = m.Score(batch, /*keep_for_backward=*/true);
  ASSERT_TRUE(base.ok()) << base.status();
  std::vector<std::vector<double>> w;
  for (auto& lp : base->logprobs) w.push_back(testing::RandomVector<double>(lp.size(), rng));
  ASSERT_EQ(w[0].size(), 4u);
  ASSERT_EQ(w[1].size(), 3u);
  if (cs.alpha > 0) {
    EXPECT_GT(base->balance_loss, 0.0);
  }
  m.ZeroGrad();
  ASSERT_TRUE(m.Backward(w).ok());
  std::vector<double> grad(m.grads().begin(), m.grads().end());
  // Replay the base routes so the function is smooth around the point.
  std::vector<ScoreRequest> replay = batch;
  for (size_t i = 0; i < batch.size(); ++i) replay[i].replay_routes = base->routes[i];
  auto loss = [&] {
    auto r = m.Score(replay, /*keep_for_backward=*/true);  // keep: the balance loss is reported then
    EXPECT_TRUE(r.ok());
    double s = r->balance_loss;
    for (size_t i = 0; i < w.size(); ++i) s += testing::Dot(w[i], r->logprobs[i]);
    return s;
  };
  for (const TensorInfo& t : m.layout().tensors()) {
    testing::CheckGradient(t.name, m.params().subspan(t.offset, t.numel),
                           std::span<const double>(grad).subspan(t.offset, t.numel), loss, 3, rng);
    if (!t.trainable) {
      for (int64_t i = 0; i < t.numel; ++i) EXPECT_EQ(grad[t.offset + i], 0.0) << t.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Routers, ModelGrad,
                         ::testing::Values(Case{ScoreFunc::kSigmoid, true, 0.0}, Case{ScoreFunc::kSigmoid, true, 0.2},
                                           Case{ScoreFunc::kSoftmax, false, 0.1}));

TEST(ModelGrad, BackwardNeedsAKeptForward) {
  auto m = Transformer<double>::Create(testing::MicroConfig(ScoreFunc::kSigmoid, true, 0.0), 1);
  ASSERT_TRUE(m.ok());
  Status s = (*m)->Backward({});
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  auto r = (*m)->Score({ScoreRequest{{1, 2, 3}, 1, {}}}, true);
  ASSERT_TRUE(r.ok());
  auto other = (*m)->Score({ScoreRequest{{4, 5}, 1, {}}}, false);  // does not drop the kept activations
  ASSERT_TRUE(other.ok());
  s = (*m)->Backward({{1.0}});  // wrong count: 2 log-probs
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("1 gradients for 2 log-probs"), std::string::npos) << s;
  EXPECT_TRUE((*m)->Backward({{1.0, -1.0}}).ok());
  EXPECT_EQ((*m)->Backward({{1.0, -1.0}}).code(), StatusCode::kFailedPrecondition);  // consumed
}

TEST(ModelGrad, ShardedStepEqualsSingleShard) {
  // Score/Backward over 1 shard and over 3 parallel shards give the same
  // log-probs, routes, loads, balance loss and (summed) gradients.
  ModelConfig c = testing::MicroConfig(ScoreFunc::kSigmoid, true, 0.1);
  auto made = Transformer<double>::Create(c, 8);
  ASSERT_TRUE(made.ok());
  Transformer<double>& m = **made;
  std::mt19937_64 rng(4);
  std::vector<ScoreRequest> batch(5);
  for (size_t i = 0; i < batch.size(); ++i) {
    batch[i].tokens.resize(4 + 2 * i);
    for (auto& t : batch[i].tokens) t = int32_t(rng() % c.vocab_size);
    batch[i].score_from = 2;
  }
  std::vector<std::vector<double>> w;
  for (const auto& r : batch) w.push_back(testing::RandomVector<double>(r.tokens.size() - 2, rng));
  auto run = [&](int threads) {
    m.set_threads(threads);
    m.ZeroGrad();
    auto r = m.Score(batch, true);
    EXPECT_TRUE(r.ok());
    EXPECT_TRUE(m.Backward(w).ok());
    return std::make_pair(*r, std::vector<double>(m.grads().begin(), m.grads().end()));
  };
  auto [one, g1] = run(1);
  auto [three, g3] = run(3);
  EXPECT_EQ(one.routes, three.routes);
  EXPECT_EQ(one.expert_load, three.expert_load);
  EXPECT_NEAR(one.balance_loss, three.balance_loss, 1e-12);
  for (size_t i = 0; i < batch.size(); ++i)
    for (size_t j = 0; j < one.logprobs[i].size(); ++j) EXPECT_NEAR(one.logprobs[i][j], three.logprobs[i][j], 1e-12);
  for (size_t i = 0; i < g1.size(); ++i) ASSERT_NEAR(g1[i], g3[i], 1e-12 + 1e-10 * std::fabs(g1[i])) << i;
}

TEST(ModelTraining, SupervisedLossFallsOnTwoCores) {
  // Plain SGD on -sum logprob of one short sequence: the loss must fall,
  // which it only does if the gradient points the right way at fp32.
  ModelConfig c = testing::MicroConfig(ScoreFunc::kSigmoid, true, 0.0);
  c.hidden = 16; c.init_std = 0.1;
  auto made = Model::Create(c, 3);
  ASSERT_TRUE(made.ok());
  Model& m = **made;
  std::vector<ScoreRequest> batch = {ScoreRequest{{1, 4, 7, 3, 9, 2, 5, 8, 8, 6}, 1, {}}};
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    auto r = m.Score(batch, true);
    ASSERT_TRUE(r.ok());
    double loss = 0;
    for (float lp : r->logprobs[0]) loss -= lp;
    if (step == 0) first = loss;
    last = loss;
    m.ZeroGrad();
    ASSERT_TRUE(m.Backward({std::vector<float>(r->logprobs[0].size(), -1.0f)}).ok());
    for (const TensorInfo& t : m.layout().tensors()) {
      if (!t.trainable) continue;
      for (int64_t i = 0; i < t.numel; ++i) m.params()[t.offset + i] -= 0.05f * m.grads()[t.offset + i];
    }
  }
  EXPECT_LT(last, 0.5 * first) << "first " << first << " last " << last;
}

}  // namespace
}  // namespace grove::model
