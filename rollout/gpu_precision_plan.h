// The precision plan's measurements (precision_plan.h) on a GPU: the same
// definitions as the CPU's MeasureUnitErrors (local error of each unit in
// each format, then ScaleByLayerSensitivity's KL scaling) and
// MeasureMismatch (exact KL from the full vocabulary, routes), computed on a
// model::GpuTransformer that holds the full-precision weights.
//
// How: one Score(keep_for_backward) of the calibration batch gives each
// layer's FFN inputs (bf16, the learner's forward) and routes; each unit's
// FFN is then run in fp32 (cuBLAS SGEMM) on its rows with the fp32 master
// weights and with their round trips through each format (kernels
// bit-identical to RoundTripInPlace), and sum_t g_t^2 ||FFN_f - FFN||^2 is
// reduced per unit on the device. Only the inputs differ from the CPU's:
// the GPU forward's bf16 residual stream (and a route where a near-tie
// flips). The KL scaling rounds one layer's units to int4 in the device's
// master copy, rescored, with lm_head applied to the final hidden rows of
// both forwards and KL(q || p) reduced per row over the whole vocabulary.
// The model's weights are restored on return (master and bf16 mirror).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "actors/device_buffer.h"
#include "base/result.h"
#include "model/gpu_transformer.h"
#include "model/transformer.h"
#include "rollout/precision_format.h"
#include "rollout/policy_quantizer.h"
#include "rollout/precision_plan.h"

namespace grove::rollout {

// Seconds spent per phase, for benchmarks and logs.
struct GpuPlanTiming {
  double forward_s = 0;  // the kept Score of the calibration batch
  double local_s = 0;    // the units' local errors, all formats
  double kl_s = 0;       // the per-layer KL scaling (one Score per layer)
};

// w [rows, cols] (fp32, on the device) := its round trip through f, bit for
// bit what RoundTripInPlace computes; on `stream` (a cudaStream_t).
void RoundTripOnDevice(PrecisionFormat f, float* w, int64_t rows, int64_t cols, void* stream);

// As MeasureUnitErrors on the CPU model. The weights `model` holds are taken
// as full precision (restored on return; a kept forward is replaced).
Status MeasureUnitErrorsOnGpu(model::GpuTransformer& model, const std::vector<model::ScoreRequest>& calibration,
                              std::vector<PlanUnit>& units, GpuPlanTiming* timing = nullptr);
// Its two halves: the local errors only, and the scaling (`units` holding
// local errors), for tests against the CPU's.
Status MeasureLocalUnitErrorsOnGpu(model::GpuTransformer& model, const std::vector<model::ScoreRequest>& calibration,
                                   std::vector<PlanUnit>& units);
Status ScaleByLayerSensitivityOnGpu(model::GpuTransformer& model,
                                    const std::vector<model::ScoreRequest>& calibration,
                                    std::vector<PlanUnit>& units);

// As MeasureMismatch: `model` holds the full-precision weights; the
// rollout's are their round trips through `choose` (each planned tensor's
// format; bf16 and unplanned tensors as the bf16 mirror has them, which is
// what bf16 is). The model's weights are restored on return: from a device
// copy of the rounded tensors, or where the device lacks the room for it,
// by copying back the same weights from `device_full` (on the model's
// device) or else uploading `full` (on the host); neither: no fallback,
// ResourceExhausted.
Result<MismatchReport> MeasureMismatchOnGpu(model::GpuTransformer& model, const FormatChooser& choose,
                                            const std::vector<model::ScoreRequest>& sequences,
                                            std::span<const float> full = {}, const float* device_full = nullptr);

// ||w - ref|| / ||ref|| of n fp32 values on the model's device (w, ref),
// as ReplanTrigger::RelativeChange computes it on the host (sums in double;
// deterministic: gpu_precision_plan_kernels.h), on the model's stream.
// `scratch`: kRelativeChangeBlocks * 2 + 2 doubles on the device.
Result<double> RelativeChangeOnGpu(model::GpuTransformer& model, const float* w, const float* ref, int64_t n,
                                   double* scratch);

// PolicyQuantizer's plan mode measured on a GPU: a frozen GpuTransformer
// (fp32 master + bf16 mirror of the model: ~6 bytes per parameter on the
// device) holds each version's full-precision weights; the calibration
// completions come from `sampler` (a rollout engine: GpuGenerator with the
// full weights loaded in bf16), handed the full weights and the prompts.
// Between plans the model's fp32 master holds the last Calibrate's weights
// (every measurement restores them; nothing else writes them), which is
// what RelativeChangeFromDevice compares against.
class GpuPlanMeasurer : public PlanMeasurer {
 public:
  // device_full: the full weights on the measurer's device (its model's fp32
  // master, loaded and synchronized: e.g. GpuGenerator::LoadWeightsFromDevice
  // them); host_full: the same on the host when the version came from the
  // host, empty when it came from the device.
  using Sampler = std::function<Result<std::vector<model::Completion<float>>>(
      const float* device_full, std::span<const float> host_full, const std::vector<std::vector<int32_t>>& prompts,
      const model::SamplingOptions&)>;
  static Result<std::unique_ptr<GpuPlanMeasurer>> Create(const model::ModelConfig& config, int device,
                                                         Sampler sampler);
  Result<std::vector<model::ScoreRequest>> Calibrate(std::span<const float> full,
                                                     const std::vector<std::vector<int32_t>>& prompts,
                                                     int64_t max_new_tokens, int32_t stop_token,
                                                     uint64_t seed) override;
  bool measures_from_device() const override { return true; }
  Result<std::vector<model::ScoreRequest>> CalibrateFromDevice(const float* device_full,
                                                               const std::vector<std::vector<int32_t>>& prompts,
                                                               int64_t max_new_tokens, int32_t stop_token,
                                                               uint64_t seed) override;
  Result<double> RelativeChangeFromDevice(const float* device_full) override;
  Status MeasureUnitErrors(const std::vector<model::ScoreRequest>& calibration,
                           std::vector<PlanUnit>& units) override;
  Result<MismatchReport> MeasureMismatch(const FormatChooser& choose,
                                         const std::vector<model::ScoreRequest>& calibration) override;
  std::string where() const override { return "GPU " + std::to_string(model_->device()); }

  // Of the last plan: its calibration sampling and measurement phases.
  double sample_seconds() const { return sample_s_; }
  const GpuPlanTiming& timing() const { return timing_; }
  model::GpuTransformer& model() { return *model_; }

 private:
  GpuPlanMeasurer(std::unique_ptr<model::GpuTransformer> m, Sampler s)
      : model_(std::move(m)), sampler_(std::move(s)) {}
  std::unique_ptr<model::GpuTransformer> model_;
  // Calibrate's second half, the weights loaded into model_.
  Result<std::vector<model::ScoreRequest>> Sample(std::span<const float> host_full,
                                                  const std::vector<std::vector<int32_t>>& prompts,
                                                  int64_t max_new_tokens, int32_t stop_token, uint64_t seed,
                                                  std::chrono::steady_clock::time_point t0);
  Sampler sampler_;
  // The weights of the last Calibrate, on the host or on the device
  // (PolicyQuantizer keeps them alive and unchanged until its
  // MeasureMismatch): MeasureMismatchOnGpu's restore fallback.
  std::span<const float> full_;
  const float* device_full_ = nullptr;
  actors::DeviceBuffer change_scratch_;  // RelativeChangeOnGpu's, allocated at first use
  double sample_s_ = 0;
  GpuPlanTiming timing_;
};

}  // namespace grove::rollout
