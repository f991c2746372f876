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
#include <cstring>
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
  int out_stride = 0;  // RouterArgs::out_stride
  int copy_stride = 0;  // RouterArgs::ids_copy_stride (0: no copy)
  int replay_stride = 0;  // RouterArgs::replay_stride
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
  // Replayed ids in rows of replay_stride; the columns past top_k hold an
  // id no router may read (out of range: it would zero a gate).
  const int rstride = c.replay_stride > 0 ? c.replay_stride : c.top_k;
  std::vector<uint16_t> replay(size_t(c.tokens) * rstride, uint16_t(0xBEEF));
  for (int t = 0; t < c.tokens; ++t) {
    std::vector<int> perm(c.experts);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < c.top_k; ++j) replay[size_t(t) * rstride + j] = uint16_t(perm[j]);
  }

  const int stride = c.out_stride > 0 ? c.out_stride : c.top_k;
  DeviceBuffer<float> d_logits(logits.size()), d_bias(c.experts), d_scores(logits.size()),
      d_gates(size_t(c.tokens) * stride);
  DeviceBuffer<uint16_t> d_ids(size_t(c.tokens) * stride), d_replay(replay.size());
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
  a.out_stride = c.out_stride;
  a.replay_stride = c.replay_stride;
  DeviceBuffer<uint16_t> d_copy(size_t(std::max(c.tokens, 1)) * std::max(c.copy_stride, 1));
  GROVE_CUDA_OK(cudaMemset(d_copy.get(), 0xFF, d_copy.count() * 2));
  if (c.copy_stride > 0) {
    a.ids_copy = d_copy.get();
    a.ids_copy_stride = c.copy_stride;
  }
  Status s = RouterTopK(a, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> scores, gates;
  std::vector<uint16_t> ids;
  GROVE_CUDA_OK(d_scores.Download(&scores));
  GROVE_CUDA_OK(d_gates.Download(&gates));
  GROVE_CUDA_OK(d_ids.Download(&ids));
  std::vector<uint16_t> copy;
  GROVE_CUDA_OK(d_copy.Download(&copy));
  if (c.copy_stride > 0) {  // the copy holds the ids, the rest of its rows untouched
    for (int t = 0; t < c.tokens; ++t)
      for (int j = 0; j < c.copy_stride; ++j)
        ASSERT_EQ(copy[size_t(t) * c.copy_stride + j], j < c.top_k ? ids[size_t(t) * stride + j] : uint16_t(0xFFFF))
            << "token " << t << " column " << j;
  }

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
      for (int j = 0; j < c.top_k; ++j) want[j] = replay[size_t(t) * rstride + j];
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
      if (ids[size_t(t) * stride + j] != want[j]) ++bad_ids;
      const double g = (c.norm_topk ? sc[want[j]] / z : sc[want[j]]) * c.route_scale;
      if (!(std::fabs(gates[size_t(t) * stride + j] - g) <= 2e-6 * std::fabs(g) + 1e-12))
        ++bad_gates;
    }
    // Columns past top_k keep the 0xFF fill.
    for (int j = c.top_k; j < stride; ++j) {
      uint32_t gate_bits = 0;
      std::memcpy(&gate_bits, &gates[size_t(t) * stride + j], 4);
      if (ids[size_t(t) * stride + j] != 0xFFFF || gate_bits != 0xFFFFFFFFu) ++bad_ids;
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
  // Each count of slots a lane walks (RouterSlotsPerLane): 1, 2, 4, 8, at both ends of each.
  for (int experts : {32, 33, 65, 128, 129})
    CheckRouter({300, experts, 8, experts % 2 == 1, true, true, false, false, 1.f});
}

TEST(RouterTest, TiesGoToTheLowerId) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouter({64, 64, 6, false, false, false, false, true, 1.f});  // all equal: ids 0..5
}

TEST(RouterTest, ReplayedIdsAreUsedAsGiven) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouter({1000, 64, 6, true, true, true, true, false, 1.f});
  // One layer's slice of the learner's [token][layer][top_k] routes.
  Case strided{1000, 64, 6, true, true, true, true, false, 1.f};
  strided.replay_stride = 15 * 6;
  CheckRouter(strided);
}

TEST(RouterTest, WiderOutputRowsAndTheIdsCopy) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouter({1000, 64, 6, true, true, true, false, false, 2.5f, 8});
  CheckRouter({300, 64, 6, true, true, true, true, false, 1.f, 9});
  CheckRouter({500, 64, 6, true, true, true, false, false, 1.f, 0, 90});  // ids copied into a routes record
  CheckRouter({77, 8, 2, false, false, false, false, false, 1.f, 4, 2});
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
  a.out_stride = 1;  // narrower than top_k
  EXPECT_EQ(RouterTopK(a, nullptr).code(), StatusCode::kInvalidArgument);
  a.out_stride = 0;
  uint16_t dummy = 0;
  a.ids_copy = &dummy;  // copy stride narrower than top_k
  a.ids_copy_stride = 1;
  EXPECT_EQ(RouterTopK(a, nullptr).code(), StatusCode::kInvalidArgument);
  a.ids_copy = nullptr;
}

// RouterBackward against model/moe.h's MoeBackward (gates -> scores ->
// logits, plus the sequence-wise balance loss) evaluated in double on the
// kernel's fp32 inputs. The kernel's fp32 sums run over at most E = 256
// terms, so each output is within 256 * 2^-24 * (sum of the magnitudes that
// make it) of the reference; the test uses 2e-5 times the row's largest
// |d/ds| times its largest score term, a bound above that.
struct BackwardCase {
  int tokens, experts, top_k;
  bool sigmoid, norm_topk;
  float route_scale, alpha;
  int sequences;
};

void CheckRouterBackward(const BackwardCase& c) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " E " + std::to_string(c.experts) + " k " +
               std::to_string(c.top_k) + " alpha " + std::to_string(c.alpha));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.5f);
  const int E = c.experts, K = c.top_k;
  std::vector<float> scores(size_t(c.tokens) * E), dgates(size_t(c.tokens) * K);
  std::vector<uint16_t> ids(size_t(c.tokens) * K);
  for (int t = 0; t < c.tokens; ++t) {
    float* sc = &scores[size_t(t) * E];
    double sum = 0;
    for (int e = 0; e < E; ++e) {
      const double l = nd(rng);
      sc[e] = c.sigmoid ? float(1.0 / (1.0 + std::exp(-l))) : float(std::exp(l));
      sum += sc[e];
    }
    if (!c.sigmoid)
      for (int e = 0; e < E; ++e) sc[e] = float(sc[e] / sum);
    std::vector<int> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < K; ++j) {
      ids[size_t(t) * K + j] = uint16_t(perm[j]);
      dgates[size_t(t) * K + j] = nd(rng);
    }
  }
  // Ragged sequences, one of them empty, covering all tokens.
  std::vector<int32_t> seq{0};
  for (int q = 1; q < c.sequences; ++q)
    seq.push_back(q == 1 ? 0 : std::min(c.tokens, seq.back() + int(std::uniform_int_distribution<int>(0, 2 * c.tokens / c.sequences)(rng))));
  seq.push_back(c.tokens);

  // Reference: model/moe.h's backward in double.
  std::vector<double> ref(size_t(c.tokens) * E, 0.0), row_scale(c.tokens, 0.0);
  double ref_loss = 0;  // alpha * sum over sequences of sum_e f_e P_e, as MoeForward returns it
  for (int q = 0; q + 1 < int(seq.size()); ++q) {
    const int t0 = seq[q], t1 = seq[q + 1], len = t1 - t0;
    std::vector<double> fcoef(E, 0.0);
    if (c.alpha > 0 && len > 0)
      for (int t = t0; t < t1; ++t)
        for (int j = 0; j < K; ++j) fcoef[ids[size_t(t) * K + j]] += double(c.alpha) * E / double(K * len) / len;
    for (int t = t0; t < t1; ++t) {
      const float* sc = &scores[size_t(t) * E];
      const uint16_t* id = &ids[size_t(t) * K];
      const float* dg = &dgates[size_t(t) * K];
      std::vector<double> dl(E, 0.0);
      if (c.norm_topk) {
        double z = 0, dot = 0;
        for (int j = 0; j < K; ++j) z += sc[id[j]];
        for (int j = 0; j < K; ++j) dot += double(dg[j]) * sc[id[j]] / z;
        for (int j = 0; j < K; ++j) dl[id[j]] += double(c.route_scale) * (dg[j] - dot) / z;
      } else {
        for (int j = 0; j < K; ++j) dl[id[j]] += double(c.route_scale) * dg[j];
      }
      if (c.alpha > 0) {
        double z = 0, dot = 0;
        for (int e = 0; e < E; ++e) z += sc[e];
        for (int e = 0; e < E; ++e) dot += fcoef[e] * sc[e] / z;
        for (int e = 0; e < E; ++e) dl[e] += (fcoef[e] - dot) / z;
        ref_loss += dot;  // fcoef holds alpha f_e / len: this token's share of the loss
      }
      double dl_max = 0;
      for (int e = 0; e < E; ++e) dl_max = std::max(dl_max, std::fabs(dl[e]));
      row_scale[t] = dl_max;
      if (c.sigmoid) {
        for (int e = 0; e < E; ++e) dl[e] *= double(sc[e]) * (1.0 - sc[e]);
      } else {
        double dot = 0;
        for (int e = 0; e < E; ++e) dot += dl[e] * sc[e];
        for (int e = 0; e < E; ++e) dl[e] = sc[e] * (dl[e] - dot);
      }
      std::copy(dl.begin(), dl.end(), ref.begin() + size_t(t) * E);
    }
  }

  DeviceBuffer<float> d_scores(scores.size()), d_dgates(dgates.size()), d_dlogits(scores.size());
  DeviceBuffer<uint16_t> d_ids(ids.size());
  DeviceBuffer<int32_t> d_seq(seq.size());
  const size_t ws_bytes = RouterBackwardWorkspaceBytes(c.sequences, c.tokens, E);
  DeviceBuffer<char> d_ws(ws_bytes);
  DeviceBuffer<float> d_loss(1);
  GROVE_CUDA_OK(d_scores.Upload(scores));
  GROVE_CUDA_OK(d_dgates.Upload(dgates));
  GROVE_CUDA_OK(d_ids.Upload(ids));
  GROVE_CUDA_OK(d_seq.Upload(seq));
  GROVE_CUDA_OK(cudaMemset(d_dlogits.get(), 0x7F, d_dlogits.count() * 4));
  RouterBackwardArgs a;
  a.scores = d_scores.get();
  a.ids = d_ids.get();
  a.dgates = d_dgates.get();
  a.dlogits = d_dlogits.get();
  a.tokens = c.tokens;
  a.experts = E;
  a.top_k = K;
  a.sigmoid = c.sigmoid;
  a.norm_topk = c.norm_topk;
  a.route_scale = c.route_scale;
  a.balance_alpha = c.alpha;
  a.seq_offsets = d_seq.get();
  a.sequences = c.sequences;
  a.workspace = d_ws.get();
  a.workspace_bytes = ws_bytes;
  a.balance_loss = c.alpha > 0 ? d_loss.get() : nullptr;
  Status s = RouterBackward(a, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<float> dlogits;
  GROVE_CUDA_OK(d_dlogits.Download(&dlogits));
  size_t bad = 0;
  for (int t = 0; t < c.tokens; ++t)
    for (int e = 0; e < E; ++e) {
      const size_t i = size_t(t) * E + e;
      if (!(std::fabs(dlogits[i] - ref[i]) <= 2e-5 * row_scale[t] + 1e-30) && bad++ < 3)
        ADD_FAILURE() << "token " << t << " expert " << e << ": " << dlogits[i] << " vs " << ref[i]
                      << " (row scale " << row_scale[t] << ")";
    }
  EXPECT_EQ(bad, 0u);
  if (c.alpha > 0) {
    // Per token an fp32 sum of E <= 256 positive products: within
    // (E + 2) 2^-24 < 1.6e-5 relative, and so is the double sum of them.
    std::vector<float> loss;
    GROVE_CUDA_OK(d_loss.Download(&loss));
    EXPECT_NEAR(loss[0], ref_loss, 2e-5 * ref_loss + 1e-30);
  }
}

TEST(RouterBackwardTest, GpuReferenceRouting) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouterBackward({4099, 64, 6, true, true, 1.f, 1e-4f, 7});  // gpu-ref: sigmoid, norm_topk, balance
  CheckRouterBackward({4099, 64, 6, true, true, 1.f, 0.f, 1});
}

TEST(RouterBackwardTest, SoftmaxAndOtherShapes) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRouterBackward({1000, 64, 6, false, false, 1.f, 0.f, 1});
  CheckRouterBackward({1000, 64, 6, false, true, 2.5f, 0.01f, 9});
  CheckRouterBackward({333, 256, 16, true, false, 1.5f, 0.01f, 4});
  CheckRouterBackward({100, 3, 1, false, true, 1.f, 0.1f, 2});
  for (int experts : {32, 33, 65, 128, 129})  // every count of slots a lane walks
    CheckRouterBackward({500, experts, 8, experts % 2 == 0, true, 1.f, 0.01f, 3});
}

TEST(RouterBackwardTest, RejectsBadShapes) {
  RouterBackwardArgs a;
  a.tokens = 1;
  a.experts = kRouterMaxExperts + 1;
  a.top_k = 1;
  EXPECT_EQ(RouterBackward(a, nullptr).code(), StatusCode::kInvalidArgument);
  a.experts = 8;
  EXPECT_EQ(RouterBackward(a, nullptr).code(), StatusCode::kInvalidArgument);  // null pointers
  float f = 0;
  uint16_t id = 0;
  a.scores = a.dgates = a.dlogits = &f;
  a.ids = &id;
  a.balance_alpha = 0.1f;  // without sequences and workspace
  EXPECT_EQ(RouterBackward(a, nullptr).code(), StatusCode::kInvalidArgument);
  a.balance_alpha = -1.f;
  EXPECT_EQ(RouterBackward(a, nullptr).code(), StatusCode::kInvalidArgument);
  a.balance_alpha = 0.f;
  a.balance_loss = &f;  // a loss without the balance term
  EXPECT_EQ(RouterBackward(a, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
