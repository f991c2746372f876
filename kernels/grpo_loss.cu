#include "kernels/grpo_loss.h"

#include <cmath>
#include <string>

namespace grove::kernels {
namespace {

constexpr int kThreads = 256;

// Per-sequence partial sums of the statistics, reduced in fixed order.
enum Stat {
  kPg, kKl, kRatio, kKlRef, kMismatch, kMismatchK3, kWeight, kNegLogp, kLow, kHigh, kDual, kCapped, kNumStats
};

// Workspace layout (doubles): per sequence count, mean log ratio, weight
// sum, then kNumStats partials per sequence, then the batch's T and N.
struct Workspace {
  double* count;
  double* mean_log_ratio;
  double* weight_sum;
  double* partial;  // [sequences][kNumStats]
  double* totals;   // [2]: counted tokens, sequences with a counted token
};

Workspace Carve(void* p, int n) {
  double* d = static_cast<double*>(p);
  return {d, d + n, d + 2 * n, d + 3 * n, d + 3 * n + static_cast<size_t>(n) * kNumStats};
}

// Deterministic block sum: a fixed shuffle tree per warp, then warps in order.
__device__ double BlockSum(double v) {
  __shared__ double part[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  double all = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) all += part[w];
  __syncthreads();
  return all;
}

struct Params {
  GrpoLossConfig c;
  GrpoLossArgs a;
  bool tis;
  double lo, hi;
};

__device__ __forceinline__ bool Counted(const Params& p, int t) { return !p.a.mask || p.a.mask[t] != 0; }
__device__ __forceinline__ double OldOf(const Params& p, int t) {
  return p.a.old_logp ? static_cast<double>(p.a.old_logp[t]) : static_cast<double>(p.a.logp[t]);
}
__device__ __forceinline__ double TisWeight(const Params& p, int t, bool* capped) {
  *capped = false;
  if (!p.tis) return 1.0;
  const double w = exp(OldOf(p, t) - static_cast<double>(p.a.rollout_logp[t]));
  if (w > p.c.tis_cap) {
    *capped = true;
    return p.c.tis_cap;
  }
  return w;
}

enum Clip { kNone, kClipLow, kClipHigh, kClipDual };

__device__ __forceinline__ Clip Classify(double x, double a, double lo, double hi, double dual) {
  if (a > 0.0 && x > hi) return kClipHigh;
  if (a < 0.0 && x < lo) return kClipLow;
  if (a < 0.0 && dual > 0.0 && x > dual) return kClipDual;
  return kNone;
}

__device__ __forceinline__ double Objective(Clip clip, double x, double a, double lo, double hi, double dual) {
  switch (clip) {
    case kNone: return x * a;
    case kClipLow: return lo * a;
    case kClipHigh: return hi * a;
    case kClipDual: return dual * a;
  }
  return 0.0;
}

// Pass 1, one block per sequence: counted tokens, and for the sequence
// ratio the mean log ratio and the sum of TIS weights.
__global__ void SequencePassKernel(Params p, Workspace w) {
  const int i = blockIdx.x;
  const int t0 = p.a.seq_offsets[i], t1 = p.a.seq_offsets[i + 1];
  const bool seq = p.c.ratio_level == GrpoRatioLevel::kSequence;
  double count = 0.0, log_ratio = 0.0, weights = 0.0;
  for (int t = t0 + threadIdx.x; t < t1; t += kThreads) {
    if (!Counted(p, t)) continue;
    count += 1.0;
    if (seq) {
      log_ratio += static_cast<double>(p.a.logp[t]) - OldOf(p, t);
      bool capped;
      weights += TisWeight(p, t, &capped);
    }
  }
  count = BlockSum(count);
  log_ratio = BlockSum(log_ratio);
  weights = BlockSum(weights);
  if (threadIdx.x == 0) {
    w.count[i] = count;
    w.mean_log_ratio[i] = count > 0 ? log_ratio / count : 0.0;
    w.weight_sum[i] = weights;
  }
}

// One block: the batch's counted tokens and non-empty sequences.
__global__ void TotalsKernel(Workspace w, int n) {
  double tokens = 0.0, nonempty = 0.0;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    tokens += w.count[i];
    nonempty += w.count[i] > 0 ? 1.0 : 0.0;
  }
  tokens = BlockSum(tokens);
  nonempty = BlockSum(nonempty);
  if (threadIdx.x == 0) {
    w.totals[0] = tokens;
    w.totals[1] = nonempty;
  }
}

// Pass 2, one block per sequence: the gradient of every token and the
// sequence's partial statistics.
__global__ void TokenPassKernel(Params p, Workspace w) {
  const int i = blockIdx.x;
  const int t0 = p.a.seq_offsets[i], t1 = p.a.seq_offsets[i + 1];
  const double count = w.count[i];
  double sums[kNumStats];
#pragma unroll
  for (int s = 0; s < kNumStats; ++s) sums[s] = 0.0;
  const double norm_tokens = p.a.total_tokens > 0 ? static_cast<double>(p.a.total_tokens) : w.totals[0];
  const double norm_seqs = p.a.total_sequences > 0 ? static_cast<double>(p.a.total_sequences) : w.totals[1];
  double agg = 0.0;
  switch (p.c.aggregation) {
    case GrpoAggregation::kSeqMeanTokenMean: agg = 1.0 / (norm_seqs * count); break;
    case GrpoAggregation::kTokenMean: agg = 1.0 / norm_tokens; break;
    case GrpoAggregation::kSeqMeanTokenSumNorm: agg = 1.0 / (norm_seqs * static_cast<double>(p.c.max_tokens)); break;
  }
  const double adv = static_cast<double>(p.a.advantages[i]);
  const double dual = p.c.dual_clip;
  double seq_obj = 0.0, seq_dobj = 0.0, seq_ratio = 0.0;
  Clip seq_clip = kNone;
  const bool seq = p.c.ratio_level == GrpoRatioLevel::kSequence;
  if (seq && count > 0) {
    seq_ratio = exp(w.mean_log_ratio[i]);
    seq_clip = Classify(seq_ratio, adv, p.lo, p.hi, dual);
    seq_obj = Objective(seq_clip, seq_ratio, adv, p.lo, p.hi, dual);
    seq_dobj = seq_clip == kNone ? seq_ratio * adv : 0.0;
  }
  for (int t = t0 + threadIdx.x; t < t1; t += kThreads) {
    if (!Counted(p, t)) {
      p.a.dlogp[t] = 0.f;
      continue;
    }
    const double logp = p.a.logp[t];
    const double old = OldOf(p, t);
    bool capped;
    const double wt = TisWeight(p, t, &capped);
    double obj, dpg, ratio;
    Clip clip;
    if (!seq) {
      ratio = exp(logp - old);
      clip = Classify(ratio, adv, p.lo, p.hi, dual);
      obj = Objective(clip, ratio, adv, p.lo, p.hi, dual);
      dpg = -wt * (clip == kNone ? ratio * adv : 0.0);
    } else {
      ratio = seq_ratio;
      clip = seq_clip;
      obj = seq_obj;
      dpg = -w.weight_sum[i] * seq_dobj / count;
    }
    double kl_t = 0.0, dkl = 0.0;
    if (p.a.ref_logp) {
      const double x = static_cast<double>(p.a.ref_logp[t]) - logp;
      const double k3 = expm1(x) - x;
      sums[kKlRef] += k3;
      if (p.c.beta > 0.0) {
        kl_t = p.c.beta * k3;
        dkl = -p.c.beta * expm1(x);
      }
    }
    sums[kPg] += agg * (-wt * obj);
    sums[kKl] += agg * kl_t;
    p.a.dlogp[t] = static_cast<float>(agg * (dpg + dkl));
    sums[kRatio] += ratio;
    sums[kLow] += clip == kClipLow;
    sums[kHigh] += clip == kClipHigh;
    sums[kDual] += clip == kClipDual;
    sums[kWeight] += wt;
    sums[kCapped] += capped;
    sums[kNegLogp] -= logp;
    if (p.a.rollout_logp) {
      const double x = old - static_cast<double>(p.a.rollout_logp[t]);
      sums[kMismatch] += x;
      sums[kMismatchK3] += expm1(x) - x;
    }
  }
#pragma unroll
  for (int s = 0; s < kNumStats; ++s) {
    const double v = BlockSum(sums[s]);
    if (threadIdx.x == 0) w.partial[static_cast<int64_t>(i) * kNumStats + s] = v;
  }
}

// One block: the statistics over all sequences, in sequence order per thread
// stride, then the fixed block tree.
__global__ void StatsKernel(Workspace w, int n, GrpoLossStats* out) {
  double all[kNumStats];
  for (int s = 0; s < kNumStats; ++s) {
    double v = 0.0;
    for (int i = threadIdx.x; i < n; i += kThreads) v += w.partial[static_cast<int64_t>(i) * kNumStats + s];
    all[s] = BlockSum(v);
  }
  if (threadIdx.x != 0) return;
  const double tokens = w.totals[0];
  GrpoLossStats st{};
  st.num_tokens = static_cast<float>(tokens);
  st.num_sequences = static_cast<float>(w.totals[1]);
  if (tokens > 0) {
    const double inv = 1.0 / tokens;
    st.loss = static_cast<float>(all[kPg] + all[kKl]);
    st.pg_loss = static_cast<float>(all[kPg]);
    st.kl_loss = static_cast<float>(all[kKl]);
    st.ratio_mean = static_cast<float>(all[kRatio] * inv);
    st.clip_frac_low = static_cast<float>(all[kLow] * inv);
    st.clip_frac_high = static_cast<float>(all[kHigh] * inv);
    st.clip_frac_dual = static_cast<float>(all[kDual] * inv);
    st.kl_ref_k3_mean = static_cast<float>(all[kKlRef] * inv);
    st.mismatch_log_ratio_mean = static_cast<float>(all[kMismatch] * inv);
    st.mismatch_kl_k3 = static_cast<float>(all[kMismatchK3] * inv);
    st.tis_capped_frac = static_cast<float>(all[kCapped] * inv);
    st.tis_weight_mean = static_cast<float>(all[kWeight] * inv);
    st.neg_logp_mean = static_cast<float>(all[kNegLogp] * inv);
  }
  *out = st;
}

Status ValidateConfig(const GrpoLossConfig& c) {
  if (!(c.clip_low >= 0.0 && c.clip_low < 1.0))
    return Status::InvalidArgument("GrpoLoss: clip_low must be in [0, 1), got " + std::to_string(c.clip_low));
  if (!(c.clip_high >= 0.0) || !std::isfinite(c.clip_high))
    return Status::InvalidArgument("GrpoLoss: clip_high must be a finite value >= 0, got " +
                                   std::to_string(c.clip_high));
  if (!(c.beta >= 0.0) || !std::isfinite(c.beta))
    return Status::InvalidArgument("GrpoLoss: beta must be a finite value >= 0, got " + std::to_string(c.beta));
  if (std::isnan(c.tis_cap)) return Status::InvalidArgument("GrpoLoss: tis_cap is NaN");
  if (!(c.dual_clip == 0.0 || (c.dual_clip > 1.0 && std::isfinite(c.dual_clip))))
    return Status::InvalidArgument("GrpoLoss: dual_clip must be 0 (off) or a finite value > 1, got " +
                                   std::to_string(c.dual_clip));
  if (c.aggregation == GrpoAggregation::kSeqMeanTokenSumNorm && c.max_tokens <= 0)
    return Status::InvalidArgument("GrpoLoss: seq_mean_token_sum_norm needs max_tokens > 0, got " +
                                   std::to_string(c.max_tokens));
  return Status::OK();
}

Status Launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string("GrpoLoss ") + what + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace

size_t GrpoLossWorkspaceBytes(int sequences) {
  if (sequences < 0) return 0;
  return sizeof(double) * (static_cast<size_t>(sequences) * (3 + kNumStats) + 2);
}

Status GrpoLoss(const GrpoLossConfig& config, const GrpoLossArgs& a, void* workspace, size_t workspace_bytes,
                cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(ValidateConfig(config));
  if (a.tokens < 0 || a.sequences < 0 || a.total_tokens < 0 || a.total_sequences < 0)
    return Status::InvalidArgument("GrpoLoss: negative tokens, sequences or totals");
  if (!a.seq_offsets || !a.stats || (a.sequences > 0 && !a.advantages) || (a.tokens > 0 && (!a.logp || !a.dlogp)))
    return Status::InvalidArgument("GrpoLoss: null seq_offsets, advantages, logp, dlogp or stats");
  if (config.beta > 0.0 && !a.ref_logp && a.tokens > 0)
    return Status::InvalidArgument("GrpoLoss: beta > 0 needs ref_logp (the frozen reference's log-probs)");
  const size_t need = GrpoLossWorkspaceBytes(a.sequences);
  if (!workspace || workspace_bytes < need)
    return Status::InvalidArgument("GrpoLoss: workspace of " + std::to_string(workspace_bytes) + " bytes, needs " +
                                   std::to_string(need));
  const Workspace w = Carve(workspace, a.sequences);
  Params p{config, a, config.tis_cap > 0.0 && a.rollout_logp != nullptr, 1.0 - config.clip_low,
           1.0 + config.clip_high};
  if (a.sequences > 0) {
    SequencePassKernel<<<a.sequences, kThreads, 0, stream>>>(p, w);
    GROVE_RETURN_IF_ERROR(Launched("sequence pass"));
  }
  TotalsKernel<<<1, kThreads, 0, stream>>>(w, a.sequences);
  GROVE_RETURN_IF_ERROR(Launched("totals"));
  if (a.sequences > 0) {
    TokenPassKernel<<<a.sequences, kThreads, 0, stream>>>(p, w);
    GROVE_RETURN_IF_ERROR(Launched("token pass"));
  }
  StatsKernel<<<1, kThreads, 0, stream>>>(w, a.sequences, a.stats);
  return Launched("stats");
}

}  // namespace grove::kernels
