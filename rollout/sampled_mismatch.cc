#include "rollout/sampled_mismatch.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "rollout/precision_plan.h"

namespace grove::rollout {

Result<std::vector<model::ScoreRequest>> ScoreRequestsFor(const std::vector<std::vector<int32_t>>& prompts,
                                                          const std::vector<model::Completion<float>>& completions) {
  if (prompts.size() != completions.size())
    return Status::InvalidArgument(std::to_string(prompts.size()) + " prompts for " +
                                   std::to_string(completions.size()) + " completions");
  std::vector<model::ScoreRequest> reqs;
  reqs.reserve(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty() || completions[i].tokens.empty())
      return Status::InvalidArgument("sequence " + std::to_string(i) + " has an empty prompt or completion");
    model::ScoreRequest r;
    r.tokens = prompts[i];
    r.tokens.insert(r.tokens.end(), completions[i].tokens.begin(), completions[i].tokens.end());
    r.score_from = static_cast<int64_t>(prompts[i].size());
    reqs.push_back(std::move(r));
  }
  return reqs;
}

Result<SampledMismatch> CompareSampledTokens(const std::vector<std::vector<int32_t>>& prompts,
                                             const std::vector<model::Completion<float>>& completions,
                                             const model::ScoreResult<float>& learner, int64_t moe_layers,
                                             int64_t top_k) {
  if (learner.logprobs.size() != completions.size() || prompts.size() != completions.size())
    return Status::InvalidArgument("the learner scored " + std::to_string(learner.logprobs.size()) +
                                   " sequences, the rollout sampled " + std::to_string(completions.size()));
  const size_t row = static_cast<size_t>(moe_layers * top_k);
  const bool routes = row > 0 && learner.routes.size() == completions.size();
  SampledMismatch m;
  double sum = 0, sum_sq = 0;
  int64_t differ = 0;
  for (size_t i = 0; i < completions.size(); ++i) {
    const model::Completion<float>& c = completions[i];
    const size_t n = c.tokens.size(), p = prompts[i].size();
    if (c.logprobs.size() != n || learner.logprobs[i].size() != n)
      return Status::InvalidArgument("sequence " + std::to_string(i) + ": " + std::to_string(n) + " tokens, " +
                                     std::to_string(c.logprobs.size()) + " rollout and " +
                                     std::to_string(learner.logprobs[i].size()) + " learner log-probs");
    // Completion token j was sampled from input row p - 1 + j.
    const bool have_routes = routes && c.routes.size() >= (p + n - 1) * row &&
                             learner.routes[i].size() >= (p + n - 1) * row;
    for (size_t j = 0; j < n; ++j) {
      const double d = static_cast<double>(c.logprobs[j]) - static_cast<double>(learner.logprobs[i][j]);
      sum += d;
      sum_sq += d * d;
      m.max_abs_diff = std::max(m.max_abs_diff, std::fabs(d));
      if (have_routes) {
        const size_t at = (p - 1 + j) * row;
        differ += RouteSetsDiffer(c.routes.data() + at, learner.routes[i].data() + at, moe_layers, top_k);
      }
    }
    m.tokens += static_cast<int64_t>(n);
  }
  if (m.tokens > 0) {
    m.mean_diff = sum / static_cast<double>(m.tokens);
    m.mean_sq_diff = sum_sq / static_cast<double>(m.tokens);
    m.routes_differ = static_cast<double>(differ) / static_cast<double>(m.tokens);
  }
  return m;
}

void Accumulate(const SampledMismatch& b, SampledMismatch& t) {
  const double n = static_cast<double>(t.tokens + b.tokens);
  if (n == 0) return;
  const double wt = static_cast<double>(t.tokens) / n, wb = static_cast<double>(b.tokens) / n;
  t.mean_diff = wt * t.mean_diff + wb * b.mean_diff;
  t.mean_sq_diff = wt * t.mean_sq_diff + wb * b.mean_sq_diff;
  t.routes_differ = wt * t.routes_differ + wb * b.routes_differ;
  t.max_abs_diff = std::max(t.max_abs_diff, b.max_abs_diff);
  t.tokens += b.tokens;
}

}  // namespace grove::rollout
