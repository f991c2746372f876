// Every layer's backward against finite differences, in double precision.
#include <gtest/gtest.h>

#include "model/layers.h"
#include "model/moe.h"
#include "tests/model/grad_check.h"
#include "tests/model/test_util.h"

namespace grove::model {
namespace {

using testing::CheckGradient;
using testing::Dot;
using testing::RandomVector;
using V = std::vector<double>;

TEST(LayerGrad, Linear) {
  std::mt19937_64 rng(1);
  const int64_t n = 5, in = 7, out = 3;
  V x = RandomVector<double>(n * in, rng), w = RandomVector<double>(out * in, rng), r = RandomVector<double>(n * out, rng);
  auto loss = [&] { V y(n * out); layers::LinearForward(x.data(), w.data(), y.data(), n, in, out); return Dot(y, r); };
  V dx(n * in, 0.0), dw(out * in, 0.0);
  layers::LinearBackward(x.data(), w.data(), r.data(), dx.data(), dw.data(), n, in, out);
  CheckGradient("linear x", &x, dx, loss, 100, rng);
  CheckGradient("linear w", &w, dw, loss, 100, rng);
}

TEST(LayerGrad, RmsNorm) {
  std::mt19937_64 rng(2);
  const int64_t n = 4, d = 9;
  V x = RandomVector<double>(n * d, rng), w = RandomVector<double>(d, rng), r = RandomVector<double>(n * d, rng);
  auto loss = [&] {
    V y(n * d), rs(n);
    layers::RmsNormForward(x.data(), w.data(), y.data(), rs.data(), n, d, 1e-6);
    return Dot(y, r);
  };
  V y(n * d), rs(n), dx(n * d, 0.0), dw(d, 0.0);
  layers::RmsNormForward(x.data(), w.data(), y.data(), rs.data(), n, d, 1e-6);
  layers::RmsNormBackward(x.data(), w.data(), rs.data(), r.data(), dx.data(), dw.data(), n, d);
  CheckGradient("rmsnorm x", &x, dx, loss, 100, rng);
  CheckGradient("rmsnorm w", &w, dw, loss, 100, rng);
}

TEST(LayerGrad, RopeInverseIsTransposeAndKeepsNorm) {
  std::mt19937_64 rng(3);
  const int64_t hd = 8, nh = 3;
  std::vector<double> cs, sn;
  layers::RopeTables(20, hd, 10000.0, &cs, &sn);
  V x = RandomVector<double>(nh * hd, rng), r = RandomVector<double>(nh * hd, rng);
  const int64_t pos = 13;
  auto loss = [&] { V y = x; layers::RopeRow(y.data(), nh, hd, &cs[pos * hd / 2], &sn[pos * hd / 2], false); return Dot(y, r); };
  V dx = r;
  layers::RopeRow(dx.data(), nh, hd, &cs[pos * hd / 2], &sn[pos * hd / 2], true);
  CheckGradient("rope", &x, dx, loss, 100, rng);
  // Position 0 is the identity; a rotation keeps each pair's norm.
  V y = x;
  layers::RopeRow(y.data(), nh, hd, &cs[0], &sn[0], false);
  for (int64_t i = 0; i < nh * hd; ++i) EXPECT_DOUBLE_EQ(y[i], x[i]);
}

TEST(LayerGrad, CausalGqaAttention) {
  std::mt19937_64 rng(4);
  const int64_t n = 6, heads = 4, kvh = 2, hd = 3;
  V q = RandomVector<double>(n * heads * hd, rng), k = RandomVector<double>(n * kvh * hd, rng),
    v = RandomVector<double>(n * kvh * hd, rng), r = RandomVector<double>(n * heads * hd, rng);
  std::vector<double> scratch;
  auto loss = [&] {
    V o(n * heads * hd);
    layers::AttentionForward(q.data(), k.data(), v.data(), o.data(), static_cast<double*>(nullptr), n, 0, heads, kvh,
                             hd, &scratch);
    return Dot(o, r);
  };
  V o(n * heads * hd), probs(heads * n * n), dq(q.size()), dk(k.size(), 0.0), dv(v.size(), 0.0);
  layers::AttentionForward(q.data(), k.data(), v.data(), o.data(), probs.data(), n, 0, heads, kvh, hd, &scratch);
  layers::AttentionBackward(q.data(), k.data(), v.data(), probs.data(), r.data(), dq.data(), dk.data(), dv.data(), n,
                            heads, kvh, hd, &scratch);
  CheckGradient("attn q", &q, dq, loss, 1000, rng);
  CheckGradient("attn k", &k, dk, loss, 1000, rng);
  CheckGradient("attn v", &v, dv, loss, 1000, rng);
  // Causality: the first query row only sees key 0.
  for (int64_t h = 0; h < heads; ++h) EXPECT_DOUBLE_EQ(probs[h * n * n + 0], 1.0);
}

TEST(LayerGrad, SwiGlu) {
  std::mt19937_64 rng(5);
  const int64_t n = 4, d = 5, F = 7;
  V x = RandomVector<double>(n * d, rng), w1 = RandomVector<double>(F * d, rng), w3 = RandomVector<double>(F * d, rng),
    w2 = RandomVector<double>(d * F, rng), r = RandomVector<double>(n * d, rng);
  auto loss = [&] {
    V a(n * F), b(n * F), h(n * F), y(n * d);
    layers::SwiGluForward(x.data(), w1.data(), w3.data(), w2.data(), a.data(), b.data(), h.data(), y.data(), n, d, F);
    return Dot(y, r);
  };
  V a(n * F), b(n * F), h(n * F), y(n * d), dx(n * d, 0.0), d1(F * d, 0.0), d3(F * d, 0.0), d2(d * F, 0.0), sc;
  layers::SwiGluForward(x.data(), w1.data(), w3.data(), w2.data(), a.data(), b.data(), h.data(), y.data(), n, d, F);
  layers::SwiGluBackward(x.data(), w1.data(), w3.data(), w2.data(), a.data(), b.data(), h.data(), r.data(), dx.data(),
                         d1.data(), d3.data(), d2.data(), n, d, F, &sc);
  CheckGradient("swiglu x", &x, dx, loss, 100, rng);
  CheckGradient("swiglu w1", &w1, d1, loss, 100, rng);
  CheckGradient("swiglu w3", &w3, d3, loss, 100, rng);
  CheckGradient("swiglu w2", &w2, d2, loss, 100, rng);
}

struct MoeCase {
  bool sigmoid, norm_topk;
  double alpha;
  int64_t shared;
};

class MoeGrad : public ::testing::TestWithParam<MoeCase> {};

// The MoE block, router gradient paths included (gates through scores, and
// the balance loss through the normalized scores). Finite differences replay
// the routes of the unperturbed point, so a tiny step never flips a top-k
// choice; the analytic gradient is the derivative of exactly that function.
TEST_P(MoeGrad, MatchesFiniteDifferences) {
  const MoeCase mc = GetParam();
  std::mt19937_64 rng(6);
  const int64_t H = 6, E = 5, K = 2, F = 4, n = 7;
  MoeShape s{H, E, K, F, mc.shared * F, mc.sigmoid, mc.norm_topk, 1.3};
  V router = RandomVector<double>(E * H, rng), bias = RandomVector<double>(E, rng, 0.1);
  std::vector<V> w1, w3, w2;
  for (int64_t e = 0; e < E; ++e) {
    w1.push_back(RandomVector<double>(F * H, rng)); w3.push_back(RandomVector<double>(F * H, rng));
    w2.push_back(RandomVector<double>(H * F, rng));
  }
  V sw1 = RandomVector<double>(mc.shared * F * H, rng), sw3 = RandomVector<double>(mc.shared * F * H, rng),
    sw2 = RandomVector<double>(H * mc.shared * F, rng);
  V x = RandomVector<double>(n * H, rng), r = RandomVector<double>(n * H, rng);
  std::vector<int64_t> seq = {0, 3, n};  // two sequences
  auto weights = [&] {
    MoeWeights<double> w;
    w.router = router.data(); w.bias = bias.data();
    for (int64_t e = 0; e < E; ++e) { w.w1.push_back(w1[e].data()); w.w3.push_back(w3[e].data()); w.w2.push_back(w2[e].data()); }
    if (mc.shared) { w.s_w1 = sw1.data(); w.s_w3 = sw3.data(); w.s_w2 = sw2.data(); }
    return w;
  };
  MoeSaved<double> base;
  V out(n * H);
  std::vector<int64_t> load(E, 0);
  MoeForward(s, weights(), x.data(), n, seq, nullptr, mc.alpha, out.data(), &base, load.data());
  const std::vector<uint16_t> routes = base.ids;
  int64_t total = 0;
  for (int64_t l : load) total += l;
  EXPECT_EQ(total, n * K);
  auto loss = [&] {
    MoeSaved<double> sv;
    V o(n * H);
    double bal = MoeForward(s, weights(), x.data(), n, seq, routes.data(), mc.alpha, o.data(), &sv, nullptr);
    return Dot(o, r) + bal;
  };
  V dx(n * H, 0.0), drouter(E * H, 0.0), dsw1(sw1.size(), 0.0), dsw3(sw3.size(), 0.0), dsw2(sw2.size(), 0.0);
  std::vector<V> d1(E, V(F * H, 0.0)), d3(E, V(F * H, 0.0)), d2(E, V(H * F, 0.0));
  MoeGrads<double> g;
  g.router = drouter.data();
  for (int64_t e = 0; e < E; ++e) { g.w1.push_back(d1[e].data()); g.w3.push_back(d3[e].data()); g.w2.push_back(d2[e].data()); }
  if (mc.shared) { g.s_w1 = dsw1.data(); g.s_w3 = dsw3.data(); g.s_w2 = dsw2.data(); }
  MoeBackward(s, weights(), g, x.data(), r.data(), mc.alpha, base, dx.data());
  CheckGradient("moe x", &x, dx, loss, 1000, rng);
  CheckGradient("moe router", &router, drouter, loss, 1000, rng);
  for (int64_t e = 0; e < E; ++e) {
    CheckGradient("moe w1." + std::to_string(e), &w1[e], d1[e], loss, 8, rng);
    CheckGradient("moe w3." + std::to_string(e), &w3[e], d3[e], loss, 8, rng);
    CheckGradient("moe w2." + std::to_string(e), &w2[e], d2[e], loss, 8, rng);
  }
  if (mc.shared) {
    CheckGradient("moe shared w1", &sw1, dsw1, loss, 10, rng);
    CheckGradient("moe shared w2", &sw2, dsw2, loss, 10, rng);
    CheckGradient("moe shared w3", &sw3, dsw3, loss, 10, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(Routers, MoeGrad,
                         ::testing::Values(MoeCase{true, true, 0.0, 1}, MoeCase{true, true, 0.3, 2},
                                           MoeCase{true, false, 0.3, 0}, MoeCase{false, false, 0.0, 1},
                                           MoeCase{false, true, 0.5, 1}));

TEST(MoeRouting, BiasSteersSelectionOnly) {
  // A large bias on expert 0 puts it in every token's top-k, yet its gate is
  // still the score (not score + bias).
  std::mt19937_64 rng(7);
  const int64_t H = 4, E = 4, K = 1, F = 3, n = 5;
  MoeShape s{H, E, K, F, 0, true, false, 1.0};
  V router = RandomVector<double>(E * H, rng), bias(E, 0.0);
  bias[0] = 10.0;
  std::vector<V> w(E, RandomVector<double>(F * H, rng)), w2(E, RandomVector<double>(H * F, rng));
  MoeWeights<double> mw;
  mw.router = router.data(); mw.bias = bias.data();
  for (int64_t e = 0; e < E; ++e) { mw.w1.push_back(w[e].data()); mw.w3.push_back(w[e].data()); mw.w2.push_back(w2[e].data()); }
  V x = RandomVector<double>(n * H, rng), out(n * H);
  MoeSaved<double> sv;
  MoeForward(s, mw, x.data(), n, {0, n}, nullptr, 0.0, out.data(), &sv, nullptr);
  for (int64_t t = 0; t < n; ++t) {
    EXPECT_EQ(sv.ids[t], 0);
    EXPECT_DOUBLE_EQ(sv.gates[t], sv.scores[t * E + 0]);
    EXPECT_LT(sv.gates[t], 1.0);
  }
}

}  // namespace
}  // namespace grove::model
