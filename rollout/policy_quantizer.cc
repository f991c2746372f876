#include "rollout/policy_quantizer.h"

#include <chrono>
#include <cmath>
#include <cstdio>

#include <glog/logging.h>

namespace grove::rollout {
namespace {

std::string Fixed(double v, int digits) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// Every FFN weight in `f`, attention and lm_head bf16 (the plan's format
// map with every unit in `f`).
FormatChooser UniformFfn(const model::ModelConfig& c, PrecisionFormat f) {
  PrecisionPlan p;
  p.units = PlanUnits(c);
  for (PlanUnit& u : p.units) u.format = f;
  return p.Chooser();
}

std::string Scientific(double v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.2e", v);
  return buf;
}

}  // namespace

const std::vector<std::string_view>& QuantizeKeys() {
  static const std::vector<std::string_view> keys = {"quantize",           "plan_bits",           "plan_sequences",
                                                     "plan_max_new_tokens", "plan_every_versions", "plan_weight_change"};
  return keys;
}

Result<QuantizeSettings> ParseQuantizeSettings(const Config& s) {
  QuantizeSettings o;
  GROVE_ASSIGN_OR_RETURN(std::string mode, s.String("quantize", "int8"));
  if (mode == "none") o.mode = QuantizeMode::kNone;
  else if (mode == "int8") o.mode = QuantizeMode::kInt8;
  else if (mode == "int4") o.mode = QuantizeMode::kInt4;
  else if (mode == "plan") o.mode = QuantizeMode::kPlan;
  else
    return Status::InvalidArgument(s.source() + ": rollout.quantize \"" + mode +
                                   "\" is not one of \"none\", \"int8\", \"int4\", \"plan\"");
  GROVE_ASSIGN_OR_RETURN(o.plan_bits, s.Double("plan_bits", o.plan_bits));
  GROVE_ASSIGN_OR_RETURN(o.plan_sequences, s.Int("plan_sequences", o.plan_sequences));
  GROVE_ASSIGN_OR_RETURN(o.plan_max_new_tokens, s.Int("plan_max_new_tokens", o.plan_max_new_tokens));
  GROVE_ASSIGN_OR_RETURN(o.replan.every_versions, s.Int("plan_every_versions", o.replan.every_versions));
  GROVE_ASSIGN_OR_RETURN(o.replan.max_rel_change, s.Double("plan_weight_change", o.replan.max_rel_change));
  // int4 with 128-column groups costs at least 4.25 bits; the planner says
  // exactly how much a given model needs when it makes the plan.
  if (!(o.plan_bits >= 4.25 && o.plan_bits <= 16))
    return Status::InvalidArgument(s.source() + ": rollout.plan_bits must be in [4.25, 16] (int4 to bf16)");
  if (o.plan_sequences < 1 || o.plan_sequences > 1024)
    return Status::InvalidArgument(s.source() + ": rollout.plan_sequences must be in [1, 1024]");
  if (o.plan_max_new_tokens < 1)
    return Status::InvalidArgument(s.source() + ": rollout.plan_max_new_tokens must be >= 1");
  if (o.replan.every_versions < 0)
    return Status::InvalidArgument(s.source() + ": rollout.plan_every_versions must be >= 0");
  if (!(o.replan.max_rel_change >= 0))
    return Status::InvalidArgument(s.source() + ": rollout.plan_weight_change must be >= 0");
  return o;
}

PolicyQuantizer::PolicyQuantizer(QuantizeSettings settings, std::vector<std::vector<int32_t>> calibration_prompts,
                                 int32_t stop_token)
    : settings_(settings), prompts_(std::move(calibration_prompts)), stop_token_(stop_token),
      trigger_(settings.replan) {}

Status PolicyQuantizer::MakePlan(int64_t version, const model::ModelConfig& config,
                                 const std::vector<actors::TensorSpec>& tensors, Weights w, model::Model* model) {
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t seed = static_cast<uint64_t>(version) * 0x9e3779b97f4a7c15ull + 1;
  // The measurer's copy is about to hold this version's weights; it holds
  // the plan's again only once this plan takes effect.
  plan_weights_on_measurer_ = false;
  std::vector<PlanUnit> units;
  std::vector<model::ScoreRequest> calibration;
  if (measurer_) {
    if (w.device) {
      GROVE_ASSIGN_OR_RETURN(calibration, measurer_->CalibrateFromDevice(w.device, prompts_,
                                                                         settings_.plan_max_new_tokens, stop_token_,
                                                                         seed));
    } else {
      GROVE_ASSIGN_OR_RETURN(calibration, measurer_->Calibrate(w.host, prompts_, settings_.plan_max_new_tokens,
                                                               stop_token_, seed));
    }
    units = PlanUnits(config);
    GROVE_RETURN_IF_ERROR(measurer_->MeasureUnitErrors(calibration, units));
  } else {
    if (w.device) return Status::FailedPrecondition("plan mode from device weights needs a GPU measurer");
    std::copy(w.host.begin(), w.host.end(), model->params().begin());
    GROVE_ASSIGN_OR_RETURN(calibration,
                           CalibrationBatch(*model, prompts_, settings_.plan_max_new_tokens, stop_token_, seed));
    units = PlanUnits(model->config());
    GROVE_RETURN_IF_ERROR(MeasureUnitErrors(*model, calibration, units));
  }
  GROVE_RETURN_IF_ERROR(ChooseFormats(settings_.plan_bits, units));
  PrecisionPlan plan{settings_.plan_bits, std::move(units)};
  const double plan_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Its mismatch against the full weights.
  std::string where = "the CPU";
  MismatchReport mismatch;
  if (measurer_) {
    GROVE_ASSIGN_OR_RETURN(mismatch, measurer_->MeasureMismatch(plan.Chooser(), calibration));
    where = measurer_->where();
  } else {
    std::vector<float> planned(w.host.begin(), w.host.end());
    QuantizeInPlace(tensors, planned, plan.Chooser());
    std::copy(planned.begin(), planned.end(), model->params().begin());
    GROVE_ASSIGN_OR_RETURN(mismatch, MeasureMismatch(*model, w.host, calibration));
  }
  // Made and measured: it takes effect.
  plan_ = std::move(plan);
  calibration_ = std::move(calibration);
  mismatch_ = mismatch;
  if (w.device) trigger_.Planned(version);
  else trigger_.Planned(version, w.host);
  plan_weights_on_measurer_ = measurer_ != nullptr;
  plan_seconds_ = plan_seconds;
  ++plans_made_;
  const QuantizationReport q = StorageReport(tensors, plan_->Chooser());
  LOG(INFO) << "precision plan for version " << version << ": " << plan_->Summary() << " (" << Fixed(plan_seconds_, 2)
            << " s on " << where << (w.device ? " from device weights" : "") << ", " << calibration_.size()
            << " sequences); model " << Fixed(q.bits_per_weight, 2) << " b/w; vs full precision: KL "
            << mismatch_.mean_kl << " per token, routes differ on " << Fixed(100 * mismatch_.routes_differ, 1)
            << "% of " << mismatch_.tokens << " tokens";
  return Status::OK();
}

Result<bool> PolicyQuantizer::PlanDue(int64_t version, Weights w) {
  if (!w.device) return trigger_.Due(version, w.host);
  if (trigger_.DueByCount(version)) return true;
  const double max_change = trigger_.policy().max_rel_change;
  if (!(max_change > 0)) return false;
  // Without the plan's weights on the device there is nothing to compare
  // with: a failed plan left the measurer other weights, or the plan was
  // made elsewhere.
  if (!plan_weights_on_measurer_) return true;
  GROVE_ASSIGN_OR_RETURN(last_weight_change_, measurer_->RelativeChangeFromDevice(w.device));
  return last_weight_change_ > max_change;
}

Result<FormatChooser> PolicyQuantizer::Choose(int64_t version, const model::ModelConfig& config,
                                               const std::vector<actors::TensorSpec>& tensors, Weights w,
                                               model::Model* model) {
  switch (settings_.mode) {
    case QuantizeMode::kNone:
      return FormatChooser([](const actors::TensorSpec&) { return std::optional<PrecisionFormat>(); });
    case QuantizeMode::kInt8:
      return FormatChooser([](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
        return IsQuantizedTensor(t) ? std::optional(PrecisionFormat::kInt8) : std::nullopt;
      });
    case QuantizeMode::kInt4:
      return UniformFfn(config, PrecisionFormat::kInt4);
    case QuantizeMode::kPlan: {
      if (prompts_.empty()) return Status::FailedPrecondition("plan mode needs calibration prompts");
      if (w.device && !(measurer_ && measurer_->measures_from_device()))
        return Status::FailedPrecondition("plan mode from device weights needs a measurer on that GPU");
      if (model == nullptr && !measurer_)
        return Status::FailedPrecondition("plan mode needs a CPU model or a measurer to calibrate on");
      GROVE_ASSIGN_OR_RETURN(bool due, PlanDue(version, w));
      if (due) GROVE_RETURN_IF_ERROR(MakePlan(version, config, tensors, w, model));
      return plan_->Chooser();
    }
  }
  return Status::Internal("unknown quantize mode");
}

Status PolicyQuantizer::Install(int64_t version, const std::vector<actors::TensorSpec>& tensors,
                                std::vector<float>& flat, model::Model& model) {
  if (flat.size() != model.params().size())
    return Status::InvalidArgument("weights of " + std::to_string(flat.size()) + " values for a model of " +
                                   std::to_string(model.params().size()));
  GROVE_ASSIGN_OR_RETURN(FormatChooser choose, Choose(version, model.config(), tensors, Weights{flat}, &model));
  report_ = QuantizeInPlace(tensors, flat, choose);
  std::copy(flat.begin(), flat.end(), model.params().begin());
  return Status::OK();
}

Result<FormatChooser> PolicyQuantizer::Formats(int64_t version, const model::ModelConfig& config,
                                               const std::vector<actors::TensorSpec>& tensors,
                                               std::span<const float> flat, model::Model* plan_model) {
  GROVE_ASSIGN_OR_RETURN(FormatChooser choose, Choose(version, config, tensors, Weights{flat}, plan_model));
  report_ = StorageReport(tensors, choose);
  return choose;
}

Result<FormatChooser> PolicyQuantizer::FormatsFromDevice(int64_t version, const model::ModelConfig& config,
                                                         const std::vector<actors::TensorSpec>& tensors,
                                                         const float* device_flat) {
  if (device_flat == nullptr) return Status::InvalidArgument("FormatsFromDevice: null weights");
  GROVE_ASSIGN_OR_RETURN(FormatChooser choose,
                         Choose(version, config, tensors, Weights{{}, device_flat}, nullptr));
  report_ = StorageReport(tensors, choose);
  return choose;
}

std::string PolicyQuantizer::Detail() const {
  const std::string model_bits = Fixed(report_.bits_per_weight, 2) + " b/w model";
  switch (settings_.mode) {
    case QuantizeMode::kNone: return "fp32 weights";
    case QuantizeMode::kInt8:
      return "int8 per-channel: " + std::to_string(report_.tensors_quantized) + " tensors, " + model_bits;
    case QuantizeMode::kInt4: return "int4 g128 FFN, bf16 attention: " + model_bits;
    case QuantizeMode::kPlan:
      if (!plan_) return "plan: none yet";
      return plan_->Summary() + " (" + model_bits + "); KL " + Scientific(mismatch_.mean_kl) + "/tok, routes differ " +
             Fixed(100 * mismatch_.routes_differ, 1) + "%";
  }
  return "";
}

}  // namespace grove::rollout
