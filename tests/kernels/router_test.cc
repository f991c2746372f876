// The router (scores, top-k of score + bias, gates) against model/moe.h's
// definition on the CPU. Scores are compared with a double reference (expf
// and fp32 sums: within 5e-6 relative). The selection is then checked
// exactly against the CPU rule applied to the kernel's own fp32 scores with
// the same fp32 addition of the bias: comparing with double scores would
// make a near-tie at fp32 resolution a false failure. Gates: the fp32 sum of
// at most 16 selected scores and one division, within 2e-6 relative.
#include "kernels/router.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

struct Case {
  int tokens, experts, top_k;
  bool sigmoid, norm_topk, with_bias, replay, equal_logits;
  float route_scale;
};

void CheckRouter(const Case& c) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " E " + std::to_string(c.experts) + " k " +
               std::to_string(c.top_k));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<float> logits(size_t(c.tokens) * c.experts), bias(c.experts, 0.f);
  for (float& x : logits) x = c.equal_logits ? 0.5f : nd(rng);
  if (c.with_bias)
    for (float& b : bias) b = 0.05f * nd(rng);
  std::vector<uint16_t> replay(size_t(c.tokens) * c.top_k);
  for (int t = 0; t < c.tokens; ++t) {
    std::vector<int> perm(c.experts);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < c.top_k; ++j) replay[size_t(t) * c.top_k + j] = uint16_t(perm[j]);
  }

  DeviceBuffer<float> d_logits(logits.size()), d_bias(c.experts), d_scores(logits.size()),
      d_gates(size_t(c.tokens) * c.top_k);
  DeviceBuffer<uint16_t> d_ids(size_t(c.tokens) * c.top_k), d_replay(replay.size());
  GROVE_CUDA_OK(d_logits.Upload(logits));
  GROVE_CUDA_OK(d_bias.Upload(bias));
  GROVE_CUDA_OK(d_replay.Upload(replay));
  GROVE_CUDA_OK(cudaMemset(d_scores.get(), 0xFF, d_scores.count() * 4));
  GROVE_CUDA_OK(cudaMemset(d_gates.get(), 0xFF, d_gates.count() * 4));
  GROVE_CUDA_OK(cudaMemset(d_ids.get(), 0xFF, d_ids.count() * 2));
  RouterArgs a;
  a.logits = d_logits.get();
  a.bias = c.with_bias ? d_bias.get() : nullptr;
  a.replay_ids = c.replay ? d_replay.get() : nullptr;
  a.scores = d_scores.get();
  a.ids = d_ids.get();
  a.gates = d_gates.get();
  a.tokens = c.tokens;
  a.experts = c.experts;
  a.top_k = c.top_k;
  a.sigmoid = c.sigmoid;
  a.norm_topk = c.norm_topk;
  a.route_scale = c.route_scale;
  Status s = RouterTopK(a, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> scores, gates;
  std::vector<uint16_t> ids;
  GROVE_CUDA_OK(d_scores.Download(&scores));
  GROVE_CUDA_OK(d_gates.Download(&gates));
  GROVE_CUDA_OK(d_ids.Download(&ids));

  size_t bad_scores = 0, bad_ids = 0, bad_gates = 0;
  for (int t = 0; t < c.tokens; ++t) {
    const float* lg = &logits[size_t(t) * c.experts];
    const float* sc = &scores[size_t(t) * c.experts];
    std::vector<double> ref(c.experts);
    if (c.sigmoid) {
      for (int e = 0; e < c.experts; ++e) ref[e] = 1.0 / (1.0 + std::exp(-double{lg[e]}));
    } else {
      const double mx = *std::max_element(lg, lg + c.experts);
      double sum = 0;
      for (int e = 0; e < c.experts; ++e) sum += (ref[e] = std::exp(lg[e] - mx));
      for (double& r : ref) r /= sum;
    }
    for (int e = 0; e < c.experts; ++e)
      if (!(std::fabs(sc[e] - ref[e]) <= 5e-6 * ref[e] + 1e-12)) ++bad_scores;
    // The CPU rule on the kernel's scores.
    std::vector<int> want(c.top_k);
    if (c.replay) {
      for (int j = 0; j < c.top_k; ++j) want[j] = replay[size_t(t) * c.top_k + j];
    } else {
      std::vector<float> key(c.experts);
      for (int e = 0; e < c.experts; ++e) key[e] = sc[e] + bias[e];
      std::vector<int> order(c.experts);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + c.top_k, order.end(), [&](int i, int j) {
        return key[i] > key[j] || (key[i] == key[j] && i < j);
      });
      std::copy(order.begin(), order.begin() + c.top_k, want.begin());
    }
    double z = 0;
    for (int j = 0; j < c.top_k; ++j) z += sc[want[j]];
    for (int j = 0; j < c.top_k; ++j) {
      if (ids[size_t(t) * c.top_k + j] != want[j]) ++bad_ids;
      const double g = (c.norm_topk ? sc[want[j]] / z : sc[want[j]]) * c.route_scale;
      if (!(std::fabs(gates[size_t(t) * c.top_k + j] - g) <= 2e-6 * std::fabs(g) + 1e-12))
        ++bad_gates;
    }
  }
  EXPECT_EQ(bad_scores, 0u);
  EXPECT_EQ(bad_ids, 0u);
  EXPECT_EQ(bad_gates, 0u);
}

TEST(RouterTest, SoftmaxTop6Of64) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouter({5000, 64, 6, false, false, false, false, false, 1.f});
}

TEST(RouterTest, SigmoidWithBiasNormalizedScaled) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouter({5000, 64, 8, true, true, true, false, false, 2.5f});
}

TEST(RouterTest, WidestAndNarrowest) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouter({777, 256, 16, true, true, true, false, false, 1.f});
  CheckRouter({100, 3, 1, false, false, true, false, false, 1.f});
  CheckRouter({100, 40, 7, false, true, false, false, false, 1.f});
}

TEST(RouterTest, TiesGoToTheLowerId) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouter({64, 64, 6, false, false, false, false, true, 1.f});  // all equal: ids 0..5
}

TEST(RouterTest, ReplayedIdsAreUsedAsGiven) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouter({1000, 64, 6, true, true, true, true, false, 1.f});
}

TEST(RouterTest, RejectsBadShapes) {
  RouterArgs a;
  a.tokens = 1;
  a.experts = kRouterMaxExperts + 1;
  a.top_k = 1;
  EXPECT_EQ(RouterTopK(a, nullptr).code(), StatusCode::kInvalidArgument);
  a.experts = 8;
  a.top_k = 9;
  EXPECT_EQ(RouterTopK(a, nullptr).code(), StatusCode::kInvalidArgument);
  a.top_k = 2;  // null pointers
  EXPECT_EQ(RouterTopK(a, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
