// safetensors files (https://huggingface.co/docs/safetensors), F32 only:
// 8-byte little-endian header length N, N bytes of JSON
// {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
// "data_offsets": [begin, end]}, ...}, then the data, tensors packed back to
// back in data_offsets order (byte offsets relative to the data start).
//
// Contract: ReadSafetensors never crashes on a corrupt or hostile file; it
// returns Corruption (bytes are not a valid file), InvalidArgument (valid but
// not something grove reads, e.g. a BF16 tensor) or IOError, naming the file
// and the exact problem. WriteSafetensors writes to a temporary file and
// renames it, so a crash never leaves a half-written file under `path`.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"

namespace grove::model {

struct TensorRef {
  std::string name;
  std::vector<int64_t> shape;
  std::span<const float> data;  // numel(shape) values
};

struct SafetensorsFile {
  struct Entry {
    std::string name;
    std::vector<int64_t> shape;
    int64_t offset = 0;  // elements into `data`
    int64_t numel = 0;
  };
  std::map<std::string, std::string> metadata;
  std::vector<Entry> tensors;  // in file (offset) order
  std::vector<float> data;     // all tensor data

  const Entry* Find(const std::string& name) const;
  std::span<const float> View(const Entry& e) const { return {data.data() + e.offset, size_t(e.numel)}; }
};

Status WriteSafetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                        const std::map<std::string, std::string>& metadata);
Result<SafetensorsFile> ReadSafetensors(const std::string& path);

}  // namespace grove::model
