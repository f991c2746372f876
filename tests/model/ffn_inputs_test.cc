// Transformer::KeptFfnInputs: the FFN inputs of a kept Score, in batch order.
#include <gtest/gtest.h>

#include <cmath>

#include "model/moe.h"
#include "model/transformer.h"
#include "tests/model/test_util.h"

namespace grove::model {
namespace {

std::vector<ScoreRequest> Batch(const ModelConfig& c, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<ScoreRequest> b(n);
  for (int i = 0; i < n; ++i) {
    b[i].tokens.resize(5 + 2 * i);
    for (auto& t : b[i].tokens) t = int32_t(rng() % c.vocab_size);
  }
  return b;
}

TEST(KeptFfnInputs, RoutingRecomputedFromInputsMatchesTheForward) {
  ModelConfig c = testing::MicroConfig(ScoreFunc::kSigmoid, true, 0.0);
  auto m = std::move(*Model::Create(c, 3));
  m->set_threads(3);  // several shards: rows must still come in batch order
  std::vector<ScoreRequest> batch = Batch(c, 4, 1);
  EXPECT_EQ(m->KeptFfnInputs(1).status().code(), StatusCode::kFailedPrecondition);
  auto res = m->Score(batch, true);
  ASSERT_TRUE(res.ok()) << res.status();
  const int64_t H = c.hidden, K = c.top_k, M = c.moe_layers();
  for (int64_t l = 0; l < c.layers; ++l) {
    auto in = m->KeptFfnInputs(l);
    ASSERT_TRUE(in.ok()) << in.status();
    int64_t rows = 0;
    for (const auto& r : batch) rows += int64_t(r.tokens.size()) - 1;
    ASSERT_EQ(in->rows, rows);
    ASSERT_EQ(int64_t(in->x.size()), rows * H);
    // ffn_norm weights are 1 at init: every row has unit RMS.
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t d = 0; d < H; ++d) ss += double(in->x[r * H + d]) * in->x[r * H + d];
      EXPECT_NEAR(std::sqrt(ss / H), 1.0, 1e-3);
    }
    if (!c.is_moe_layer(l)) {
      EXPECT_TRUE(in->experts.empty());
      continue;
    }
    // The routes of the forward, row for row.
    const int64_t mi = c.moe_index(l);
    int64_t row = 0;
    for (size_t q = 0; q < batch.size(); ++q)
      for (int64_t t = 0; t + 1 < int64_t(batch[q].tokens.size()); ++t, ++row)
        for (int64_t j = 0; j < K; ++j)
          EXPECT_EQ(in->experts[row * K + j], res->routes[q][(t * M + mi) * K + j]);
    // Routing the returned inputs again gives the same experts and gates.
    const ParamLayout& L = m->layout();
    const std::string p = "layers." + std::to_string(l) + ".moe.";
    MoeShape shape{H, c.experts, K, c.expert_hidden, c.shared_experts * c.expert_hidden, true, true, c.route_scale};
    MoeWeights<float> w;
    w.router = m->params().data() + L.Offset(p + "router");
    w.bias = m->params().data() + L.Offset(p + "router_bias");
    for (int64_t e = 0; e < c.experts; ++e) {
      const std::string x = p + "experts." + std::to_string(e) + ".";
      w.w1.push_back(m->params().data() + L.Offset(x + "w1"));
      w.w3.push_back(m->params().data() + L.Offset(x + "w3"));
      w.w2.push_back(m->params().data() + L.Offset(x + "w2"));
    }
    w.s_w1 = m->params().data() + L.Offset(p + "shared.w1");
    w.s_w3 = m->params().data() + L.Offset(p + "shared.w3");
    w.s_w2 = m->params().data() + L.Offset(p + "shared.w2");
    MoeSaved<float> saved;
    std::vector<float> out(rows * H);
    MoeForward(shape, w, in->x.data(), rows, {0, rows}, nullptr, 0.0, out.data(), &saved, nullptr);
    for (int64_t i = 0; i < rows * K; ++i) {
      EXPECT_EQ(saved.ids[i], in->experts[i]);
      EXPECT_NEAR(saved.gates[i], in->gates[i], 1e-6);
    }
  }
  EXPECT_EQ(m->KeptFfnInputs(c.layers).status().code(), StatusCode::kInvalidArgument);
  // Backward consumes the kept forward.
  std::vector<std::vector<float>> d(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) d[i].assign(res->logprobs[i].size(), -1.0f);
  ASSERT_TRUE(m->Backward(d).ok());
  EXPECT_EQ(m->KeptFfnInputs(1).status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace grove::model
