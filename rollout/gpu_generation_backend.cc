#include "rollout/gpu_generation_backend.h"

#include <memory>
#include <string>

#include <glog/logging.h>

#include "rollout/gpu_generator.h"
#include "rollout/gpu_precision_plan.h"

namespace grove::rollout {

namespace {

class GpuBackend : public GenerationBackend {
 public:
  GpuBackend(model::ModelConfig config, int device, std::unique_ptr<GpuGenerator> g,
             std::unique_ptr<PolicyQuantizer> q, std::unique_ptr<model::Model> plan_model)
      : config_(std::move(config)), device_(device), generator_(std::move(g)), quantizer_(std::move(q)),
        plan_model_(std::move(plan_model)) {}

  std::string name() const override { return "gpu " + std::to_string(device_); }
  int gpu() const override { return device_; }
  bool joins_groups() const override { return true; }

  // Failure leaves no version installed: a plan made for it may have loaded
  // the engine with the version's full weights to sample its calibration,
  // so Generate refuses (FailedPrecondition) until an install succeeds.
  Status Install(int64_t version, const std::vector<actors::TensorSpec>& tensors,
                 std::vector<float>& flat) override {
    installed_ = false;
    GROVE_ASSIGN_OR_RETURN(FormatChooser choose,
                           quantizer_->Formats(version, config_, tensors, flat, plan_model_.get()));
    GROVE_ASSIGN_OR_RETURN(last_load_s_, generator_->LoadWeights(flat, choose));
    installed_ = true;
    return Status::OK();
  }

  // Every mode but plan reads no weight values to choose formats; plan mode
  // does with its GPU measurer (its trigger, calibration and mismatch on
  // this device: PolicyQuantizer::FormatsFromDevice), not with a CPU copy.
  bool installs_from_device() const override {
    return quantizer_->settings().mode != QuantizeMode::kPlan ||
           (quantizer_->measurer() != nullptr && quantizer_->measurer()->measures_from_device());
  }
  Status InstallFromDevice(int64_t version, const std::vector<actors::TensorSpec>& tensors,
                           const float* device_flat) override {
    if (!installs_from_device()) return GenerationBackend::InstallFromDevice(version, tensors, device_flat);
    installed_ = false;
    GROVE_ASSIGN_OR_RETURN(FormatChooser choose, quantizer_->FormatsFromDevice(version, config_, tensors, device_flat));
    GROVE_ASSIGN_OR_RETURN(last_load_s_, generator_->LoadWeightsFromDevice(device_flat, choose));
    installed_ = true;
    return Status::OK();
  }

  Result<std::vector<model::Completion<float>>> Generate(const std::vector<std::vector<int32_t>>& prompts,
                                                         const model::SamplingOptions& options) override {
    if (!installed_) return Status::FailedPrecondition(name() + ": no policy version installed (none yet, or the last install failed)");
    return generator_->Generate(prompts, options);
  }
  const PolicyQuantizer& quantizer() const override { return *quantizer_; }
  std::string Detail() const override {
    // quantize = "none" leaves every weight to the engine, which holds bf16.
    return name() + ", " +
           (quantizer_->settings().mode == QuantizeMode::kNone ? std::string("bf16 weights") : quantizer_->Detail());
  }
  double last_device_load_seconds() const override { return last_load_s_; }

 private:
  model::ModelConfig config_;
  int device_;
  std::unique_ptr<GpuGenerator> generator_;
  std::unique_ptr<PolicyQuantizer> quantizer_;
  std::unique_ptr<model::Model> plan_model_;  // plan mode: the CPU copy the plan calibrates on
  double last_load_s_ = 0;
  bool installed_ = false;
};

}  // namespace

Result<std::unique_ptr<GenerationBackend>> MakeGpuBackend(const BackendSettings& settings, int device,
                                                          const model::ModelConfig& config,
                                                          std::unique_ptr<PolicyQuantizer>& quantizer) {
  GpuGeneratorOptions o;
  o.device = device;
  o.max_batch = static_cast<int>(settings.max_batch);
  o.kv_memory_fraction = settings.kv_memory_fraction;
  o.cuda_graphs = settings.cuda_graphs;
  // Plan mode measures on this GPU (gpu_precision_plan.h: seconds where the
  // CPU model takes minutes on the GPU reference model), its frozen copy of
  // the model allocated before the engine sizes its KV pages from what is
  // free; the engine samples the calibration completions. Where the copy
  // cannot be made (a shape GpuTransformer does not support, or no memory
  // for it), on a CPU copy of the model as before.
  std::unique_ptr<model::Model> plan_model;
  // The engine, once made (below; the sampler runs only after it is): the
  // backend owns both, the engine outliving the quantizer's measurer.
  auto engine = std::make_shared<GpuGenerator*>(nullptr);
  if (quantizer->settings().mode == QuantizeMode::kPlan) {
    auto measurer = GpuPlanMeasurer::Create(
        config, device,
        [engine](const float* device_full, std::span<const float>, const std::vector<std::vector<int32_t>>& prompts,
                 const model::SamplingOptions& so) -> Result<std::vector<model::Completion<float>>> {
          if (*engine == nullptr) return Status::FailedPrecondition("precision plan: the engine was not made");
          // bf16: the full policy, from the measurer's device copy (host and
          // device installs alike: the same values, no second upload).
          GROVE_RETURN_IF_ERROR((*engine)->LoadWeightsFromDevice(device_full, nullptr).status());
          return (*engine)->Generate(prompts, so);
        });
    if (measurer.ok()) {
      quantizer->set_measurer(std::move(*measurer));
    } else {
      LOG(WARNING) << "precision plan: measuring on the CPU, not on GPU " << device << ": " << measurer.status();
      GROVE_ASSIGN_OR_RETURN(plan_model, model::Model::Create(config, 0));
    }
  }
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<GpuGenerator> g, GpuGenerator::Create(config, o));
  *engine = g.get();
  return std::unique_ptr<GenerationBackend>(
      new GpuBackend(config, device, std::move(g), std::move(quantizer), std::move(plan_model)));
}

}  // namespace grove::rollout
