// GenerationBackend: where a rollout worker samples, chosen by
// `[rollout] device`: the CPU engine (model::Transformer over the
// round-tripped weights) or the GPU engine (rollout::GpuGenerator, built
// only with CUDA), both installing each policy version as the worker's
// PolicyQuantizer decides and both producing model::Completion (tokens,
// per-token log-probs, routed experts) with the CPU engine's semantics.
//
// [rollout] keys read here:
//   device = "cpu" | "gpu" | "auto"  ("auto")  auto: the GPU when this build
//            has the GPU engine, a GPU is visible and the engine accepts the
//            model's shape; else the CPU (the choice and its reason logged once)
//   gpu = -1              device index; -1: the worker's index (the N of
//                         "rollout-N") modulo the visible GPU count
//   max_batch = 128       GPU: sequences decoded together
//   kv_memory_fraction = 0.6  GPU: share of free memory for KV pages (lower
//                         it when the learner or other workers share the GPU)
//   cuda_graphs = true    GPU: capture the decode step
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "actors/weight_transfer.h"
#include "base/config.h"
#include "base/result.h"
#include "model/config.h"
#include "model/transformer.h"
#include "rollout/policy_quantizer.h"

namespace grove::rollout {

enum class RolloutDevice { kCpu, kGpu, kAuto };

struct BackendSettings {
  RolloutDevice device = RolloutDevice::kAuto;
  int64_t gpu = -1;
  int64_t max_batch = 128;
  double kv_memory_fraction = 0.6;
  bool cuda_graphs = true;
};

// The keys above, for the caller's CheckKeys of the [rollout] table.
const std::vector<std::string_view>& BackendKeys();
// Reads them from the [rollout] section (InvalidArgument naming the file).
Result<BackendSettings> ParseBackendSettings(const Config& rollout);

// The GPU a worker uses: `gpu` when >= 0 (InvalidArgument when not below
// device_count), else the index parsed from the tail of `worker_id`
// ("rollout-3" -> 3, none -> 0) modulo device_count. device_count > 0.
Result<int> PickGpu(int64_t gpu, const std::string& worker_id, int device_count);

// Visible CUDA devices for the GPU engine: 0 in a build without it.
int GenerationGpuCount();

class GenerationBackend {
 public:
  virtual ~GenerationBackend() = default;
  // "cpu" or "gpu N"
  virtual std::string name() const = 0;
  // The CUDA device sampled on; -1 for the CPU engine.
  virtual int gpu() const { return -1; }
  // Installs `version`'s fp32 weights (laid out as `tensors`, already checked
  // against the model's layout) in the formats the quantizer picks. `flat`
  // may be overwritten (the CPU engine quantizes it in place).
  virtual Status Install(int64_t version, const std::vector<actors::TensorSpec>& tensors,
                         std::vector<float>& flat) = 0;
  // True when InstallFromDevice works: a GPU engine whose formats need no
  // host copy of the weights (every quantize mode; plan mode where its plan
  // is measured on that GPU, not on a CPU copy of the model).
  virtual bool installs_from_device() const { return false; }
  // As Install from fp32 weights already on this engine's GPU (`device_flat`,
  // complete, unchanged until this returns; e.g. a CUDA IPC copy).
  // FailedPrecondition where installs_from_device() is false. On failure of
  // either install the GPU engine holds no version: Generate is
  // FailedPrecondition until an install succeeds.
  virtual Status InstallFromDevice(int64_t version, const std::vector<actors::TensorSpec>& tensors,
                                   const float* device_flat) {
    (void)version;
    (void)tensors;
    (void)device_flat;
    return Status::FailedPrecondition(name() + " installs weights from the host only");
  }
  virtual Result<std::vector<model::Completion<float>>> Generate(const std::vector<std::vector<int32_t>>& prompts,
                                                                 const model::SamplingOptions& options) = 0;
  virtual const PolicyQuantizer& quantizer() const = 0;
  // One line for `grove status`: the engine and its weights.
  virtual std::string Detail() const { return quantizer().Detail(); }
  // True when one Generate over every group of a request pays (the GPU's
  // batch); false: one call per group (the CPU engine, one seed per group).
  virtual bool joins_groups() const { return false; }
  // The engine's own time for the last Install's upload and quantization
  // (GPU), 0 where it is not separate from Install.
  virtual double last_device_load_seconds() const { return 0; }
};

// The CPU engine: a model::Model holding the quantizer's round trip.
Result<std::unique_ptr<GenerationBackend>> MakeCpuBackend(const model::ModelConfig& config,
                                                          std::unique_ptr<PolicyQuantizer> quantizer);

// The engine `settings` ask for. device = gpu without a usable GPU engine
// (no CUDA build, no GPU, an unsupported model shape, a bad index) is
// FailedPrecondition / InvalidArgument saying which; auto falls back to the
// CPU and logs why.
Result<std::unique_ptr<GenerationBackend>> MakeGenerationBackend(const BackendSettings& settings,
                                                                 const model::ModelConfig& config,
                                                                 const std::string& worker_id,
                                                                 std::unique_ptr<PolicyQuantizer> quantizer);

}  // namespace grove::rollout
