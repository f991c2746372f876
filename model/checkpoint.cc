#include "model/checkpoint.h"

#include <cstring>

#include "model/safetensors.h"

namespace grove::model {
namespace {

constexpr const char* kFormat = "grove.model.v1";

std::string ShapeString(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

// Copies tensors named prefix + layout name into dst (layout order), checking
// that the file has exactly those tensors with those shapes.
Status CopyLayout(const std::string& path, const SafetensorsFile& file, const ParamLayout& layout,
                  const std::string& prefix, float* dst, bool exact) {
  for (const TensorInfo& t : layout.tensors()) {
    const SafetensorsFile::Entry* e = file.Find(prefix + t.name);
    if (!e) return Status::InvalidArgument(path + ": missing tensor " + prefix + t.name);
    if (e->shape != t.shape)
      return Status::InvalidArgument(path + ": tensor " + prefix + t.name + " has shape " + ShapeString(e->shape) +
                                     ", the model expects " + ShapeString(t.shape));
  }
  if (exact && file.tensors.size() != layout.tensors().size()) {
    for (const SafetensorsFile::Entry& e : file.tensors)
      if (!layout.Find(e.name)) return Status::InvalidArgument(path + ": unexpected tensor " + e.name);
  }
  for (const TensorInfo& t : layout.tensors()) {
    std::span<const float> v = file.View(*file.Find(prefix + t.name));
    std::memcpy(dst + t.offset, v.data(), v.size() * sizeof(float));
  }
  return Status::OK();
}

Result<ModelConfig> ConfigOf(const std::string& path, const SafetensorsFile& file) {
  auto fmt = file.metadata.find("format");
  if (fmt == file.metadata.end() || fmt->second != kFormat)
    return Status::InvalidArgument(path + ": not a grove model file (metadata format is \"" +
                                   (fmt == file.metadata.end() ? std::string() : fmt->second) + "\", expected \"" +
                                   kFormat + "\")");
  auto cfg = file.metadata.find("config");
  if (cfg == file.metadata.end()) return Status::InvalidArgument(path + ": metadata has no model config");
  Result<ModelConfig> c = ModelConfig::FromJson(cfg->second);
  if (!c.ok()) return c.status().WithContext(path);
  return c;
}

}  // namespace

std::string OptimizerStatePath(const std::string& model_path) {
  const std::string ext = ".safetensors";
  if (model_path.size() > ext.size() && model_path.compare(model_path.size() - ext.size(), ext.size(), ext) == 0)
    return model_path.substr(0, model_path.size() - ext.size()) + ".optim" + ext;
  return model_path + ".optim" + ext;
}

Status SaveModel(const std::string& path, const Model& model, const std::map<std::string, std::string>& extra) {
  std::map<std::string, std::string> meta = extra;
  meta["format"] = kFormat;
  meta["config"] = model.config().ToJson();
  std::vector<TensorRef> refs;
  for (const TensorInfo& t : model.layout().tensors())
    refs.push_back({t.name, t.shape, model.params().subspan(t.offset, t.numel)});
  return WriteSafetensors(path, refs, meta);
}

Result<std::map<std::string, std::string>> ReadMetadata(const std::string& path) {
  GROVE_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  return file.metadata;
}

Result<std::unique_ptr<Model>> LoadModel(const std::string& path) {
  GROVE_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  GROVE_ASSIGN_OR_RETURN(ModelConfig config, ConfigOf(path, file));
  // The config comes from the file: allocate the model only when the file
  // can hold its weights, so a small file cannot ask for terabytes.
  const int64_t needed = ParamLayout(config).total();
  if (needed > static_cast<int64_t>(file.data.size()))
    return Status::InvalidArgument(path + ": the config in the metadata describes " + std::to_string(needed) +
                                   " parameters, the file holds " + std::to_string(file.data.size()));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Create(config, 0, /*random_init=*/false));
  GROVE_RETURN_IF_ERROR(CopyLayout(path, file, model->layout(), "", model->params().data(), true));
  return model;
}

Status LoadParams(const std::string& path, Model* model) {
  GROVE_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  GROVE_ASSIGN_OR_RETURN(ModelConfig config, ConfigOf(path, file));
  if (config.ToJson() != model->config().ToJson())
    return Status::InvalidArgument(path + ": checkpoint config " + config.ToJson() + " differs from the model's " +
                                   model->config().ToJson());
  std::vector<float> staged(model->layout().total());
  GROVE_RETURN_IF_ERROR(CopyLayout(path, file, model->layout(), "", staged.data(), true));
  std::copy(staged.begin(), staged.end(), model->params().begin());
  return Status::OK();
}

Status SaveOptimizerState(const std::string& path, const ParamLayout& layout, const std::vector<NamedBuffer>& buffers,
                          const std::map<std::string, std::string>& metadata) {
  std::vector<TensorRef> refs;
  for (const NamedBuffer& b : buffers) {
    if (int64_t(b.data.size()) != layout.total())
      return Status::InvalidArgument("optimizer buffer " + b.name + " has " + std::to_string(b.data.size()) +
                                     " values, the layout " + std::to_string(layout.total()));
    for (const TensorInfo& t : layout.tensors())
      refs.push_back({b.name + "/" + t.name, t.shape, b.data.subspan(t.offset, t.numel)});
  }
  return WriteSafetensors(path, refs, metadata);
}

Result<OptimizerState> LoadOptimizerState(const std::string& path, const ParamLayout& layout,
                                          const std::vector<std::string>& names) {
  GROVE_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  OptimizerState st;
  st.metadata = file.metadata;
  for (const std::string& n : names) {
    std::vector<float> buf(layout.total());
    GROVE_RETURN_IF_ERROR(CopyLayout(path, file, layout, n + "/", buf.data(), false));
    st.buffers[n] = std::move(buf);
  }
  return st;
}

}  // namespace grove::model
