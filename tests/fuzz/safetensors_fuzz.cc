// Fuzz target: files read from disk that may come from anywhere (a copied
// checkpoint, a downloaded model): model::ReadSafetensors and, on the same
// bytes, the checkpoint loaders built on it (ReadMetadata, LoadModel, which
// rebuilds a model from the config in the file's metadata, and
// LoadOptimizerState against a small fixed layout).
//
// Input: the whole file. It is written to a temporary file per process
// (the loaders take paths), then loaded.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include "model/checkpoint.h"
#include "model/config.h"
#include "model/param_layout.h"
#include "model/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

namespace fuzz = grove::fuzz;
namespace model = grove::model;

const std::string& TempPath() {
  static const std::string path = [] {
    std::string p = (std::filesystem::temp_directory_path() /
                     ("grove-fuzz-safetensors-" + std::to_string(::getpid()) + ".safetensors"))
                        .string();
    std::atexit([] { std::remove(TempPath().c_str()); });
    return p;
  }();
  return path;
}

// A 2-layer toy layout for the optimizer-state loader.
const model::ParamLayout& SmallLayout() {
  static const model::ParamLayout layout = [] {
    model::ModelConfig c;
    c.vocab_size = 8;
    c.hidden = 4;
    c.layers = 2;
    c.heads = 2;
    c.kv_heads = 1;
    c.head_dim = 2;
    c.max_seq_len = 8;
    c.dense_layers = 1;
    c.dense_hidden = 4;
    c.experts = 2;
    c.top_k = 1;
    c.expert_hidden = 4;
    return model::ParamLayout(c);
  }();
  return layout;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 1 << 20) return 0;
  const std::string& path = TempPath();
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) fuzz::Fail(__FILE__, __LINE__, "cannot write " + path);
    if (size > 0 && std::fwrite(data, 1, size, f) != size) fuzz::Fail(__FILE__, __LINE__, "short write");
    std::fclose(f);
  }

  auto file = model::ReadSafetensors(path);
  if (file.ok()) {
    const model::SafetensorsFile& st = file.value();
    // What the reader promises about a file it accepts.
    int64_t previous_end = 0;
    for (const auto& e : st.tensors) {
      int64_t numel = 1;
      for (int64_t d : e.shape) {
        GROVE_FUZZ_CHECK(d >= 0);
        numel *= d;
      }
      GROVE_FUZZ_CHECK(numel == e.numel);
      GROVE_FUZZ_CHECK(e.offset >= previous_end);  // in file order, no overlap
      GROVE_FUZZ_CHECK(e.offset + e.numel <= static_cast<int64_t>(st.data.size()));
      previous_end = e.offset + e.numel;
      GROVE_FUZZ_CHECK(st.Find(e.name) != nullptr);
      auto view = st.View(e);
      fuzz::Sink(fuzz::Digest(view.data(), view.size_bytes()));
    }
    fuzz::Sink(st.metadata.size());
  }

  fuzz::Sink(model::ReadMetadata(path).ok());
  if (auto m = model::LoadModel(path); m.ok()) {
    fuzz::Sink(static_cast<uint64_t>(m.value()->layout().total()));
  }
  fuzz::Sink(model::LoadOptimizerState(path, SmallLayout(), {"adam_m", "adam_v"}).ok());
  return 0;
}
