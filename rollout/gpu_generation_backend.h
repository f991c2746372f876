// The GPU engine behind GenerationBackend (generation_backend.h): a
// rollout::GpuGenerator that takes each version's fp32 weights and quantizes
// them on the device in the formats the worker's PolicyQuantizer picks.
// Built only where the GPU engine is (GROVE_WITH_GPU_GENERATOR); the rest of
// the worker reaches it through MakeGenerationBackend.
#pragma once

#include <memory>

#include "base/result.h"
#include "model/config.h"
#include "rollout/generation_backend.h"
#include "rollout/policy_quantizer.h"

namespace grove::rollout {

// An engine on `device`. Takes `quantizer` only on success (on failure the
// caller still holds it, to fall back to the CPU); the error says which
// shape rule the model breaks or what the device lacks.
Result<std::unique_ptr<GenerationBackend>> MakeGpuBackend(const BackendSettings& settings, int device,
                                                          const model::ModelConfig& config,
                                                          std::unique_ptr<PolicyQuantizer>& quantizer);

}  // namespace grove::rollout
