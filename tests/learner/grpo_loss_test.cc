// The policy loss of every variant against values derived by hand, and its
// gradient against central finite differences in double.
#include "learner/grpo_loss.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace grove::learner {
namespace {

// The hand-worked batch: 2 groups x 2 completions x 3 token slots.
//   seq  A      token ratios r = exp(logp - old)   mask
//   s1  +1.0    1.0  1.5  0.5                       1 1 1
//   s2  -1.0    0.5  1.1  (2.0)                     1 1 0
//   s3  +0.5    2.0  1.0  0.9                       1 1 1
//   s4  -0.5    1.5  (1.0 1.0)                      1 0 0
// 9 masked tokens. old_logp = -1 everywhere. ref_logp = logp except
// s1 t2 (ref - logp = ln 2) and s3 t1 (ref - logp = -ln 2). rollout_logp = old
// unless a test sets it.
struct TinyBatch {
  std::vector<int64_t> offsets{0, 3, 6, 9, 12};
  std::vector<float> logp, old_logp, ref_logp, rollout_logp;
  std::vector<uint8_t> mask{1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0};
  std::vector<float> adv{1.0f, -1.0f, 0.5f, -0.5f};

  TinyBatch() {
    const double ratios[12] = {1.0, 1.5, 0.5, 0.5, 1.1, 2.0, 2.0, 1.0, 0.9, 1.5, 1.0, 1.0};
    for (double r : ratios) {
      logp.push_back(static_cast<float>(-1.0 + std::log(r)));
      old_logp.push_back(-1.0f);
    }
    ref_logp = logp;
    ref_logp[2] = static_cast<float>(logp[2] + std::log(2.0));
    ref_logp[7] = static_cast<float>(logp[7] - std::log(2.0));
    rollout_logp = old_logp;
  }
  PolicyBatch View() const {
    return PolicyBatch{offsets, logp, old_logp, ref_logp, rollout_logp, mask, adv};
  }
};

constexpr double kTol = 2e-6;  // float inputs (rel. error ~6e-8) times values <= ~3

void ExpectGrad(const std::vector<float>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t t = 0; t < want.size(); ++t) EXPECT_NEAR(got[t], want[t], kTol) << "token " << t;
}

// GRPO, clip 0.2/0.2, beta 0.04, seq_mean_token_mean.
// Per token f = min(rA, clip(r)A), loss term -f, gradient -rA when unclipped:
//   s1 (A=1):   r=1 -> f=1 (g -1); r=1.5 -> clipped high f=1.2 (g 0); r=0.5 -> f=0.5 (g -0.5)
//   s2 (A=-1):  r=0.5 -> min(-0.5,-0.8) = -0.8 clipped low (g 0); r=1.1 -> f=-1.1 (g +1.1)
//   s3 (A=.5):  r=2 -> clipped high f=0.6 (g 0); r=1 -> 0.5 (g -0.5); r=0.9 -> 0.45 (g -0.45)
//   s4 (A=-.5): r=1.5 -> min(-0.75,-0.6) = -0.75 unclipped (g +0.75)
// Per-sequence means of -f: s1 -2.7/3, s2 1.9/2, s3 -1.55/3, s4 0.75; pg = their mean.
// KL: k3(ln2) = 1 - ln2 (d/dlogp = 1 - 2 = -1), k3(-ln2) = ln2 - 0.5 (d = 0.5);
//   kl = 0.04 * ((1-ln2)/3 + (ln2-0.5)/3) / 4 = 0.04 / 24.
// Aggregation weights 1/(4|o_i|): 1/12, 1/8, 1/12, 1/4.
TEST(GrpoLoss, GrpoMatchesHandDerivation) {
  TinyBatch b;
  PolicyLossConfig c;
  c.clip_low = 0.2;
  c.clip_high = 0.2;
  c.beta = 0.04;
  auto out = ComputePolicyLoss(b.View(), c);
  ASSERT_TRUE(out.ok()) << out.status();
  const double pg = (-2.7 / 3 + 1.9 / 2 - 1.55 / 3 + 0.75) / 4;
  EXPECT_NEAR(out->stats.pg_loss, pg, kTol);
  EXPECT_NEAR(out->stats.kl_loss, 0.04 / 24, kTol);
  EXPECT_NEAR(out->loss, pg + 0.04 / 24, kTol);
  ExpectGrad(out->grad_logp, {-1.0 / 12, 0, (-0.5 - 0.04) / 12,  //
                              0, 1.1 / 8, 0,                     //
                              0, (-0.5 + 0.04 * 0.5) / 12, -0.45 / 12,  //
                              0.75 / 4, 0, 0});
  EXPECT_EQ(out->stats.num_tokens, 9);
  EXPECT_EQ(out->stats.num_sequences, 4);
  EXPECT_NEAR(out->stats.clip_frac_low, 1.0 / 9, 1e-12);
  EXPECT_NEAR(out->stats.clip_frac_high, 2.0 / 9, 1e-12);
  EXPECT_NEAR(out->stats.ratio_mean, 10.0 / 9, kTol);
  EXPECT_NEAR(out->stats.kl_ref_k3_mean, 0.5 / 9, kTol);
  EXPECT_NEAR(out->stats.mismatch_log_ratio_mean, 0.0, 1e-12);
  EXPECT_NEAR(out->stats.tis_weight_mean, 1.0, 1e-12);
}

// DAPO: clip 0.2/0.28, token_mean, beta 0. Changes from the GRPO table: the
// ceiling is 1.28, so s1's r=1.5 gives f=1.28 and s3's r=2 gives f=0.64 (both
// still clipped); s4 (A<0, r=1.5) is never clipped at the top.
//   sum of -f = -(1+1.28+0.5) + (0.8+1.1) - (0.64+0.5+0.45) + 0.75 = -1.72; loss = -1.72/9.
TEST(GrpoLoss, DapoMatchesHandDerivation) {
  TinyBatch b;
  PolicyLossConfig c;
  c.clip_low = 0.2;
  c.clip_high = 0.28;
  c.aggregation = LossAggregation::kTokenMean;
  auto out = ComputePolicyLoss(b.View(), c);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_NEAR(out->loss, -1.72 / 9, kTol);
  EXPECT_EQ(out->stats.kl_loss, 0.0);
  ExpectGrad(out->grad_logp, {-1.0 / 9, 0, -0.5 / 9, 0, 1.1 / 9, 0, 0, -0.5 / 9, -0.45 / 9, 0.75 / 9, 0, 0});
  EXPECT_NEAR(out->stats.clip_frac_high, 2.0 / 9, 1e-12);
  EXPECT_NEAR(out->stats.clip_frac_low, 1.0 / 9, 1e-12);
}

// Dr. GRPO: clip 0.2/0.2, per-sequence token sums / max_tokens (4), mean over
// the 4 sequences: loss = (-2.7 + 1.9 - 1.55 + 0.75) / 16 = -0.1, gradient g / 16.
TEST(GrpoLoss, DrGrpoMatchesHandDerivation) {
  TinyBatch b;
  PolicyLossConfig c;
  c.aggregation = LossAggregation::kSeqMeanTokenSumNorm;
  c.max_tokens = 4;
  auto out = ComputePolicyLoss(b.View(), c);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_NEAR(out->loss, -0.1, kTol);
  ExpectGrad(out->grad_logp,
             {-1.0 / 16, 0, -0.5 / 16, 0, 1.1 / 16, 0, 0, -0.5 / 16, -0.45 / 16, 0.75 / 16, 0, 0});
}

// GSPO, clip 0.2/0.28 (to keep the numbers readable), seq_mean_token_mean.
//   s1: s = (1*1.5*0.5)^(1/3) = 0.75^(1/3), A=1, inside [0.8,1.28] -> -f = -s
//   s2: s = (0.5*1.1)^(1/2) = 0.55^(1/2) = 0.7416, A=-1, below 0.8 -> clipped low, -f = 0.8
//   s3: s = 1.8^(1/3) = 1.2164, A=.5, inside -> -f = -0.5 s
//   s4: s = 1.5, A=-.5 -> min(-0.75, -0.64) = -0.75 unclipped, -f = 0.75
// loss = mean of the four. d(-f)/dlogp_t = -A s / |o_i| (unclipped), times 1/4.
TEST(GrpoLoss, GspoMatchesHandDerivation) {
  TinyBatch b;
  PolicyLossConfig c;
  c.ratio_level = RatioLevel::kSequence;
  c.clip_low = 0.2;
  c.clip_high = 0.28;
  auto out = ComputePolicyLoss(b.View(), c);
  ASSERT_TRUE(out.ok()) << out.status();
  const double s1 = std::cbrt(0.75), s3 = std::cbrt(1.8);
  EXPECT_NEAR(out->loss, (-s1 + 0.8 - 0.5 * s3 + 0.75) / 4, kTol);
  const double g1 = -s1 / 3 / 4, g3 = -0.5 * s3 / 3 / 4, g4 = 0.5 * 1.5 / 4;
  ExpectGrad(out->grad_logp, {g1, g1, g1, 0, 0, 0, g3, g3, g3, g4, 0, 0});
  // s2's two tokens are clipped low; no token is clipped high.
  EXPECT_NEAR(out->stats.clip_frac_low, 2.0 / 9, 1e-12);
  EXPECT_EQ(out->stats.clip_frac_high, 0.0);
  EXPECT_NEAR(out->stats.ratio_mean, (3 * s1 + 2 * std::sqrt(0.55) + 3 * s3 + 1.5) / 9, kTol);

  // With GSPO's own range 3e-4/4e-4: s3 (A>0, s>1.0004) is clipped high, s2
  // (A<0, s<0.9997) low, s1 (A>0, s<1) and s4 (A<0, s>1) are not clipped.
  c.clip_low = 3e-4;
  c.clip_high = 4e-4;
  out = ComputePolicyLoss(b.View(), c);
  ASSERT_TRUE(out.ok());
  EXPECT_NEAR(out->loss, (-s1 + 0.9997 - 0.5 * 1.0004 + 0.75) / 4, kTol);
  ExpectGrad(out->grad_logp, {g1, g1, g1, 0, 0, 0, 0, 0, 0, g4, 0, 0});
}

// Truncated importance sampling on the DAPO setting, cap 2: s1's TIS weights
// w = exp(old - rollout) are set to 1, 3 (capped to 2), 0.5, the rest 1.
//   s1's -w f = [-1, -2*1.28, -0.5*0.5], the other sequences as in the DAPO test:
//   total = -(1 + 2.56 + 0.25) + 1.9 - 1.59 + 0.75 = -2.75, loss = -2.75/9.
//   s1's gradients: -w r A / 9 = [-1, 0 (clipped), -0.25] / 9.
// Mismatch: mean(old - rollout) = (ln 3 + ln 0.5) / 9 = ln 1.5 / 9;
//   k3 = (3 - ln3 - 1) + (0.5 - ln0.5 - 1) = 1.5 - ln 1.5, over 9.
TEST(GrpoLoss, TruncatedImportanceSamplingMatchesHandDerivation) {
  TinyBatch b;
  b.rollout_logp[1] = static_cast<float>(-1.0 - std::log(3.0));
  b.rollout_logp[2] = static_cast<float>(-1.0 + std::log(2.0));
  PolicyLossConfig c;
  c.clip_high = 0.28;
  c.aggregation = LossAggregation::kTokenMean;
  c.tis_cap = 2.0;
  auto out = ComputePolicyLoss(b.View(), c);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_NEAR(out->loss, -2.75 / 9, kTol);
  ExpectGrad(out->grad_logp, {-1.0 / 9, 0, -0.25 / 9, 0, 1.1 / 9, 0, 0, -0.5 / 9, -0.45 / 9, 0.75 / 9, 0, 0});
  EXPECT_NEAR(out->stats.tis_capped_frac, 1.0 / 9, 1e-12);
  EXPECT_NEAR(out->stats.tis_weight_mean, (1 + 2 + 0.5 + 6) / 9, kTol);
  EXPECT_NEAR(out->stats.mismatch_log_ratio_mean, std::log(1.5) / 9, kTol);
  EXPECT_NEAR(out->stats.mismatch_kl_k3, (1.5 - std::log(1.5)) / 9, kTol);

  // tis_cap <= 0: weights are 1 (the DAPO loss), mismatch is still reported.
  c.tis_cap = 0.0;
  out = ComputePolicyLoss(b.View(), c);
  ASSERT_TRUE(out.ok());
  EXPECT_NEAR(out->loss, -1.72 / 9, kTol);
  EXPECT_EQ(out->stats.tis_capped_frac, 0.0);
  EXPECT_NEAR(out->stats.mismatch_log_ratio_mean, std::log(1.5) / 9, kTol);
}

// Dual clip 1.4 on the GRPO setting: only s4 (A = -0.5, r = 1.5 > 1.4) changes:
// max(min(-0.75, -0.6), 1.4 * -0.5) = -0.7, so its loss term is 0.7 and its
// gradient 0. pg = (-2.7/3 + 1.9/2 - 1.55/3 + 0.7) / 4.
TEST(GrpoLoss, DualClipMatchesHandDerivation) {
  TinyBatch b;
  PolicyLossConfig c;
  c.dual_clip = 1.4;
  auto out = ComputePolicyLoss(b.View(), c);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_NEAR(out->loss, (-2.7 / 3 + 1.9 / 2 - 1.55 / 3 + 0.7) / 4, kTol);
  ExpectGrad(out->grad_logp, {-1.0 / 12, 0, -0.5 / 12, 0, 1.1 / 8, 0, 0, -0.5 / 12, -0.45 / 12, 0, 0, 0});
  EXPECT_NEAR(out->stats.clip_frac_dual, 1.0 / 9, 1e-12);
  c.dual_clip = 1.0;  // must be > 1
  EXPECT_FALSE(ComputePolicyLoss(b.View(), c).ok());
}

// Splitting the batch into micro-batches [s1, s2] and [s3, s4], each told the
// whole batch's counts, gives losses and gradients that add up to the whole's.
TEST(GrpoLoss, MicroBatchesAddUpToTheBatch) {
  TinyBatch b;
  for (LossAggregation agg :
       {LossAggregation::kSeqMeanTokenMean, LossAggregation::kTokenMean, LossAggregation::kSeqMeanTokenSumNorm}) {
    for (RatioLevel level : {RatioLevel::kToken, RatioLevel::kSequence}) {
      PolicyLossConfig c;
      c.aggregation = agg;
      c.ratio_level = level;
      c.max_tokens = 4;
      c.beta = 0.04;
      c.tis_cap = 2.0;
      auto whole = ComputePolicyLoss(b.View(), c);
      ASSERT_TRUE(whole.ok());
      std::vector<int64_t> offsets{0, 3, 6};
      double loss = 0.0;
      std::vector<float> grad;
      for (size_t part = 0; part < 2; ++part) {
        PolicyBatch v = b.View();
        const size_t t0 = 6 * part;
        v.seq_offsets = offsets;
        v.logp = v.logp.subspan(t0, 6);
        v.old_logp = v.old_logp.subspan(t0, 6);
        v.ref_logp = v.ref_logp.subspan(t0, 6);
        v.rollout_logp = v.rollout_logp.subspan(t0, 6);
        v.mask = v.mask.subspan(t0, 6);
        v.advantages = v.advantages.subspan(2 * part, 2);
        v.total_tokens = 9;
        v.total_sequences = 4;
        auto out = ComputePolicyLoss(v, c);
        ASSERT_TRUE(out.ok()) << out.status();
        loss += out->loss;
        grad.insert(grad.end(), out->grad_logp.begin(), out->grad_logp.end());
      }
      EXPECT_NEAR(loss, whole->loss, 1e-12);
      for (size_t t = 0; t < grad.size(); ++t) EXPECT_FLOAT_EQ(grad[t], whole->grad_logp[t]);
    }
  }
  PolicyBatch v = b.View();
  v.total_tokens = 5;  // fewer than this batch's own 9
  EXPECT_FALSE(ComputePolicyLoss(v, PolicyLossConfig{}).ok());
}

// On-policy (old_logp empty): every ratio is 1, nothing is clipped, and the
// gradient is the REINFORCE one, -A * aggregation weight.
TEST(GrpoLoss, OnPolicyWithoutOldLogp) {
  TinyBatch b;
  PolicyBatch v = b.View();
  v.old_logp = {};
  v.rollout_logp = {};
  v.ref_logp = {};
  PolicyLossConfig c;
  auto out = ComputePolicyLoss(v, c);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_NEAR(out->loss, (-1.0 + 1.0 - 0.5 + 0.5) / 4, kTol);
  ExpectGrad(out->grad_logp, {-1.0 / 12, -1.0 / 12, -1.0 / 12, 1.0 / 8, 1.0 / 8, 0, -0.5 / 12, -0.5 / 12,
                              -0.5 / 12, 0.5 / 4, 0, 0});
  EXPECT_NEAR(out->stats.ratio_mean, 1.0, 1e-12);
  EXPECT_EQ(out->stats.clip_frac_low + out->stats.clip_frac_high, 0.0);
}

// A sequence with no masked token is not counted by the sequence mean, and a
// batch with no tokens at all has zero loss and gradient.
TEST(GrpoLoss, EmptySequences) {
  std::vector<int64_t> offsets{0, 2, 2, 4};
  std::vector<float> logp{-1, -2, -1, -1};
  std::vector<uint8_t> mask{1, 1, 0, 0};
  std::vector<float> adv{1, 5, 7};
  PolicyBatch v{offsets, logp, {}, {}, {}, mask, adv};
  auto out = ComputePolicyLoss(v, PolicyLossConfig{});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_NEAR(out->loss, -1.0, 1e-12);  // only sequence 0 counts: N' = 1
  EXPECT_FLOAT_EQ(out->grad_logp[0], -0.5f);
  EXPECT_EQ(out->grad_logp[2], 0.0f);
  EXPECT_EQ(out->grad_logp[3], 0.0f);
  EXPECT_NEAR(out->stats.neg_logp_mean, 1.5, 1e-12);

  std::fill(mask.begin(), mask.end(), 0);
  out = ComputePolicyLoss(v, PolicyLossConfig{});
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->loss, 0.0);
  EXPECT_EQ(out->stats.num_tokens, 0);
  for (float g : out->grad_logp) EXPECT_EQ(g, 0.0f);
}

TEST(GrpoLoss, RejectsBadInput) {
  TinyBatch b;
  PolicyLossConfig c;
  auto expect_invalid = [&](const PolicyBatch& v, const PolicyLossConfig& cfg, const char* needle) {
    auto out = ComputePolicyLoss(v, cfg);
    ASSERT_FALSE(out.ok()) << needle;
    EXPECT_EQ(out.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(out.status().message().find(needle), std::string::npos) << out.status();
  };
  PolicyBatch v = b.View();
  std::vector<float> short_old(5, -1.f);
  v.old_logp = short_old;
  expect_invalid(v, c, "old_logp");
  v = b.View();
  std::vector<int64_t> bad_offsets{0, 3, 2, 9, 12};
  v.seq_offsets = bad_offsets;
  expect_invalid(v, c, "decrease");
  std::vector<int64_t> short_offsets{0, 3, 6, 9, 11};
  v.seq_offsets = short_offsets;
  expect_invalid(v, c, "seq_offsets end");
  v = b.View();
  v.advantages = std::span<const float>(b.adv).subspan(1);
  expect_invalid(v, c, "advantages");
  v = b.View();
  v.ref_logp = {};
  PolicyLossConfig with_kl = c;
  with_kl.beta = 0.1;
  expect_invalid(v, with_kl, "ref_logp");
  TinyBatch nan_batch;
  nan_batch.logp[4] = std::nanf("");
  expect_invalid(nan_batch.View(), c, "token 4");
  nan_batch.logp[4] = -1.f;
  nan_batch.logp[5] = std::nanf("");  // masked out: ignored
  EXPECT_TRUE(ComputePolicyLoss(nan_batch.View(), c).ok());

  PolicyLossConfig bad = c;
  bad.clip_low = 1.0;
  expect_invalid(b.View(), bad, "clip_low");
  bad = c;
  bad.clip_high = -0.1;
  expect_invalid(b.View(), bad, "clip_high");
  bad = c;
  bad.beta = -0.01;
  expect_invalid(b.View(), bad, "beta");
  bad = c;
  bad.aggregation = LossAggregation::kSeqMeanTokenSumNorm;
  expect_invalid(b.View(), bad, "max_tokens");
  EXPECT_FALSE(ParseLossAggregation("token_sum").ok());
}

// ---- Finite differences in double on random batches ----

struct RandomBatch {
  std::vector<int64_t> offsets{0};
  std::vector<double> logp, old_logp, ref_logp, rollout_logp, adv;
  std::vector<uint8_t> mask;
  PolicyBatchOf<double> View() const { return {offsets, logp, old_logp, ref_logp, rollout_logp, mask, adv}; }
};

RandomBatch MakeRandom(std::mt19937& rng, int num_seqs) {
  RandomBatch b;
  std::uniform_int_distribution<int> len(1, 7);
  std::normal_distribution<double> gauss(0.0, 1.0);
  std::bernoulli_distribution keep(0.85);
  for (int i = 0; i < num_seqs; ++i) {
    const int n = len(rng);
    for (int t = 0; t < n; ++t) {
      const double old = -0.2 - std::fabs(2.0 * gauss(rng));
      b.old_logp.push_back(old);
      b.logp.push_back(old + 0.25 * gauss(rng));  // ratios around [0.6, 1.6]: both sides of the clip
      b.ref_logp.push_back(old + 0.3 * gauss(rng));
      b.rollout_logp.push_back(old + 0.6 * gauss(rng));  // TIS weights both under and over a cap of 1.5
      b.mask.push_back(keep(rng));
    }
    b.offsets.push_back(b.offsets.back() + n);
    b.adv.push_back(gauss(rng));
  }
  return b;
}

void CheckFiniteDifferences(const PolicyLossConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  int checked = 0, unclipped_nonzero = 0;
  for (int trial = 0; trial < 6; ++trial) {
    RandomBatch b = MakeRandom(rng, 8);
    auto base = ComputePolicyLoss(b.View(), c);
    ASSERT_TRUE(base.ok()) << base.status();
    const double h = 1e-6;
    for (size_t t = 0; t < b.logp.size(); ++t) {
      const double saved = b.logp[t];
      b.logp[t] = saved + h;
      auto plus = ComputePolicyLoss(b.View(), c);
      b.logp[t] = saved - h;
      auto minus = ComputePolicyLoss(b.View(), c);
      b.logp[t] = saved;
      ASSERT_TRUE(plus.ok() && minus.ok());
      // Skip a token whose step crosses a clip boundary (the loss has a kink there).
      auto same_branch = [&](const PolicyLossStats& s) {
        return s.clip_frac_low == base->stats.clip_frac_low && s.clip_frac_high == base->stats.clip_frac_high &&
               s.clip_frac_dual == base->stats.clip_frac_dual;
      };
      if (!same_branch(plus->stats) || !same_branch(minus->stats)) continue;
      const double fd = (plus->loss - minus->loss) / (2 * h);
      // Truncation error ~h^2 * |l'''| ~ 1e-12, round-off ~1e-16 / h ~ 1e-10.
      EXPECT_NEAR(base->grad_logp[t], fd, 1e-7 + 1e-6 * std::fabs(fd)) << "token " << t << " trial " << trial;
      ++checked;
      unclipped_nonzero += std::fabs(fd) > 1e-4;
    }
  }
  EXPECT_GT(checked, 100);
  EXPECT_GT(unclipped_nonzero, 30);  // the test is not passing on all-zero gradients
}

TEST(GrpoLossFiniteDifferences, Grpo) {
  PolicyLossConfig c;
  c.beta = 0.05;
  c.tis_cap = 1.5;
  c.dual_clip = 1.3;
  CheckFiniteDifferences(c, 1);
}

TEST(GrpoLossFiniteDifferences, DrGrpo) {
  PolicyLossConfig c;
  c.aggregation = LossAggregation::kSeqMeanTokenSumNorm;
  c.max_tokens = 7;
  c.beta = 0.02;
  CheckFiniteDifferences(c, 2);
}

TEST(GrpoLossFiniteDifferences, Dapo) {
  PolicyLossConfig c;
  c.clip_high = 0.28;
  c.aggregation = LossAggregation::kTokenMean;
  c.tis_cap = 1.5;
  CheckFiniteDifferences(c, 3);
}

TEST(GrpoLossFiniteDifferences, GspoEveryAggregation) {
  for (LossAggregation agg :
       {LossAggregation::kSeqMeanTokenMean, LossAggregation::kTokenMean, LossAggregation::kSeqMeanTokenSumNorm}) {
    PolicyLossConfig c;
    c.ratio_level = RatioLevel::kSequence;
    c.clip_low = 0.1;  // the paper's 3e-4 would clip nearly every random sequence
    c.clip_high = 0.15;
    c.aggregation = agg;
    c.max_tokens = 7;
    c.beta = 0.03;
    c.tis_cap = 1.5;
    c.dual_clip = 1.2;
    SCOPED_TRACE(std::string(LossAggregationName(agg)));
    CheckFiniteDifferences(c, 4);
  }
}

// The float entry point agrees with the double one on the same numbers.
TEST(GrpoLoss, FloatMatchesDouble) {
  std::mt19937 rng(9);
  RandomBatch d = MakeRandom(rng, 16);
  auto to_f = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
  std::vector<float> logp = to_f(d.logp), old = to_f(d.old_logp), ref = to_f(d.ref_logp),
                     roll = to_f(d.rollout_logp), adv = to_f(d.adv);
  // Round the double inputs to float so both see the same values.
  for (size_t i = 0; i < logp.size(); ++i) {
    d.logp[i] = logp[i];
    d.old_logp[i] = old[i];
    d.ref_logp[i] = ref[i];
    d.rollout_logp[i] = roll[i];
  }
  for (size_t i = 0; i < adv.size(); ++i) d.adv[i] = adv[i];
  PolicyLossConfig c;
  c.beta = 0.04;
  c.tis_cap = 2.0;
  auto fo = ComputePolicyLoss(PolicyBatch{d.offsets, logp, old, ref, roll, d.mask, adv}, c);
  auto dO = ComputePolicyLoss(d.View(), c);
  ASSERT_TRUE(fo.ok() && dO.ok());
  EXPECT_DOUBLE_EQ(fo->loss, dO->loss);  // internal math is double in both
  for (size_t t = 0; t < logp.size(); ++t) EXPECT_EQ(fo->grad_logp[t], static_cast<float>(dO->grad_logp[t]));
}

}  // namespace
}  // namespace grove::learner
