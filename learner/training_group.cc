#include "learner/training_group.h"

#include <cmath>

namespace grove::learner {
namespace {

Status CheckTokens(capnp::List<int32_t>::Reader tokens, int64_t vocab, const std::string& what,
                   std::vector<int32_t>& out) {
  out.reserve(tokens.size());
  for (int32_t t : tokens) {
    if (t < 0 || t >= vocab)
      return Status::InvalidArgument(what + " has token id " + std::to_string(t) +
                                     " outside the vocabulary of " + std::to_string(vocab));
    out.push_back(t);
  }
  return Status::OK();
}

Status CheckRoutes(capnp::List<uint16_t>::Reader routes, size_t tokens, const GroupShape& s,
                   const std::string& what, std::vector<uint16_t>& out) {
  if (routes.size() == 0) return Status::OK();  // no routing replay for this sequence
  if (tokens == 0) return Status::InvalidArgument(what + " has routes but no routed positions");
  const size_t want = tokens * static_cast<size_t>(s.moe_layers) * s.top_k;
  if (routes.size() != want)
    return Status::InvalidArgument(what + " has " + std::to_string(routes.size()) +
                                   " routed experts, expected " + std::to_string(want));
  out.reserve(want);
  for (uint16_t e : routes) {
    if (e >= s.num_experts)
      return Status::InvalidArgument(what + " routes to expert " + std::to_string(e) + " of " +
                                     std::to_string(s.num_experts));
    out.push_back(e);
  }
  return Status::OK();
}

}  // namespace

Result<TrainingGroup> DecodeTrainingGroup(wire::ScoredGroup::Reader scored, const GroupShape& shape) {
  auto g = scored.getGroup();
  TrainingGroup out;
  out.group_id = g.getGroupId().cStr();
  const std::string where = "group '" + out.group_id + "'";
  if (out.group_id.empty()) return Status::InvalidArgument("scored group without an id");
  out.prompt_id = g.getPrompt().getId();
  out.task = g.getPrompt().getTask().cStr();
  out.reference = g.getPrompt().getReference().cStr();
  out.policy_version = g.getPolicyVersion();
  GROVE_RETURN_IF_ERROR(CheckTokens(g.getPromptTokens(), shape.vocab_size, where + " prompt", out.prompt_tokens));
  if (out.prompt_tokens.empty()) return Status::InvalidArgument(where + " has an empty prompt");
  GROVE_RETURN_IF_ERROR(CheckRoutes(g.getPromptRoutedExperts(), out.prompt_tokens.size(), shape,
                                    where + " prompt", out.prompt_routes));
  auto samples = g.getSamples();
  auto rewards = scored.getRewards();
  if (samples.size() == 0) return Status::InvalidArgument(where + " has no samples");
  if (rewards.size() != samples.size())
    return Status::InvalidArgument(where + " has " + std::to_string(rewards.size()) + " rewards for " +
                                   std::to_string(samples.size()) + " samples");
  for (uint32_t i = 0; i < samples.size(); ++i) {
    auto s = samples[i];
    const std::string sw = where + " sample " + std::to_string(i);
    TrainingSample ts;
    GROVE_RETURN_IF_ERROR(CheckTokens(s.getTokens(), shape.vocab_size, sw, ts.tokens));
    if (ts.tokens.empty()) return Status::InvalidArgument(sw + " has no completion tokens");
    if (static_cast<int64_t>(out.prompt_tokens.size() + ts.tokens.size()) > shape.max_sequence)
      return Status::InvalidArgument(sw + " is longer than the model's maximum sequence of " +
                                     std::to_string(shape.max_sequence));
    if (s.getLogprobs().size() != ts.tokens.size())
      return Status::InvalidArgument(sw + " has " + std::to_string(s.getLogprobs().size()) +
                                     " log-probs for " + std::to_string(ts.tokens.size()) + " tokens");
    for (float lp : s.getLogprobs()) {
      if (!std::isfinite(lp) || lp > 0) return Status::InvalidArgument(sw + " has an invalid log-prob");
      ts.rollout_logprobs.push_back(lp);
    }
    // The last completion token is never fed back, so it has no route.
    GROVE_RETURN_IF_ERROR(CheckRoutes(s.getRoutedExperts(), ts.tokens.size() - 1, shape, sw, ts.routes));
    ts.policy_version = s.getPolicyVersion();
    ts.truncated = s.getFinish() == wire::FinishReason::LENGTH;
    ts.reward = rewards[i].getTotal();
    if (!std::isfinite(ts.reward)) return Status::InvalidArgument(sw + " has a non-finite reward");
    out.samples.push_back(std::move(ts));
  }
  return out;
}

}  // namespace grove::learner
