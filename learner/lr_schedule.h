// Learning-rate schedule: linear warm-up, then constant or cosine decay to a
// floor.
//
// Steps count from 0: At(k) is the rate for the (k+1)-th optimizer step.
//   k < warmup_steps:        peak * (k + 1) / warmup_steps   (the first step
//                            already moves; the last warm-up step is at peak)
//   constant, after warm-up: peak
//   cosine,   after warm-up: floor + (peak - floor) * (1 + cos(pi * p)) / 2,
//                            p = (k - warmup) / (total_steps - warmup), capped
//                            at 1, so the rate stays at the floor after
//                            total_steps.
#pragma once

#include <cstdint>
#include <string_view>

#include "base/result.h"

namespace grove::learner {

enum class LrDecay { kConstant, kCosine };

// "constant" | "cosine".
Result<LrDecay> ParseLrDecay(std::string_view name);

struct LrScheduleOptions {
  double peak_lr = 1e-6;
  int64_t warmup_steps = 0;
  LrDecay decay = LrDecay::kConstant;
  int64_t total_steps = 0;  // cosine only: > warmup_steps
  double min_lr = 0.0;      // cosine only: the floor, in [0, peak_lr]
};

class LrSchedule {
 public:
  // InvalidArgument for peak_lr <= 0, warmup_steps < 0, and for cosine
  // total_steps <= warmup_steps or min_lr outside [0, peak_lr].
  static Result<LrSchedule> Create(const LrScheduleOptions& options);

  // Rate for step k; k < 0 is treated as 0.
  double At(int64_t step) const;
  const LrScheduleOptions& options() const { return options_; }

 private:
  explicit LrSchedule(const LrScheduleOptions& o) : options_(o) {}
  LrScheduleOptions options_;
};

}  // namespace grove::learner
