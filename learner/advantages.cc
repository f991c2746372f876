#include "learner/advantages.h"

#include <cmath>
#include <string>

namespace grove::learner {
namespace {

Status CheckGroups(std::span<const float> rewards, std::span<const int64_t> group_sizes) {
  int64_t total = 0;
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    if (group_sizes[g] < 1)
      return Status::InvalidArgument("group " + std::to_string(g) + " has size " +
                                     std::to_string(group_sizes[g]) + " (must be >= 1)");
    total += group_sizes[g];
  }
  if (total != static_cast<int64_t>(rewards.size()))
    return Status::InvalidArgument("group sizes add up to " + std::to_string(total) + " but there are " +
                                   std::to_string(rewards.size()) + " rewards");
  for (size_t i = 0; i < rewards.size(); ++i) {
    if (!std::isfinite(rewards[i]))
      return Status::InvalidArgument("reward " + std::to_string(i) + " is not finite");
  }
  return Status::OK();
}

}  // namespace

Result<std::vector<float>> GroupAdvantages(std::span<const float> rewards,
                                           std::span<const int64_t> group_sizes,
                                           const AdvantageOptions& options) {
  GROVE_RETURN_IF_ERROR(CheckGroups(rewards, group_sizes));
  if (!(options.eps >= 0.0) || !std::isfinite(options.eps))
    return Status::InvalidArgument("advantage eps must be a finite value >= 0");
  std::vector<float> out(rewards.size());
  size_t begin = 0;
  for (int64_t size : group_sizes) {
    const size_t end = begin + static_cast<size_t>(size);
    double sum = 0.0;
    for (size_t i = begin; i < end; ++i) sum += rewards[i];
    const double mean = sum / static_cast<double>(size);
    double scale = 1.0;
    if (options.scale_by_std) {
      // Two-pass variance: no cancellation when rewards are large and close.
      double sq = 0.0;
      for (size_t i = begin; i < end; ++i) sq += (rewards[i] - mean) * (rewards[i] - mean);
      const double denom = options.std_kind == StdKind::kSample ? static_cast<double>(size - 1)
                                                                 : static_cast<double>(size);
      const double std_dev = denom > 0.0 ? std::sqrt(sq / denom) : 0.0;
      // std + eps == 0 only when eps == 0 and the group is flat; then every
      // r - mean is 0 and the advantage is 0, not 0/0.
      scale = std_dev + options.eps > 0.0 ? 1.0 / (std_dev + options.eps) : 0.0;
    }
    for (size_t i = begin; i < end; ++i) out[i] = static_cast<float>((rewards[i] - mean) * scale);
    begin = end;
  }
  return out;
}

Result<std::vector<bool>> GroupsWithEqualRewards(std::span<const float> rewards,
                                                 std::span<const int64_t> group_sizes,
                                                 double tolerance) {
  GROVE_RETURN_IF_ERROR(CheckGroups(rewards, group_sizes));
  if (!(tolerance >= 0.0)) return Status::InvalidArgument("tolerance must be >= 0");
  std::vector<bool> equal(group_sizes.size());
  size_t begin = 0;
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    const size_t end = begin + static_cast<size_t>(group_sizes[g]);
    bool all = true;
    for (size_t i = begin + 1; i < end && all; ++i)
      all = std::fabs(static_cast<double>(rewards[i]) - rewards[begin]) <= tolerance;
    equal[g] = all;
    begin = end;
  }
  return equal;
}

}  // namespace grove::learner
