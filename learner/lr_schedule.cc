#include "learner/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

namespace grove::learner {

Result<LrDecay> ParseLrDecay(std::string_view name) {
  if (name == "constant") return LrDecay::kConstant;
  if (name == "cosine") return LrDecay::kCosine;
  return Status::InvalidArgument("unknown learning-rate decay '" + std::string(name) +
                                 "' (known: constant, cosine)");
}

Result<LrSchedule> LrSchedule::Create(const LrScheduleOptions& o) {
  if (!(o.peak_lr > 0.0) || !std::isfinite(o.peak_lr))
    return Status::InvalidArgument("learning rate must be a finite value > 0, got " + std::to_string(o.peak_lr));
  if (o.warmup_steps < 0)
    return Status::InvalidArgument("warmup_steps must be >= 0, got " + std::to_string(o.warmup_steps));
  if (o.decay == LrDecay::kCosine) {
    if (o.total_steps <= o.warmup_steps)
      return Status::InvalidArgument("cosine decay needs total_steps (" + std::to_string(o.total_steps) +
                                     ") > warmup_steps (" + std::to_string(o.warmup_steps) + ")");
    if (!(o.min_lr >= 0.0 && o.min_lr <= o.peak_lr))
      return Status::InvalidArgument("min_lr must be in [0, lr], got " + std::to_string(o.min_lr));
  }
  return LrSchedule(o);
}

double LrSchedule::At(int64_t step) const {
  const LrScheduleOptions& o = options_;
  step = std::max<int64_t>(step, 0);
  if (step < o.warmup_steps)
    return o.peak_lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  if (o.decay == LrDecay::kConstant) return o.peak_lr;
  const double progress = std::min(
      1.0, static_cast<double>(step - o.warmup_steps) / static_cast<double>(o.total_steps - o.warmup_steps));
  return o.min_lr + (o.peak_lr - o.min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace grove::learner
