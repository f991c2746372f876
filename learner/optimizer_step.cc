#include "learner/optimizer_step.h"

#include <cmath>
#include <string>

namespace grove::learner {

Result<UpdateReport> ApplyUpdate(AdamW& optimizer, const LrSchedule& schedule, double max_grad_norm,
                                 std::span<float> params, std::span<float> grads) {
  if (params.size() != optimizer.num_params() || grads.size() != optimizer.num_params())
    return Status::InvalidArgument("update: " + std::to_string(params.size()) + " params and " +
                                   std::to_string(grads.size()) + " grads for an optimizer of " +
                                   std::to_string(optimizer.num_params()));
  UpdateReport report;
  report.lr = schedule.At(optimizer.step());
  report.grad_norm = ClipGradNorm(grads, max_grad_norm);
  if (!std::isfinite(report.grad_norm)) {
    report.skipped = true;
    return report;
  }
  GROVE_RETURN_IF_ERROR(optimizer.Step(params, grads, report.lr));
  return report;
}

}  // namespace grove::learner
