#include "learner/adamw.h"
#include "learner/optimizer_step.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "kernels/stochastic_round.h"

namespace grove::learner {
namespace {

// One parameter p = 1, lr 0.1, betas 0.9/0.999, eps 1e-8, weight decay 0.1,
// gradients 0.5 then -0.25.
// Step 1: p = 1 * (1 - 0.01) = 0.99; m = 0.05, v = 0.001 * 0.25 = 2.5e-4;
//   m^ = 0.05/0.1 = 0.5, v^ = 2.5e-4/0.001 = 0.25; p = 0.99 - 0.1 * 0.5/(0.5 + 1e-8)
//   = 0.890000002.
// Step 2: p = 0.890000002 * 0.99 = 0.88110000198; m = 0.045 - 0.025 = 0.02;
//   v = 0.999 * 2.5e-4 + 0.001 * 0.0625 = 3.1225e-4; m^ = 0.02/0.19 = 0.1052632,
//   v^ = 3.1225e-4 / 0.001999 = 0.1562031; p -= 0.1 * 0.1052632 / 0.3952254
//   (= 0.0266337) -> 0.8544663.
TEST(AdamW, HandComputedTwoSteps) {
  AdamWOptions o{0.9, 0.999, 1e-8, 0.1};
  auto opt = AdamW::Create(1, o);
  ASSERT_TRUE(opt.ok());
  std::vector<float> p{1.0f};
  std::vector<float> g{0.5f};
  ASSERT_TRUE(opt->Step(p, g, 0.1).ok());
  EXPECT_NEAR(p[0], 0.890000002, 1e-6);
  EXPECT_NEAR(opt->m()[0], 0.05, 1e-8);
  EXPECT_NEAR(opt->v()[0], 2.5e-4, 1e-10);
  g[0] = -0.25f;
  ASSERT_TRUE(opt->Step(p, g, 0.1).ok());
  EXPECT_NEAR(p[0], 0.8544663, 1e-6);
  EXPECT_NEAR(opt->m()[0], 0.02, 1e-8);
  EXPECT_NEAR(opt->v()[0], 3.1225e-4, 1e-10);
  EXPECT_EQ(opt->step(), 2);
}

// Against a plain double implementation of the same formulas, on random data
// with a decay mask, changing learning rates and 6 steps.
TEST(AdamW, MatchesPlainReferenceOnRandomData) {
  const size_t n = 1000;
  std::mt19937 rng(3);
  std::normal_distribution<float> gauss(0.f, 1.f);
  std::bernoulli_distribution decay(0.7);
  std::vector<float> p(n);
  std::vector<uint8_t> mask(n);
  for (size_t i = 0; i < n; ++i) {
    p[i] = gauss(rng);
    mask[i] = decay(rng);
  }
  std::vector<double> rp(p.begin(), p.end()), rm(n, 0.0), rv(n, 0.0);
  AdamWOptions o{0.9, 0.95, 1e-6, 0.05};
  auto opt = AdamW::Create(n, o);
  ASSERT_TRUE(opt.ok());
  ASSERT_TRUE(opt->SetWeightDecayMask(mask).ok());
  for (int k = 1; k <= 6; ++k) {
    const double lr = 1e-2 / k;
    std::vector<float> g(n);
    for (float& x : g) x = 0.1f * gauss(rng);
    ASSERT_TRUE(opt->Step(p, g, lr).ok());
    for (size_t i = 0; i < n; ++i) {
      if (mask[i]) rp[i] *= 1.0 - lr * o.weight_decay;
      rm[i] = o.beta1 * rm[i] + (1 - o.beta1) * g[i];
      rv[i] = o.beta2 * rv[i] + (1 - o.beta2) * double(g[i]) * g[i];
      const double mh = rm[i] / (1 - std::pow(o.beta1, k));
      const double vh = rv[i] / (1 - std::pow(o.beta2, k));
      rp[i] -= lr * mh / (std::sqrt(vh) + o.eps);
    }
  }
  // Each step moves a parameter by at most ~lr; fp32 rounding of the update
  // terms is ~1e-7 relative, so 6 steps stay far below 1e-5.
  for (size_t i = 0; i < n; ++i) {
    EXPECT_NEAR(p[i], rp[i], 1e-5) << i;
    EXPECT_NEAR(opt->m()[i], rm[i], 1e-6) << i;
    EXPECT_NEAR(opt->v()[i], rv[i], 1e-7) << i;
  }
}

// With zero gradients only decay moves a parameter: decayed ones shrink by
// exactly (1 - lr * wd) per step, excluded ones do not move at all.
TEST(AdamW, WeightDecayMaskAndRanges) {
  AdamWOptions o{0.9, 0.999, 1e-8, 0.5};
  auto opt = AdamW::Create(6, o);
  ASSERT_TRUE(opt.ok());
  std::vector<ParamRange> no_decay{{1, 3}, {5, 6}};
  ASSERT_TRUE(opt->SetNoDecayRanges(no_decay).ok());
  std::vector<float> p{1, 2, 3, 4, 5, 6}, g(6, 0.f);
  ASSERT_TRUE(opt->Step(p, g, 0.1).ok());
  ASSERT_TRUE(opt->Step(p, g, 0.1).ok());
  const float f = 0.95f * 0.95f;
  EXPECT_FLOAT_EQ(p[0], 1 * f);
  EXPECT_EQ(p[1], 2.0f);
  EXPECT_EQ(p[2], 3.0f);
  EXPECT_FLOAT_EQ(p[3], 4 * f);
  EXPECT_FLOAT_EQ(p[4], 5 * f);
  EXPECT_EQ(p[5], 6.0f);
  EXPECT_FALSE(opt->decays(1));
  EXPECT_TRUE(opt->decays(3));

  std::vector<ParamRange> outside{{4, 7}};
  EXPECT_EQ(opt->SetNoDecayRanges(outside).code(), StatusCode::kInvalidArgument);
  std::vector<uint8_t> short_mask(5, 1);
  EXPECT_FALSE(opt->SetWeightDecayMask(short_mask).ok());
}

TEST(AdamW, StateRoundTripContinuesIdentically) {
  const size_t n = 64;
  std::mt19937 rng(5);
  std::normal_distribution<float> gauss(0.f, 1.f);
  std::vector<std::vector<float>> grads(5, std::vector<float>(n));
  for (auto& g : grads)
    for (float& x : g) x = gauss(rng);
  std::vector<float> p(n, 0.5f);
  auto a = AdamW::Create(n, {});
  ASSERT_TRUE(a.ok());
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(a->Step(p, grads[k], 1e-3).ok());
  AdamWState saved = a->ExportState();
  EXPECT_EQ(saved.step, 3);
  auto b = AdamW::Create(n, {});
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(b->ImportState(saved).ok());
  std::vector<float> pa = p, pb = p;
  for (int k = 3; k < 5; ++k) {
    ASSERT_TRUE(a->Step(pa, grads[k], 1e-3).ok());
    ASSERT_TRUE(b->Step(pb, grads[k], 1e-3).ok());
  }
  EXPECT_EQ(pa, pb);  // bit-identical
  EXPECT_EQ(b->step(), 5);

  AdamWState wrong = saved;
  wrong.v.pop_back();
  EXPECT_FALSE(b->ImportState(wrong).ok());
  wrong = saved;
  wrong.step = -1;
  EXPECT_FALSE(b->ImportState(wrong).ok());
}

// bf16 moments: after the first step from zero, m = (1 - b1) g and
// v = (1 - b2) g^2 rounded with kernels/stochastic_round.h's bits for
// (index, step 1) -- the contract the device kernel shares; the update
// itself used the unrounded values.
TEST(AdamW, Bf16MomentsRoundWithTheIndexAndStepBits) {
  const size_t n = 257;
  AdamWOptions o{0.9, 0.999, 1e-8, 0.0, MomentPrecision::kBf16};
  auto opt = AdamW::Create(n, o);
  auto ref = AdamW::Create(n, {0.9, 0.999, 1e-8, 0.0});
  ASSERT_TRUE(opt.ok() && ref.ok());
  std::mt19937 rng(11);
  std::normal_distribution<float> gauss(0.f, 1.f);
  std::vector<float> g(n), p(n), p_ref;
  for (size_t i = 0; i < n; ++i) g[i] = gauss(rng), p[i] = gauss(rng);
  p_ref = p;
  ASSERT_TRUE(opt->Step(p, g, 1e-2).ok());
  ASSERT_TRUE(ref->Step(p_ref, g, 1e-2).ok());
  EXPECT_EQ(p, p_ref);  // the update used fp32 moments
  const uint32_t key = kernels::StochasticRoundStepKey(1, 0);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t r = kernels::StochasticRoundBits(key, i);
    EXPECT_EQ(opt->m()[i], kernels::Bf16BitsToFloat(kernels::Bf16StochasticRound(ref->m()[i], r))) << i;
    EXPECT_EQ(opt->v()[i], kernels::Bf16BitsToFloat(kernels::Bf16StochasticRound(ref->v()[i], r >> 16))) << i;
  }
}

// bf16 moments on random data over 30 steps against fp32 ones: every
// stored moment is a bf16 value, and the parameters' total updates agree to
// relative L2 <= 1e-2 (measured 3e-3; each stored moment errs by under one bf16 ulp, 2^-8
// relative, unbiased; m / sqrt(v) by ~1.5 x that, ~0.6%, per element and
// step, and the errors of different steps partly cancel).
TEST(AdamW, Bf16MomentsTrackFp32Moments) {
  const size_t n = 4096;
  auto a = AdamW::Create(n, {0.9, 0.999, 1e-8, 0.0, MomentPrecision::kBf16});
  auto b = AdamW::Create(n, {0.9, 0.999, 1e-8, 0.0});
  ASSERT_TRUE(a.ok() && b.ok());
  std::mt19937 rng(3);
  std::normal_distribution<float> gauss(0.f, 1.f);
  std::vector<float> pa(n), scale(n);
  for (size_t i = 0; i < n; ++i) pa[i] = gauss(rng), scale[i] = std::exp(2.f * gauss(rng));
  const std::vector<float> start = pa;
  std::vector<float> pb = pa, g(n);
  for (int k = 0; k < 30; ++k) {
    for (size_t i = 0; i < n; ++i) g[i] = scale[i] * (0.3f + gauss(rng));
    ASSERT_TRUE(a->Step(pa, g, 1e-3).ok());
    ASSERT_TRUE(b->Step(pb, g, 1e-3).ok());
  }
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += std::pow(double(pa[i]) - pb[i], 2);
    den += std::pow(double(pb[i]) - start[i], 2);
    for (float x : {a->m()[i], a->v()[i]})
      ASSERT_EQ(kernels::Bf16BitsToFloat(kernels::Bf16RoundNearest(x)), x) << i;
  }
  std::printf("bf16 against fp32 moments: update relative L2 %.3g\n", std::sqrt(num / den));
  EXPECT_LE(std::sqrt(num / den), 1e-2);
}

// With zero gradients v decays as beta2^k. Round-to-nearest would keep
// every bf16 v where it is (tests/kernels/stochastic_round_test.cc); the
// stochastic rounding follows the decay in the mean: after 2000 steps
// 0.999^2000 = 0.135 of the start within 1% (the per-element rounding
// noise, ~2^-9 relative a step, leaves the mean of 8192 elements ~1e-3 off).
TEST(AdamW, Bf16SecondMomentDecaysUnderZeroGradients) {
  const size_t n = 8192;
  auto opt = AdamW::Create(n, {0.9, 0.999, 1e-8, 0.0, MomentPrecision::kBf16});
  ASSERT_TRUE(opt.ok());
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> u(0.5f, 2.f);
  AdamWState s;
  s.step = 0;
  s.m.assign(n, 0.f);
  s.v.resize(n);
  for (float& x : s.v) x = u(rng) * 1e-4f;
  ASSERT_TRUE(opt->ImportState(s).ok());
  double start = 0;
  for (float x : opt->v()) start += x;
  std::vector<float> p(n, 1.f), g(n, 0.f);
  for (int k = 0; k < 2000; ++k) ASSERT_TRUE(opt->Step(p, g, 0.0).ok());
  double end = 0;
  for (float x : opt->v()) end += x;
  EXPECT_NEAR(end / start, std::pow(0.999, 2000), 0.01 * std::pow(0.999, 2000));
}

// Importing fp32 moments (a checkpoint) into bf16 ones rounds them to
// nearest; exporting gives those bf16 values back as floats.
TEST(AdamW, Bf16MomentsImportRoundsToNearest) {
  auto opt = AdamW::Create(3, {0.9, 0.999, 1e-8, 0.0, MomentPrecision::kBf16});
  ASSERT_TRUE(opt.ok());
  AdamWState s{4, {1.00390625f, 1.0f + 3.0f / 512, -3.14159f}, {1e-3f, 2e-3f, 3e-3f}};
  ASSERT_TRUE(opt->ImportState(s).ok());
  AdamWState back = opt->ExportState();
  EXPECT_EQ(back.step, 4);
  EXPECT_EQ(back.m[0], 1.0f);               // the tie 1 + 2^-8 goes to even
  EXPECT_EQ(back.m[1], 1.0f + 1.0f / 128);  // 1 + 3 * 2^-9 goes up
  EXPECT_EQ(back.m[2], -3.140625f);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(back.v[i], kernels::Bf16BitsToFloat(kernels::Bf16RoundNearest(s.v[i])));
}

TEST(AdamW, RejectsBadOptionsAndSizes) {
  EXPECT_FALSE(AdamW::Create(4, {1.0, 0.999, 1e-8, 0.0}).ok());
  EXPECT_FALSE(AdamW::Create(4, {0.9, -0.1, 1e-8, 0.0}).ok());
  EXPECT_FALSE(AdamW::Create(4, {0.9, 0.999, 0.0, 0.0}).ok());
  EXPECT_FALSE(AdamW::Create(4, {0.9, 0.999, 1e-8, -1.0}).ok());
  auto opt = AdamW::Create(4, {});
  ASSERT_TRUE(opt.ok());
  std::vector<float> p(4), g(3);
  EXPECT_EQ(opt->Step(p, g, 1e-3).code(), StatusCode::kInvalidArgument);
  g.resize(4);
  EXPECT_FALSE(opt->Step(p, g, -1.0).ok());
  EXPECT_EQ(opt->step(), 0);  // a refused step does not count
}

// [3, 4] has norm 5: clipped to 1 it becomes [0.6, 0.8] and 5 is returned.
TEST(GradClip, ScalesToMaxNormAndReturnsPreClipNorm) {
  std::vector<float> g{3, 4};
  EXPECT_DOUBLE_EQ(ClipGradNorm(g, 1.0), 5.0);
  EXPECT_FLOAT_EQ(g[0], 0.6f);
  EXPECT_FLOAT_EQ(g[1], 0.8f);
  EXPECT_NEAR(GlobalGradNorm(g), 1.0, 1e-7);
  g = {3, 4};
  EXPECT_DOUBLE_EQ(ClipGradNorm(g, 10.0), 5.0);  // under the bound: untouched
  EXPECT_EQ(g, (std::vector<float>{3, 4}));
  EXPECT_DOUBLE_EQ(ClipGradNorm(g, 0.0), 5.0);  // disabled
  EXPECT_EQ(g, (std::vector<float>{3, 4}));
  g = {3, INFINITY};
  EXPECT_TRUE(std::isinf(ClipGradNorm(g, 1.0)));  // caller skips the step
  EXPECT_EQ(g[0], 3.0f);
}

TEST(GradClip, NormMatchesDoubleReference) {
  std::mt19937 rng(11);
  std::normal_distribution<float> gauss(0.f, 1.f);
  std::vector<float> g(100003);
  double ref = 0;
  for (float& x : g) {
    x = gauss(rng);
    ref += double(x) * x;
  }
  EXPECT_NEAR(GlobalGradNorm(g), std::sqrt(ref), 1e-9 * std::sqrt(ref));
  std::vector<float> c = g;
  const double before = ClipGradNorm(c, 10.0);
  EXPECT_NEAR(before, std::sqrt(ref), 1e-9 * std::sqrt(ref));
  EXPECT_NEAR(GlobalGradNorm(c), 10.0, 1e-4);
  for (size_t i = 0; i < g.size(); i += 997) EXPECT_NEAR(c[i], g[i] * 10.0 / before, 1e-6);
}

// ApplyUpdate: warm-up rate 1e-3 * (k+1)/2 at step k, the gradient [3, 4]
// clipped to norm 1, and a non-finite gradient skips without touching state.
TEST(ApplyUpdate, ClipsSchedulesAndSkipsNonFinite) {
  auto opt = AdamW::Create(2, {0.9, 0.999, 1e-8, 0.0});
  auto sched = LrSchedule::Create({1e-3, 2, LrDecay::kConstant, 0, 0.0});
  ASSERT_TRUE(opt.ok() && sched.ok());
  std::vector<float> p{0, 0}, g{3, 4};
  auto r = ApplyUpdate(*opt, *sched, 1.0, p, g);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->skipped);
  EXPECT_DOUBLE_EQ(r->grad_norm, 5.0);
  EXPECT_DOUBLE_EQ(r->lr, 5e-4);
  EXPECT_FLOAT_EQ(g[0], 0.6f);
  // First Adam step moves each coordinate by lr * sign(g) (m^/sqrt(v^) = +-1).
  EXPECT_NEAR(p[0], -5e-4, 1e-9);
  EXPECT_NEAR(p[1], -5e-4, 1e-9);

  std::vector<float> bad{1, NAN};
  r = ApplyUpdate(*opt, *sched, 1.0, p, bad);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->skipped);
  EXPECT_DOUBLE_EQ(r->lr, 1e-3);
  EXPECT_EQ(opt->step(), 1);
  EXPECT_NEAR(p[0], -5e-4, 1e-9);

  std::vector<float> short_g{1};
  EXPECT_FALSE(ApplyUpdate(*opt, *sched, 1.0, p, short_g).ok());
}

}  // namespace
}  // namespace grove::learner
