#include "learner/grpo_loss.h"

#include <cmath>
#include <string>

namespace grove::learner {

Result<LossAggregation> ParseLossAggregation(std::string_view name) {
  if (name == "seq_mean_token_mean") return LossAggregation::kSeqMeanTokenMean;
  if (name == "token_mean") return LossAggregation::kTokenMean;
  if (name == "seq_mean_token_sum_norm") return LossAggregation::kSeqMeanTokenSumNorm;
  return Status::InvalidArgument("unknown loss aggregation '" + std::string(name) +
                                 "' (known: seq_mean_token_mean, token_mean, seq_mean_token_sum_norm)");
}

std::string_view LossAggregationName(LossAggregation a) {
  switch (a) {
    case LossAggregation::kSeqMeanTokenMean: return "seq_mean_token_mean";
    case LossAggregation::kTokenMean: return "token_mean";
    case LossAggregation::kSeqMeanTokenSumNorm: return "seq_mean_token_sum_norm";
  }
  return "?";
}

Status ValidatePolicyLossConfig(const PolicyLossConfig& c) {
  if (!(c.clip_low >= 0.0 && c.clip_low < 1.0))
    return Status::InvalidArgument("clip_low must be in [0, 1), got " + std::to_string(c.clip_low));
  if (!(c.clip_high >= 0.0) || !std::isfinite(c.clip_high))
    return Status::InvalidArgument("clip_high must be a finite value >= 0, got " + std::to_string(c.clip_high));
  if (!(c.beta >= 0.0) || !std::isfinite(c.beta))
    return Status::InvalidArgument("beta must be a finite value >= 0, got " + std::to_string(c.beta));
  if (std::isnan(c.tis_cap)) return Status::InvalidArgument("tis_cap is NaN");
  if (!(c.dual_clip == 0.0 || (c.dual_clip > 1.0 && std::isfinite(c.dual_clip))))
    return Status::InvalidArgument("dual_clip must be 0 (off) or a finite value > 1, got " +
                                   std::to_string(c.dual_clip));
  if (c.aggregation == LossAggregation::kSeqMeanTokenSumNorm && c.max_tokens <= 0)
    return Status::InvalidArgument(
        "loss aggregation seq_mean_token_sum_norm needs max_tokens > 0, got " + std::to_string(c.max_tokens));
  return Status::OK();
}

namespace {

// Which branch of min(x*A, clip(x)*A) is taken. kNone: the unclipped x*A (it
// carries the gradient); at a tie the unclipped branch is taken, so the
// gradient is the one-sided derivative from inside the trust region.
enum class Clip { kNone, kLow, kHigh, kDual };

// dual <= 0: no dual clip.
Clip Classify(double x, double a, double lo, double hi, double dual) {
  if (a > 0.0 && x > hi) return Clip::kHigh;
  if (a < 0.0 && x < lo) return Clip::kLow;
  if (a < 0.0 && dual > 0.0 && x > dual) return Clip::kDual;
  return Clip::kNone;
}

// The objective's value for a ratio x on branch `clip`.
double Objective(Clip clip, double x, double a, double lo, double hi, double dual) {
  switch (clip) {
    case Clip::kNone: return x * a;
    case Clip::kLow: return lo * a;
    case Clip::kHigh: return hi * a;
    case Clip::kDual: return dual * a;
  }
  return 0.0;
}

template <typename Real>
Status CheckBatch(const PolicyBatchOf<Real>& b, const PolicyLossConfig& c) {
  if (b.seq_offsets.empty()) return Status::InvalidArgument("seq_offsets is empty (needs N + 1 entries)");
  const size_t n = b.seq_offsets.size() - 1;
  const int64_t tokens = static_cast<int64_t>(b.logp.size());
  if (b.seq_offsets[0] != 0) return Status::InvalidArgument("seq_offsets[0] must be 0");
  for (size_t i = 0; i < n; ++i) {
    if (b.seq_offsets[i + 1] < b.seq_offsets[i])
      return Status::InvalidArgument("seq_offsets decrease at sequence " + std::to_string(i));
  }
  if (b.seq_offsets[n] != tokens)
    return Status::InvalidArgument("seq_offsets end at " + std::to_string(b.seq_offsets[n]) + " but logp has " +
                                   std::to_string(tokens) + " tokens");
  if (b.total_tokens < 0 || b.total_sequences < 0)
    return Status::InvalidArgument("total_tokens and total_sequences must be >= 0 (0: this batch's own)");
  if (b.advantages.size() != n)
    return Status::InvalidArgument("advantages has " + std::to_string(b.advantages.size()) + " entries for " +
                                   std::to_string(n) + " sequences");
  auto same_or_empty = [&](size_t size, const char* name) -> Status {
    if (size != 0 && size != static_cast<size_t>(tokens))
      return Status::InvalidArgument(std::string(name) + " has " + std::to_string(size) + " entries, logp has " +
                                     std::to_string(tokens));
    return Status::OK();
  };
  GROVE_RETURN_IF_ERROR(same_or_empty(b.old_logp.size(), "old_logp"));
  GROVE_RETURN_IF_ERROR(same_or_empty(b.ref_logp.size(), "ref_logp"));
  GROVE_RETURN_IF_ERROR(same_or_empty(b.rollout_logp.size(), "rollout_logp"));
  GROVE_RETURN_IF_ERROR(same_or_empty(b.mask.size(), "mask"));
  if (c.beta > 0.0 && b.ref_logp.empty() && tokens > 0)
    return Status::InvalidArgument("beta > 0 needs ref_logp (the frozen reference's log-probs)");
  for (int64_t t = 0; t < tokens; ++t) {
    if (!b.mask.empty() && b.mask[t] == 0) continue;
    const bool finite = std::isfinite(static_cast<double>(b.logp[t])) &&
                        (b.old_logp.empty() || std::isfinite(static_cast<double>(b.old_logp[t]))) &&
                        (b.ref_logp.empty() || std::isfinite(static_cast<double>(b.ref_logp[t]))) &&
                        (b.rollout_logp.empty() || std::isfinite(static_cast<double>(b.rollout_logp[t])));
    if (!finite) return Status::InvalidArgument("a log-prob of token " + std::to_string(t) + " is not finite");
  }
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(static_cast<double>(b.advantages[i])))
      return Status::InvalidArgument("advantage of sequence " + std::to_string(i) + " is not finite");
  }
  return Status::OK();
}

}  // namespace

template <typename Real>
Result<PolicyLossOutputOf<Real>> ComputePolicyLoss(const PolicyBatchOf<Real>& b, const PolicyLossConfig& c) {
  GROVE_RETURN_IF_ERROR(ValidatePolicyLossConfig(c));
  GROVE_RETURN_IF_ERROR(CheckBatch(b, c));
  const size_t n = b.seq_offsets.size() - 1;
  const bool tis = c.tis_cap > 0.0 && !b.rollout_logp.empty();
  const double lo = 1.0 - c.clip_low;
  const double hi = 1.0 + c.clip_high;

  auto counted = [&](int64_t t) { return b.mask.empty() || b.mask[t] != 0; };
  auto old_of = [&](int64_t t) -> double { return b.old_logp.empty() ? b.logp[t] : b.old_logp[t]; };
  // The detached TIS weight and whether the cap bit.
  auto tis_weight = [&](int64_t t, bool* capped) -> double {
    *capped = false;
    if (!tis) return 1.0;
    const double w = std::exp(old_of(t) - static_cast<double>(b.rollout_logp[t]));
    if (w > c.tis_cap) {
      *capped = true;
      return c.tis_cap;
    }
    return w;
  };

  PolicyLossOutputOf<Real> out;
  out.grad_logp.assign(b.logp.size(), Real(0));
  PolicyLossStats& st = out.stats;

  // Pass 1: token counts, and for the sequence ratio the mean log ratio and
  // the sum of TIS weights (d l / d logp of one token involves all of them).
  std::vector<int64_t> count(n, 0);
  std::vector<double> mean_log_ratio(n, 0.0), weight_sum(n, 0.0);
  int64_t nonempty = 0;
  for (size_t i = 0; i < n; ++i) {
    for (int64_t t = b.seq_offsets[i]; t < b.seq_offsets[i + 1]; ++t) {
      if (!counted(t)) continue;
      ++count[i];
      if (c.ratio_level == RatioLevel::kSequence) {
        mean_log_ratio[i] += static_cast<double>(b.logp[t]) - old_of(t);
        bool capped;
        weight_sum[i] += tis_weight(t, &capped);
      }
    }
    if (count[i] > 0) {
      mean_log_ratio[i] /= static_cast<double>(count[i]);
      ++nonempty;
    }
    st.num_tokens += count[i];
  }
  st.num_sequences = nonempty;
  if ((b.total_tokens > 0 && b.total_tokens < st.num_tokens) ||
      (b.total_sequences > 0 && b.total_sequences < nonempty))
    return Status::InvalidArgument("total_tokens/total_sequences (" + std::to_string(b.total_tokens) + "/" +
                                   std::to_string(b.total_sequences) + ") are less than this batch's own (" +
                                   std::to_string(st.num_tokens) + "/" + std::to_string(nonempty) + ")");
  if (st.num_tokens == 0) return out;
  const double norm_tokens = static_cast<double>(b.total_tokens > 0 ? b.total_tokens : st.num_tokens);
  const double norm_seqs = static_cast<double>(b.total_sequences > 0 ? b.total_sequences : nonempty);

  double pg = 0.0, kl = 0.0;
  double ratio_sum = 0.0, kl_sum = 0.0, mm_sum = 0.0, mm_k3_sum = 0.0, w_sum = 0.0, neg_logp_sum = 0.0;
  int64_t n_low = 0, n_high = 0, n_dual = 0, n_capped = 0;
  for (size_t i = 0; i < n; ++i) {
    if (count[i] == 0) continue;
    const double a = static_cast<double>(b.advantages[i]);
    double agg = 0.0;  // d L / d l_t for every token of this sequence
    switch (c.aggregation) {
      case LossAggregation::kSeqMeanTokenMean:
        agg = 1.0 / (norm_seqs * static_cast<double>(count[i]));
        break;
      case LossAggregation::kTokenMean: agg = 1.0 / norm_tokens; break;
      case LossAggregation::kSeqMeanTokenSumNorm:
        agg = 1.0 / (norm_seqs * static_cast<double>(c.max_tokens));
        break;
    }
    // Sequence ratio: f(s_i) and d f / d log s_i, shared by the sequence.
    double seq_obj = 0.0, seq_dobj = 0.0, seq_ratio = 0.0;
    Clip seq_clip = Clip::kNone;
    if (c.ratio_level == RatioLevel::kSequence) {
      seq_ratio = std::exp(mean_log_ratio[i]);
      seq_clip = Classify(seq_ratio, a, lo, hi, c.dual_clip);
      seq_obj = Objective(seq_clip, seq_ratio, a, lo, hi, c.dual_clip);
      seq_dobj = seq_clip == Clip::kNone ? seq_ratio * a : 0.0;
    }
    for (int64_t t = b.seq_offsets[i]; t < b.seq_offsets[i + 1]; ++t) {
      if (!counted(t)) continue;
      const double logp = b.logp[t];
      const double old = old_of(t);
      bool capped;
      const double w = tis_weight(t, &capped);
      double obj, dpg, ratio;
      Clip clip;
      if (c.ratio_level == RatioLevel::kToken) {
        ratio = std::exp(logp - old);
        clip = Classify(ratio, a, lo, hi, c.dual_clip);
        obj = Objective(clip, ratio, a, lo, hi, c.dual_clip);
        dpg = -w * (clip == Clip::kNone ? ratio * a : 0.0);
      } else {
        ratio = seq_ratio;
        clip = seq_clip;
        obj = seq_obj;
        // d/d logp_t of -sum_u w_u f(s_i), with d log s_i / d logp_t = 1/|o_i|.
        dpg = -weight_sum[i] * seq_dobj / static_cast<double>(count[i]);
      }
      const double pg_t = -w * obj;
      double kl_t = 0.0, dkl = 0.0;
      if (!b.ref_logp.empty()) {
        const double x = static_cast<double>(b.ref_logp[t]) - logp;
        const double k3 = std::expm1(x) - x;  // exp(x) - x - 1 without cancellation near 0
        kl_sum += k3;
        if (c.beta > 0.0) {
          kl_t = c.beta * k3;
          dkl = -c.beta * std::expm1(x);  // d k3 / d logp = 1 - exp(x)
        }
      }
      pg += agg * pg_t;
      kl += agg * kl_t;
      out.grad_logp[t] = static_cast<Real>(agg * (dpg + dkl));

      ratio_sum += ratio;
      n_low += clip == Clip::kLow;
      n_high += clip == Clip::kHigh;
      n_dual += clip == Clip::kDual;
      w_sum += w;
      n_capped += capped;
      neg_logp_sum -= logp;
      if (!b.rollout_logp.empty()) {
        const double x = old - static_cast<double>(b.rollout_logp[t]);
        mm_sum += x;
        mm_k3_sum += std::expm1(x) - x;
      }
    }
  }
  const double inv_t = 1.0 / static_cast<double>(st.num_tokens);
  out.loss = pg + kl;
  st.pg_loss = pg;
  st.kl_loss = kl;
  st.ratio_mean = ratio_sum * inv_t;
  st.clip_frac_low = static_cast<double>(n_low) * inv_t;
  st.clip_frac_high = static_cast<double>(n_high) * inv_t;
  st.clip_frac_dual = static_cast<double>(n_dual) * inv_t;
  st.kl_ref_k3_mean = kl_sum * inv_t;
  st.mismatch_log_ratio_mean = mm_sum * inv_t;
  st.mismatch_kl_k3 = mm_k3_sum * inv_t;
  st.tis_capped_frac = static_cast<double>(n_capped) * inv_t;
  st.tis_weight_mean = w_sum * inv_t;
  st.neg_logp_mean = neg_logp_sum * inv_t;
  return out;
}

template Result<PolicyLossOutputOf<float>> ComputePolicyLoss(const PolicyBatchOf<float>&, const PolicyLossConfig&);
template Result<PolicyLossOutputOf<double>> ComputePolicyLoss(const PolicyBatchOf<double>&,
                                                              const PolicyLossConfig&);

}  // namespace grove::learner
