// The GRPO policy loss over a batch of completions, its exact gradient with
// respect to the current policy's per-token log-probs, and the statistics a
// run is watched by. It knows nothing of the model: the learner computes the
// per-token log-probs, calls this, and back-propagates grad_logp.
//
// Notation, per completion i with masked tokens t (|o_i| of them) and
// sequence advantage A_i:
//   r_t    = exp(logp_t - old_logp_t)                 token ratio
//   s_i    = exp(mean_t(logp_t - old_logp_t))          sequence ratio (GSPO)
//   w_t    = min(exp(old_logp_t - rollout_logp_t), tis_cap), detached   (TIS)
//   k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                  (KL)
//   f(x)   = min(x * A, clip(x, 1 - clip_low, 1 + clip_high) * A), and with
//            dual clip c > 1 (Ye et al. 2020) for A < 0: max(f(x), c * A), which
//            bounds the loss of a far off-policy token with a negative advantage
// Per-token loss:
//   token ratio:    l_t = -w_t * f(r_t)  + beta * k3_t
//   sequence ratio: l_t = -w_t * f(s_i)  + beta * k3_t
// TIS multiplies the policy-gradient term only (as in Yao et al. 2025, "Your
// efficient RL framework secretly brings you off-policy RL training"); the KL
// term is against the frozen reference and needs no correction.
// Aggregation, with T masked tokens and N sequences that have at least one
// masked token (a sequence without any has no loss and does not count):
//   kSeqMeanTokenMean     L = 1/N sum_i 1/|o_i| sum_t l_t   (GRPO; GSPO's
//                             sequence objective exactly)
//   kTokenMean            L = 1/T sum_i sum_t l_t          (DAPO)
//   kSeqMeanTokenSumNorm  L = 1/N sum_i sum_t l_t / max_tokens   (Dr. GRPO:
//                             no dependence on the completion's own length)
// Gradient accumulation: a batch split into micro-batches gives, micro-batch
// by micro-batch, losses and gradients that add up to the whole batch's when
// each micro-batch is told the whole batch's N and T (PolicyBatchOf::total_*).
// A ratio is "clipped" when the clipped branch is the min and so carries no
// gradient: A > 0 and x > 1 + clip_high (high), A < 0 and x < 1 - clip_low
// (low), or A < 0 and x > c (dual). For the sequence ratio every token of a
// clipped sequence counts.
// DAPO's overlong reward shaping is applied to the rewards by the verifier
// (reward/) before advantages are taken; this file does not repeat it.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace grove::learner {

enum class RatioLevel { kToken, kSequence };
enum class LossAggregation { kSeqMeanTokenMean, kTokenMean, kSeqMeanTokenSumNorm };

// "seq_mean_token_mean" | "token_mean" | "seq_mean_token_sum_norm".
Result<LossAggregation> ParseLossAggregation(std::string_view name);
std::string_view LossAggregationName(LossAggregation a);

struct PolicyLossConfig {
  RatioLevel ratio_level = RatioLevel::kToken;
  double clip_low = 0.2;   // ratio floor is 1 - clip_low; in [0, 1)
  double clip_high = 0.2;  // ratio ceiling is 1 + clip_high; >= 0
  double beta = 0.0;       // k3 KL coefficient; > 0 needs ref_logp
  LossAggregation aggregation = LossAggregation::kSeqMeanTokenMean;
  int64_t max_tokens = 0;  // the constant of kSeqMeanTokenSumNorm; > 0 there
  double tis_cap = 0.0;    // <= 0 disables truncated importance sampling
  double dual_clip = 0.0;  // 0 disables; else > 1 (verl uses 3)
};

// InvalidArgument naming the first bad field.
Status ValidatePolicyLossConfig(const PolicyLossConfig& config);

// A batch in flat token arrays. Sequence i owns tokens
// [seq_offsets[i], seq_offsets[i+1]) of every per-token array (completion
// tokens only; the prompt is not here). Real is float for training; double is
// there so a test can take finite differences without float round-off.
template <typename Real>
struct PolicyBatchOf {
  std::span<const int64_t> seq_offsets;  // size N + 1, non-decreasing, from 0
  std::span<const Real> logp;            // current policy: the variable
  // The behaviour policy the learner recomputed before this update. Empty:
  // on-policy, taken equal to logp (ratio 1, still differentiated).
  std::span<const Real> old_logp;
  std::span<const Real> ref_logp;      // frozen reference; may be empty when beta == 0
  std::span<const Real> rollout_logp;  // rollout worker's own; empty: no TIS, no mismatch stats
  std::span<const uint8_t> mask;       // 1: token counts; empty: all count
  std::span<const Real> advantages;    // one per sequence
  // For micro-batches of a larger batch: that batch's T (masked tokens) and N
  // (sequences with a masked token). 0: this batch's own.
  int64_t total_tokens = 0;
  int64_t total_sequences = 0;
};
using PolicyBatch = PolicyBatchOf<float>;

struct PolicyLossStats {
  int64_t num_sequences = 0;  // sequences with at least one masked token, this batch
  int64_t num_tokens = 0;     // masked tokens, this batch
  double pg_loss = 0.0;       // the policy-gradient part of the loss
  double kl_loss = 0.0;       // beta * aggregated k3 (0 when beta == 0)
  // Token means below are over the T masked tokens (0 when T == 0).
  double ratio_mean = 0.0;      // of the ratio the objective used (r_t or s_i)
  double clip_frac_low = 0.0;   // fraction of tokens clipped at 1 - clip_low
  double clip_frac_high = 0.0;  // fraction of tokens clipped at 1 + clip_high
  double clip_frac_dual = 0.0;  // fraction of tokens held by the dual clip
  double kl_ref_k3_mean = 0.0;  // mean k3 to the reference (needs ref_logp; beta may be 0)
  // Rollout/learner mismatch, tokens sampled by the rollout policy (needs
  // rollout_logp): mean(old - rollout), whose negative is the k1 estimate of
  // KL(rollout || old), and the k3 estimate mean(w - log w - 1), w = exp(old - rollout).
  double mismatch_log_ratio_mean = 0.0;
  double mismatch_kl_k3 = 0.0;
  double tis_capped_frac = 0.0;  // fraction of tokens whose TIS weight hit tis_cap
  double tis_weight_mean = 0.0;  // mean TIS weight after the cap (1 when disabled)
  // Entropy proxy: -mean(logp) of the sampled tokens, a Monte-Carlo estimate of
  // the policy's per-token entropy (biased by the rollout/learner mismatch).
  double neg_logp_mean = 0.0;
};

template <typename Real>
struct PolicyLossOutputOf {
  double loss = 0.0;
  std::vector<Real> grad_logp;  // d loss / d logp, one per token; 0 on masked-out tokens
  PolicyLossStats stats;
};
using PolicyLossOutput = PolicyLossOutputOf<float>;

// Computes the loss, its gradient and the stats. Sums are taken in double.
// InvalidArgument for a bad config, inconsistent sizes, bad offsets, a
// non-finite input on a masked token, or beta > 0 without ref_logp.
template <typename Real>
Result<PolicyLossOutputOf<Real>> ComputePolicyLoss(const PolicyBatchOf<Real>& batch,
                                                   const PolicyLossConfig& config);

extern template Result<PolicyLossOutputOf<float>> ComputePolicyLoss(const PolicyBatchOf<float>&,
                                                                    const PolicyLossConfig&);
extern template Result<PolicyLossOutputOf<double>> ComputePolicyLoss(const PolicyBatchOf<double>&,
                                                                     const PolicyLossConfig&);

}  // namespace grove::learner
