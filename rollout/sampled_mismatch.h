// How far a rollout engine's record of its samples is from the learner's
// view of the same tokens (issue 9, "staying on-policy"): the learner scores
// each prompt + completion at full precision (model::Model or
// model::GpuTransformer Score) and its log-probs and routes are held against
// the ones the engine recorded while sampling (model::Completion).
//
// Over the sampled tokens t (one per completion token), d_t = rollout
// log-prob - learner log-prob:
//   mean_diff    = mean d_t: the sampled-token (k1) estimate of
//                  KL(rollout || learner), since the tokens come from the rollout
//   mean_sq_diff = mean d_t^2 (twice the k2 estimate; >= 0, low variance)
//   routes_differ: share of those tokens whose input row's routed-expert set
//                  differs in at least one MoE layer (RouteSetsDiffer).
#pragma once

#include <cstdint>
#include <vector>

#include "base/result.h"
#include "model/transformer.h"

namespace grove::rollout {

struct SampledMismatch {
  int64_t tokens = 0;
  double mean_diff = 0;
  double mean_sq_diff = 0;
  double max_abs_diff = 0;
  double routes_differ = 0;  // 0 when either side has no routes
};

// One ScoreRequest per completion (prompts[i] + completions[i].tokens,
// scored from the prompt's end). InvalidArgument for mismatched sizes or an
// empty completion.
Result<std::vector<model::ScoreRequest>> ScoreRequestsFor(const std::vector<std::vector<int32_t>>& prompts,
                                                          const std::vector<model::Completion<float>>& completions);

// `learner` is the Score of ScoreRequestsFor(prompts, completions).
// InvalidArgument when its shapes do not match the completions'.
Result<SampledMismatch> CompareSampledTokens(const std::vector<std::vector<int32_t>>& prompts,
                                             const std::vector<model::Completion<float>>& completions,
                                             const model::ScoreResult<float>& learner, int64_t moe_layers,
                                             int64_t top_k);

// Sums another batch's figures into `total` (token-weighted).
void Accumulate(const SampledMismatch& batch, SampledMismatch& total);

}  // namespace grove::rollout
