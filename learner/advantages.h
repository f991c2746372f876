// Group-relative advantages for GRPO and its variants, and the group filter of
// DAPO's dynamic sampling.
//
// Rewards arrive flat, group after group; group_sizes[g] says how many
// completions group g holds (groups may differ in size, e.g. after a verifier
// dropped a sample). Every completion of a group shares the group's baseline,
// the group's mean reward, so the advantage says "better or worse than the
// other answers to the same prompt".
//
//   GRPO (DeepSeekMath, Shao et al. 2024):   A_i = (r_i - mean) / (std + eps)
//   Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"):
//                                            A_i = r_i - mean   (no std: dividing
//     by the std up-weights prompts that are almost always right or wrong)
//
// Std convention: kSample (divide by G - 1) is the default because it is what
// the reference implementations people compare runs with use (TRL and verl call
// torch.std, which is unbiased), so a reward curve here means the same as there.
// kPopulation (divide by G) makes each group's advantages have exactly unit
// mean square; pick it when that matters more. A group of one completion has
// no spread: its advantage is 0 under either convention.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"

namespace grove::learner {

enum class StdKind { kSample, kPopulation };

struct AdvantageOptions {
  // false: Dr. GRPO (r - mean only).
  bool scale_by_std = true;
  StdKind std_kind = StdKind::kSample;
  // Added to the std before dividing, so an all-equal group gives 0, not NaN.
  double eps = 1e-6;
};

// One advantage per reward, in the same order. InvalidArgument when the group
// sizes do not add up to rewards.size(), a size is < 1, a reward is not finite,
// or eps < 0.
Result<std::vector<float>> GroupAdvantages(std::span<const float> rewards,
                                           std::span<const int64_t> group_sizes,
                                           const AdvantageOptions& options);

// DAPO's dynamic sampling (Yu et al. 2025): a group whose rewards are all equal
// (all right or all wrong) has zero advantage everywhere and so no gradient; it
// only dilutes the batch. Returns, per group, true when every reward is within
// `tolerance` of the group's first reward (such a group should be dropped and
// the batch refilled). Same input checks as GroupAdvantages; tolerance >= 0.
// Pass the correctness scores, not rewards after overlong shaping: DAPO filters
// on accuracy 0 or 1, and a length penalty would make a flat group look mixed.
Result<std::vector<bool>> GroupsWithEqualRewards(std::span<const float> rewards,
                                                 std::span<const int64_t> group_sizes,
                                                 double tolerance = 0.0);

}  // namespace grove::learner
