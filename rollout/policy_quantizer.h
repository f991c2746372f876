// What a rollout worker does to each policy version it receives: holds the
// weights as configured by [rollout] quantize, and in "plan" mode keeps the
// per-expert precision plan (precision_plan.h), remade when the weights have
// moved enough, with its mismatch against full precision measured when made.
//
// [rollout] keys read here:
//   quantize = "none" | "int8" | "int4" | "plan"   ("int8")
//     none: fp32; int8: every quantizable weight int8 per row (the CPU
//     worker's original mode); int4: every FFN weight int4 (group 128),
//     attention and lm_head bf16 (the plan's floor); plan: per-expert mix.
//   plan_bits = 5.0                 budget, average bits/weight of FFN weights
//   plan_sequences = 8              calibration prompts (from the task)
//   plan_max_new_tokens = 32        completion length sampled per prompt
//   plan_every_versions = 0         remake the plan every N versions (0: off)
//   plan_weight_change = 0.05       ... or when ||w - w_plan|| / ||w_plan|| exceeds this (0: off)
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "actors/weight_transfer.h"
#include "base/config.h"
#include "base/result.h"
#include "model/transformer.h"
#include "rollout/precision_format.h"
#include "rollout/precision_plan.h"

namespace grove::rollout {

enum class QuantizeMode { kNone, kInt8, kInt4, kPlan };

struct QuantizeSettings {
  QuantizeMode mode = QuantizeMode::kInt8;
  double plan_bits = 5.0;
  int64_t plan_sequences = 8;
  int64_t plan_max_new_tokens = 32;
  ReplanPolicy replan;
};

// The keys above, for the caller's CheckKeys of the [rollout] table.
const std::vector<std::string_view>& QuantizeKeys();
// Reads them from the [rollout] section; InvalidArgument (naming the file)
// for an unknown mode or a bad value.
Result<QuantizeSettings> ParseQuantizeSettings(const Config& rollout);

// Plan mode's measurements done elsewhere than on a CPU model (a GPU:
// gpu_precision_plan.h's GpuPlanMeasurer), with the CPU path's definitions.
class PlanMeasurer {
 public:
  virtual ~PlanMeasurer() = default;
  // Takes `full` (the version's fp32 weights, layout order) as the
  // full-precision policy of the calls below, and returns the calibration
  // sequences: `prompts` completed by that policy as CalibrationBatch does.
  virtual Result<std::vector<model::ScoreRequest>> Calibrate(std::span<const float> full,
                                                             const std::vector<std::vector<int32_t>>& prompts,
                                                             int64_t max_new_tokens, int32_t stop_token,
                                                             uint64_t seed) = 0;
  // As MeasureUnitErrors.
  virtual Status MeasureUnitErrors(const std::vector<model::ScoreRequest>& calibration,
                                   std::vector<PlanUnit>& units) = 0;
  // As MeasureMismatch, the rollout weights being `choose`'s round trips.
  virtual Result<MismatchReport> MeasureMismatch(const FormatChooser& choose,
                                                 const std::vector<model::ScoreRequest>& calibration) = 0;
  // Where it measures, for logs ("GPU 0").
  virtual std::string where() const = 0;

  // The device path (PolicyQuantizer::FormatsFromDevice), for a measurer on
  // the GPU the weights arrive on. Without it (false), the two calls below
  // are FailedPrecondition.
  virtual bool measures_from_device() const { return false; }
  // As Calibrate from the version's fp32 weights on the measurer's device
  // (layout order, complete when called, unchanged until the plan's
  // MeasureMismatch returns).
  virtual Result<std::vector<model::ScoreRequest>> CalibrateFromDevice(
      const float* device_full, const std::vector<std::vector<int32_t>>& prompts, int64_t max_new_tokens,
      int32_t stop_token, uint64_t seed) {
    (void)device_full, (void)prompts, (void)max_new_tokens, (void)stop_token, (void)seed;
    return Status::FailedPrecondition(where() + " calibrates from host weights only");
  }
  // ||w - w_cal|| / ||w_cal|| (as ReplanTrigger::RelativeChange) of
  // `device_full` (as above) against the weights of the last Calibrate or
  // CalibrateFromDevice, which the measurer holds between plans; computed
  // on the device.
  virtual Result<double> RelativeChangeFromDevice(const float* device_full) {
    (void)device_full;
    return Status::FailedPrecondition(where() + " keeps no device copy of the plan's weights");
  }
};

class PolicyQuantizer {
 public:
  // calibration_prompts: token ids of task prompts (plan mode only; at least
  // one then); stop_token ends their sampled completions.
  PolicyQuantizer(QuantizeSettings settings, std::vector<std::vector<int32_t>> calibration_prompts,
                  int32_t stop_token);

  // Quantizes `flat` (the fp32 weights of `version`, laid out as `tensors`,
  // which must match the model) in place as configured, remaking the plan
  // first when due, and copies the result into the model.
  Status Install(int64_t version, const std::vector<actors::TensorSpec>& tensors, std::vector<float>& flat,
                 model::Model& model);

  // The format of each tensor of `version` (a model of `config`) as
  // configured, remaking the plan first when due, without touching `flat`:
  // what an engine that quantizes on the GPU (GpuGenerator::LoadWeights) is
  // handed. Plan mode calibrates and measures its mismatch on `plan_model`,
  // a CPU model of `config` whose parameters it overwrites (required then,
  // FailedPrecondition if null; other modes ignore it). report() then has
  // the storage bits only (the rounding errors are the device's to know).
  Result<FormatChooser> Formats(int64_t version, const model::ModelConfig& config,
                                const std::vector<actors::TensorSpec>& tensors, std::span<const float> flat,
                                model::Model* plan_model);

  // As Formats from `device_flat`: the version's fp32 weights on the GPU
  // (complete when called, unchanged until this returns; e.g. a CUDA IPC
  // copy). Other modes read no weight values. Plan mode needs a measurer
  // that measures_from_device(), on that GPU (FailedPrecondition otherwise)
  // and reads and keeps no host copy of the weights: the trigger's relative
  // change is computed on the device against the measurer's copy of the
  // plan-time weights, and a plan due is calibrated and measured from
  // device_flat. A plan made here keeps no host copy for the trigger, so a
  // later Formats from host weights remakes the plan (the reverse needs
  // nothing: both paths leave the plan's weights in the measurer).
  Result<FormatChooser> FormatsFromDevice(int64_t version, const model::ModelConfig& config,
                                          const std::vector<actors::TensorSpec>& tensors, const float* device_flat);

  // Failure (plan mode, all three of Install, Formats, FormatsFromDevice):
  // the plan in force, its mismatch, report() and the trigger's plan-time
  // version and weights stay as they were; a new plan takes effect only
  // once made and measured. The measurer (or plan_model) may be left
  // holding other weights than the plan's: the next device-path call then
  // remakes the plan whenever the weight-change rule is on.

  // Plan mode measures with `measurer` from now on (then Formats needs no
  // plan_model); null: on the CPU model again.
  void set_measurer(std::unique_ptr<PlanMeasurer> measurer) {
    measurer_ = std::move(measurer);
    plan_weights_on_measurer_ = false;
  }
  const PlanMeasurer* measurer() const { return measurer_.get(); }

  const QuantizeSettings& settings() const { return settings_; }
  const QuantizationReport& report() const { return report_; }
  // Plan mode, after the first Install: the plan in force, its mismatch on
  // its calibration batch, and what making it cost.
  const std::optional<PrecisionPlan>& plan() const { return plan_; }
  const MismatchReport& mismatch() const { return mismatch_; }
  double plan_seconds() const { return plan_seconds_; }
  int64_t plans_made() const { return plans_made_; }
  // The device path's last ||w - w_plan|| / ||w_plan|| (NaN until one was
  // computed; not computed when a plan was due anyway).
  double last_weight_change() const { return last_weight_change_; }
  // One line for `grove status`.
  std::string Detail() const;

 private:
  // A version's full-precision weights: on the host, or (device path) on
  // the measurer's GPU.
  struct Weights {
    std::span<const float> host;
    const float* device = nullptr;
  };
  // Makes the plan of `w` and measures its mismatch, on `model` or on
  // measurer_ when set (model may then be null), and only then makes it the
  // plan in force (the failure contract above).
  Status MakePlan(int64_t version, const model::ModelConfig& config,
                  const std::vector<actors::TensorSpec>& tensors, Weights w, model::Model* model);
  // Plan mode: whether `w` needs a new plan (the device path computes the
  // weight change on the measurer's device).
  Result<bool> PlanDue(int64_t version, Weights w);
  // The chooser of the configured mode (plan mode: of the plan in force,
  // remade first when due).
  Result<FormatChooser> Choose(int64_t version, const model::ModelConfig& config,
                               const std::vector<actors::TensorSpec>& tensors, Weights w, model::Model* model);

  QuantizeSettings settings_;
  std::vector<std::vector<int32_t>> prompts_;
  int32_t stop_token_;
  std::unique_ptr<PlanMeasurer> measurer_;
  ReplanTrigger trigger_;
  QuantizationReport report_;
  std::optional<PrecisionPlan> plan_;
  std::vector<model::ScoreRequest> calibration_;
  MismatchReport mismatch_;
  double plan_seconds_ = 0;
  int64_t plans_made_ = 0;
  // True while measurer_'s device copy holds the plan in force's weights
  // (set when a plan made with measurer_ took effect, cleared when one is
  // started).
  bool plan_weights_on_measurer_ = false;
  double last_weight_change_ = std::nan("");
};

}  // namespace grove::rollout
