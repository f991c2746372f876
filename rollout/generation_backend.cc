#include "rollout/generation_backend.h"

#include <cctype>

#include <glog/logging.h>

#ifdef GROVE_WITH_GPU_GENERATOR
#include "rollout/gpu_generation_backend.h"
#include "rollout/gpu_generator.h"
#endif

namespace grove::rollout {

const std::vector<std::string_view>& BackendKeys() {
  static const std::vector<std::string_view> keys = {"device", "gpu", "max_batch", "kv_memory_fraction",
                                                     "cuda_graphs"};
  return keys;
}

Result<BackendSettings> ParseBackendSettings(const Config& s) {
  BackendSettings o;
  GROVE_ASSIGN_OR_RETURN(std::string device, s.String("device", "auto"));
  if (device == "cpu") o.device = RolloutDevice::kCpu;
  else if (device == "gpu") o.device = RolloutDevice::kGpu;
  else if (device == "auto") o.device = RolloutDevice::kAuto;
  else
    return Status::InvalidArgument(s.source() + ": rollout.device \"" + device + "\" is none of cpu, gpu, auto");
  GROVE_ASSIGN_OR_RETURN(o.gpu, s.Int("gpu", o.gpu));
  GROVE_ASSIGN_OR_RETURN(o.max_batch, s.Int("max_batch", o.max_batch));
  GROVE_ASSIGN_OR_RETURN(o.kv_memory_fraction, s.Double("kv_memory_fraction", o.kv_memory_fraction));
  GROVE_ASSIGN_OR_RETURN(o.cuda_graphs, s.Bool("cuda_graphs", o.cuda_graphs));
  if (o.gpu < -1) return Status::InvalidArgument(s.source() + ": rollout.gpu must be -1 (by worker index) or >= 0");
  if (o.max_batch < 1 || o.max_batch > 4096)
    return Status::InvalidArgument(s.source() + ": rollout.max_batch must be in [1, 4096]");
  if (!(o.kv_memory_fraction > 0 && o.kv_memory_fraction < 1))
    return Status::InvalidArgument(s.source() + ": rollout.kv_memory_fraction must be in (0, 1)");
  return o;
}

Result<int> PickGpu(int64_t gpu, const std::string& worker_id, int device_count) {
  if (device_count <= 0) return Status::FailedPrecondition("no GPU is visible");
  if (gpu >= 0) {
    if (gpu >= device_count)
      return Status::InvalidArgument("rollout.gpu = " + std::to_string(gpu) + " but this process sees " +
                                     std::to_string(device_count) + " GPU(s)");
    return static_cast<int>(gpu);
  }
  // The trailing digits of the id: "rollout-3" -> 3.
  size_t i = worker_id.size();
  while (i > 0 && std::isdigit(static_cast<unsigned char>(worker_id[i - 1]))) --i;
  uint64_t index = 0;
  for (size_t j = i; j < worker_id.size() && j < i + 9; ++j) index = index * 10 + uint64_t(worker_id[j] - '0');
  return static_cast<int>(index % static_cast<uint64_t>(device_count));
}

int GenerationGpuCount() {
#ifdef GROVE_WITH_GPU_GENERATOR
  return GpuGenerator::DeviceCount();
#else
  return 0;
#endif
}

namespace {

class CpuBackend : public GenerationBackend {
 public:
  CpuBackend(std::unique_ptr<model::Model> m, std::unique_ptr<PolicyQuantizer> q)
      : model_(std::move(m)), quantizer_(std::move(q)) {}
  std::string name() const override { return "cpu"; }
  Status Install(int64_t version, const std::vector<actors::TensorSpec>& tensors,
                 std::vector<float>& flat) override {
    return quantizer_->Install(version, tensors, flat, *model_);
  }
  Result<std::vector<model::Completion<float>>> Generate(const std::vector<std::vector<int32_t>>& prompts,
                                                         const model::SamplingOptions& options) override {
    return model_->Generate(prompts, options);
  }
  const PolicyQuantizer& quantizer() const override { return *quantizer_; }

 private:
  std::unique_ptr<model::Model> model_;
  std::unique_ptr<PolicyQuantizer> quantizer_;
};

}  // namespace

Result<std::unique_ptr<GenerationBackend>> MakeCpuBackend(const model::ModelConfig& config,
                                                          std::unique_ptr<PolicyQuantizer> quantizer) {
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> m, model::Model::Create(config, 0));
  return std::unique_ptr<GenerationBackend>(new CpuBackend(std::move(m), std::move(quantizer)));
}

Result<std::unique_ptr<GenerationBackend>> MakeGenerationBackend(const BackendSettings& settings,
                                                                 const model::ModelConfig& config,
                                                                 const std::string& worker_id,
                                                                 std::unique_ptr<PolicyQuantizer> quantizer) {
  if (settings.device == RolloutDevice::kCpu) {
    LOG(INFO) << "rollout: sampling on the CPU (rollout.device = cpu)";
    return MakeCpuBackend(config, std::move(quantizer));
  }
  const bool required = settings.device == RolloutDevice::kGpu;
  // Why the GPU engine cannot be used; an error when it was asked for.
  auto unusable = [&](const Status& why) -> Result<std::unique_ptr<GenerationBackend>> {
    if (required) return Status(why.code(), "rollout.device = gpu: " + why.message());
    LOG(INFO) << "rollout: sampling on the CPU (rollout.device = auto: " << why.message() << ")";
    return MakeCpuBackend(config, std::move(quantizer));
  };
#ifdef GROVE_WITH_GPU_GENERATOR
  const int count = GpuGenerator::DeviceCount();
  if (count == 0) return unusable(Status::FailedPrecondition("no GPU is visible to this process"));
  Result<int> device = PickGpu(settings.gpu, worker_id, count);
  if (!device.ok()) return unusable(device.status());
  // The engine's own shape rules decide: Create says which one a config breaks.
  Result<std::unique_ptr<GenerationBackend>> gpu = MakeGpuBackend(settings, *device, config, quantizer);
  if (!gpu.ok()) return unusable(gpu.status());
  LOG(INFO) << "rollout: sampling on " << (*gpu)->name() << " (rollout.device = "
            << (required ? "gpu" : "auto") << ", max_batch " << settings.max_batch << ")";
  return gpu;
#else
  (void)worker_id;
  return unusable(Status::FailedPrecondition("this build has no GPU engine (built without CUDA)"));
#endif
}

}  // namespace grove::rollout
