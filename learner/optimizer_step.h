// One optimizer update as the learner takes it: measure and clip the global
// gradient norm, skip the update when the gradients are not finite, otherwise
// step AdamW at the scheduled learning rate.
#pragma once

#include <span>

#include "base/result.h"
#include "learner/adamw.h"
#include "learner/lr_schedule.h"

namespace grove::learner {

struct UpdateReport {
  double grad_norm = 0.0;  // before clipping
  double lr = 0.0;         // the rate used (or that would have been)
  bool skipped = false;    // true: a gradient was Inf/NaN; params and state untouched
};

// lr = schedule.At(optimizer.step()), so the first update uses At(0) and a
// resumed optimizer (ImportState) continues the schedule where it stopped.
// max_grad_norm <= 0 disables clipping. grads are scaled in place.
// InvalidArgument for size mismatches (from AdamW::Step).
Result<UpdateReport> ApplyUpdate(AdamW& optimizer, const LrSchedule& schedule, double max_grad_norm,
                                 std::span<float> params, std::span<float> grads);

}  // namespace grove::learner
