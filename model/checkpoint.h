// Checkpoints: model weights in one safetensors file, optimizer state in a
// second one beside it (OptimizerStatePath).
//
// Weights file: every tensor of the ParamLayout under its name, F32, and
// __metadata__ {"format": "grove.model.v1", "config": ModelConfig::ToJson(),
// plus the caller's extra keys (e.g. "step")}.
// Optimizer file: for each named buffer B (same layout as the parameters),
// one tensor "B/<param name>" per layout tensor, and the caller's metadata.
// Loading checks format, config, names, shapes and dtypes and reports the
// first mismatch by name; it never changes the model on failure.
#pragma once

#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "base/result.h"
#include "model/param_layout.h"
#include "model/transformer.h"

namespace grove::model {

// "dir/step-100.safetensors" -> "dir/step-100.optim.safetensors".
std::string OptimizerStatePath(const std::string& model_path);

Status SaveModel(const std::string& path, const Model& model,
                 const std::map<std::string, std::string>& extra_metadata = {});
// Builds a model from the file's config and loads its weights.
Result<std::unique_ptr<Model>> LoadModel(const std::string& path);
// Loads weights into an existing model whose config must match the file's.
Status LoadParams(const std::string& path, Model* model);
// The file's metadata (config JSON included) without checking it against a model.
Result<std::map<std::string, std::string>> ReadMetadata(const std::string& path);

struct NamedBuffer {
  std::string name;             // e.g. "adam_m"
  std::span<const float> data;  // layout.total() values
};
Status SaveOptimizerState(const std::string& path, const ParamLayout& layout, const std::vector<NamedBuffer>& buffers,
                          const std::map<std::string, std::string>& metadata);
struct OptimizerState {
  std::map<std::string, std::vector<float>> buffers;  // name -> layout.total() values
  std::map<std::string, std::string> metadata;
};
// Every buffer in `names` must be present with every layout tensor.
Result<OptimizerState> LoadOptimizerState(const std::string& path, const ParamLayout& layout,
                                          const std::vector<std::string>& names);

}  // namespace grove::model
