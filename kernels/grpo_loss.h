// The GRPO policy loss of learner/grpo_loss.h on the device: the same loss,
// gradient d loss / d logp and statistics (see that header for the math:
// token or sequence ratio, clip_low/high, dual clip, k3 KL against ref_logp
// with coefficient beta, truncated importance sampling with rollout_logp,
// the three aggregations, and total N/T for micro-batches). Arithmetic in
// double on the device, reductions in a fixed order (deterministic); results
// rounded to fp32. A few kernel launches, no host sync.
//
// The host checks the config and the sizes; what it cannot check without a
// sync is the caller's contract: seq_offsets[0] = 0, non-decreasing,
// seq_offsets[sequences] = tokens, finite inputs on counted tokens (a NaN
// propagates to the outputs instead of the CPU's InvalidArgument).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

enum class GrpoRatioLevel { kToken, kSequence };
enum class GrpoAggregation { kSeqMeanTokenMean, kTokenMean, kSeqMeanTokenSumNorm };

// The fields of learner::PolicyLossConfig, same meaning and validity rules.
struct GrpoLossConfig {
  GrpoRatioLevel ratio_level = GrpoRatioLevel::kToken;
  double clip_low = 0.2;
  double clip_high = 0.2;
  double beta = 0.0;
  GrpoAggregation aggregation = GrpoAggregation::kSeqMeanTokenMean;
  int64_t max_tokens = 0;  // > 0 for kSeqMeanTokenSumNorm
  double tis_cap = 0.0;    // <= 0: no TIS
  double dual_clip = 0.0;  // 0 or > 1
};

// learner::PolicyLossStats in fp32 plus the loss, written on the device for
// the caller to copy back (one cudaMemcpyAsync of sizeof(GrpoLossStats)).
struct GrpoLossStats {
  float loss;  // pg_loss + kl_loss
  float num_sequences;  // sequences with a counted token, this batch (exact up to 2^24)
  float num_tokens;     // counted tokens, this batch
  float pg_loss;
  float kl_loss;
  float ratio_mean;
  float clip_frac_low;
  float clip_frac_high;
  float clip_frac_dual;
  float kl_ref_k3_mean;
  float mismatch_log_ratio_mean;
  float mismatch_kl_k3;
  float tis_capped_frac;
  float tis_weight_mean;
  float neg_logp_mean;
};

struct GrpoLossArgs {
  const int32_t* seq_offsets = nullptr;  // [sequences + 1], device
  const float* logp = nullptr;           // [tokens] current policy
  const float* old_logp = nullptr;       // [tokens]; null: on-policy (taken equal to logp)
  const float* ref_logp = nullptr;       // [tokens]; null allowed only when beta == 0
  const float* rollout_logp = nullptr;   // [tokens]; null: no TIS, no mismatch stats
  const uint8_t* mask = nullptr;         // [tokens]; 1 counts; null: all count
  const float* advantages = nullptr;     // [sequences]
  int tokens = 0;
  int sequences = 0;
  // The whole batch's T and N when this is one micro-batch of it; 0: this
  // batch's own (counted on the device).
  int64_t total_tokens = 0;
  int64_t total_sequences = 0;
  float* dlogp = nullptr;          // [tokens] out; 0 on tokens that do not count
  GrpoLossStats* stats = nullptr;  // out, device
};

size_t GrpoLossWorkspaceBytes(int sequences);

// InvalidArgument for a bad config (the CPU's rules), negative sizes, null
// required pointers, or beta > 0 without ref_logp.
Status GrpoLoss(const GrpoLossConfig& config, const GrpoLossArgs& args, void* workspace, size_t workspace_bytes,
                cudaStream_t stream);

}  // namespace grove::kernels
