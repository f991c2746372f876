// The device GRPO loss against learner/grpo_loss.cc (ComputePolicyLoss<float>,
// the CPU path the learner runs) on fresh random batches, every config
// variant. Both compute in double from the same fp32 inputs and round the
// results to fp32; they differ only in summation order and in the last bit
// of exp/expm1, so gradients and statistics agree to 1e-5 relative (the
// bound the issue sets; the real difference is a few fp32 ulps) plus 1e-9
// absolute for values that are 0 up to rounding (a mean log ratio near 0).
#include "kernels/grpo_loss.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "learner/grpo_loss.h"
#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

struct Variant {
  learner::PolicyLossConfig cpu;
  bool old = true, ref = true, rollout = true, mask = true, totals = false;
};

GrpoLossConfig ToDevice(const learner::PolicyLossConfig& c) {
  GrpoLossConfig d;
  d.ratio_level = c.ratio_level == learner::RatioLevel::kToken ? GrpoRatioLevel::kToken : GrpoRatioLevel::kSequence;
  d.clip_low = c.clip_low;
  d.clip_high = c.clip_high;
  d.beta = c.beta;
  d.aggregation = c.aggregation == learner::LossAggregation::kSeqMeanTokenMean ? GrpoAggregation::kSeqMeanTokenMean
                  : c.aggregation == learner::LossAggregation::kTokenMean      ? GrpoAggregation::kTokenMean
                                                                               : GrpoAggregation::kSeqMeanTokenSumNorm;
  d.max_tokens = c.max_tokens;
  d.tis_cap = c.tis_cap;
  d.dual_clip = c.dual_clip;
  return d;
}

bool Close(double out, double ref) { return std::fabs(out - ref) <= 1e-5 * std::fabs(ref) + 1e-9; }

void CheckLoss(const Variant& v, int sequences, int max_len) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " sequences " + std::to_string(sequences));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> len_dist(0, max_len);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<int64_t> offsets{0};
  for (int i = 0; i < sequences; ++i) offsets.push_back(offsets.back() + len_dist(rng));
  const int tokens = int(offsets.back());
  std::vector<float> logp(tokens), old(tokens), ref(tokens), rollout(tokens), adv(sequences);
  std::vector<uint8_t> mask(tokens);
  for (int t = 0; t < tokens; ++t) {
    logp[t] = -5.f * u(rng);
    old[t] = logp[t] + 0.3f * nd(rng);  // ratios spread over both clip edges
    ref[t] = logp[t] + 0.2f * nd(rng);
    rollout[t] = old[t] + 0.5f * nd(rng);  // TIS weights above and below the cap
    mask[t] = u(rng) < 0.85f;
  }
  for (int i = 0; i < sequences; ++i) {
    adv[i] = i % 9 == 4 ? 0.f : nd(rng);
    if (i % 13 == 6)  // a fully masked sequence: no loss, does not count
      for (int64_t t = offsets[i]; t < offsets[i + 1]; ++t) mask[t] = 0;
  }
  learner::PolicyBatch batch;
  batch.seq_offsets = offsets;
  batch.logp = logp;
  if (v.old) batch.old_logp = old;
  if (v.ref) batch.ref_logp = ref;
  if (v.rollout) batch.rollout_logp = rollout;
  if (v.mask) batch.mask = mask;
  batch.advantages = adv;
  if (v.totals) {
    batch.total_tokens = 3 * tokens + 5;
    batch.total_sequences = 2 * sequences + 1;
  }
  auto cpu = learner::ComputePolicyLoss(batch, v.cpu);
  ASSERT_TRUE(cpu.ok()) << cpu.status();

  std::vector<int32_t> offsets32(offsets.begin(), offsets.end());
  DeviceBuffer<int32_t> d_offsets(offsets32.size());
  DeviceBuffer<float> d_logp(tokens), d_old(tokens), d_ref(tokens), d_rollout(tokens), d_adv(sequences),
      d_dlogp(tokens);
  DeviceBuffer<uint8_t> d_mask(tokens);
  DeviceBuffer<GrpoLossStats> d_stats(1);
  const size_t ws_bytes = GrpoLossWorkspaceBytes(sequences);
  DeviceBuffer<char> d_ws(ws_bytes);
  auto upload = [](auto& buffer, const auto& host) {
    return host.empty() ? cudaSuccess : buffer.Upload(host);  // empty: no device allocation
  };
  GROVE_CUDA_OK(upload(d_offsets, offsets32));
  GROVE_CUDA_OK(upload(d_logp, logp));
  GROVE_CUDA_OK(upload(d_old, old));
  GROVE_CUDA_OK(upload(d_ref, ref));
  GROVE_CUDA_OK(upload(d_rollout, rollout));
  GROVE_CUDA_OK(upload(d_adv, adv));
  GROVE_CUDA_OK(upload(d_mask, mask));
  if (tokens > 0) GROVE_CUDA_OK(cudaMemset(d_dlogp.get(), 0x7F, tokens * sizeof(float)));
  GrpoLossArgs a;
  a.seq_offsets = d_offsets.get();
  a.logp = d_logp.get();
  a.old_logp = v.old ? d_old.get() : nullptr;
  a.ref_logp = v.ref ? d_ref.get() : nullptr;
  a.rollout_logp = v.rollout ? d_rollout.get() : nullptr;
  a.mask = v.mask ? d_mask.get() : nullptr;
  a.advantages = d_adv.get();
  a.tokens = tokens;
  a.sequences = sequences;
  a.total_tokens = batch.total_tokens;
  a.total_sequences = batch.total_sequences;
  a.dlogp = d_dlogp.get();
  a.stats = d_stats.get();
  Status s = GrpoLoss(ToDevice(v.cpu), a, d_ws.get(), ws_bytes, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<float> dlogp;
  std::vector<GrpoLossStats> stats;
  if (tokens > 0) GROVE_CUDA_OK(d_dlogp.Download(&dlogp));
  GROVE_CUDA_OK(d_stats.Download(&stats));
  size_t bad = 0;
  for (int t = 0; t < tokens; ++t)
    if (!Close(dlogp[t], cpu->grad_logp[t])) ++bad;
  EXPECT_EQ(bad, 0u) << "of " << tokens << " gradients";
  const learner::PolicyLossStats& c = cpu->stats;
  const GrpoLossStats& g = stats[0];
  EXPECT_PRED2(Close, g.loss, cpu->loss);
  EXPECT_EQ(g.num_sequences, float(c.num_sequences));
  EXPECT_EQ(g.num_tokens, float(c.num_tokens));
  EXPECT_PRED2(Close, g.pg_loss, c.pg_loss);
  EXPECT_PRED2(Close, g.kl_loss, c.kl_loss);
  EXPECT_PRED2(Close, g.ratio_mean, c.ratio_mean);
  EXPECT_PRED2(Close, g.clip_frac_low, c.clip_frac_low);
  EXPECT_PRED2(Close, g.clip_frac_high, c.clip_frac_high);
  EXPECT_PRED2(Close, g.clip_frac_dual, c.clip_frac_dual);
  EXPECT_PRED2(Close, g.kl_ref_k3_mean, c.kl_ref_k3_mean);
  EXPECT_PRED2(Close, g.mismatch_log_ratio_mean, c.mismatch_log_ratio_mean);
  EXPECT_PRED2(Close, g.mismatch_kl_k3, c.mismatch_kl_k3);
  EXPECT_PRED2(Close, g.tis_capped_frac, c.tis_capped_frac);
  EXPECT_PRED2(Close, g.tis_weight_mean, c.tis_weight_mean);
  EXPECT_PRED2(Close, g.neg_logp_mean, c.neg_logp_mean);
}

TEST(GrpoLossTest, EveryConfigVariantMatchesTheCpu) {
  GROVE_SKIP_WITHOUT_GPU();
  using learner::LossAggregation;
  using learner::RatioLevel;
  int checked = 0;
  for (RatioLevel level : {RatioLevel::kToken, RatioLevel::kSequence})
    for (LossAggregation agg : {LossAggregation::kSeqMeanTokenMean, LossAggregation::kTokenMean,
                                LossAggregation::kSeqMeanTokenSumNorm})
      for (int flags = 0; flags < 8; ++flags) {
        Variant v;
        v.cpu.ratio_level = level;
        v.cpu.aggregation = agg;
        v.cpu.max_tokens = 300;
        v.cpu.clip_low = 0.2;
        v.cpu.clip_high = 0.28;
        v.cpu.tis_cap = flags & 1 ? 2.0 : 0.0;
        v.cpu.dual_clip = flags & 2 ? 3.0 : 0.0;
        v.cpu.beta = flags & 4 ? 0.05 : 0.0;
        v.totals = (flags + int(agg)) % 2 == 1;
        v.old = flags != 5;  // once on-policy (old = logp)
        v.mask = flags != 6;
        SCOPED_TRACE("level " + std::to_string(int(level)) + " agg " + std::to_string(int(agg)) + " flags " +
                     std::to_string(flags));
        CheckLoss(v, 1 + (flags * 37) % 200, 300);
        ++checked;
      }
  EXPECT_EQ(checked, 48);
}

TEST(GrpoLossTest, WithoutRefOrRolloutAndEmptyBatches) {
  GROVE_SKIP_WITHOUT_GPU();
  Variant v;
  v.ref = false;
  v.rollout = false;
  v.cpu.tis_cap = 2.0;  // no rollout_logp: TIS off, as on the CPU
  CheckLoss(v, 64, 100);
  CheckLoss(v, 5, 0);  // sequences without tokens: zero loss and stats
  CheckLoss(v, 0, 10);
}

TEST(GrpoLossTest, RejectsBadConfigs) {
  GrpoLossConfig c;
  GrpoLossArgs a;
  c.clip_low = 1.0;
  EXPECT_EQ(GrpoLoss(c, a, nullptr, 0, nullptr).code(), StatusCode::kInvalidArgument);
  c = GrpoLossConfig{};
  c.dual_clip = 0.5;
  EXPECT_EQ(GrpoLoss(c, a, nullptr, 0, nullptr).code(), StatusCode::kInvalidArgument);
  c = GrpoLossConfig{};
  c.aggregation = GrpoAggregation::kSeqMeanTokenSumNorm;
  EXPECT_EQ(GrpoLoss(c, a, nullptr, 0, nullptr).code(), StatusCode::kInvalidArgument);
  c = GrpoLossConfig{};
  c.beta = 0.1;
  int32_t fake_offsets = 0;
  float fake = 0;
  GrpoLossStats stats;
  a.seq_offsets = &fake_offsets;
  a.logp = &fake;
  a.dlogp = &fake;
  a.advantages = &fake;
  a.stats = &stats;
  a.tokens = 1;
  a.sequences = 1;
  EXPECT_EQ(GrpoLoss(c, a, nullptr, 0, nullptr).code(), StatusCode::kInvalidArgument);  // beta without ref
  c.beta = 0;
  EXPECT_EQ(GrpoLoss(c, a, nullptr, 0, nullptr).code(), StatusCode::kInvalidArgument);  // no workspace
}

}  // namespace
}  // namespace grove::kernels
