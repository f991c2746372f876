#include "model/safetensors.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>

namespace grove::model {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace {

constexpr uint64_t kMaxHeader = 100ull << 20;  // the format's own limit is 100 MB

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

std::string ShapeString(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

const SafetensorsFile::Entry* SafetensorsFile::Find(const std::string& name) const {
  for (const Entry& e : tensors)
    if (e.name == name) return &e;
  return nullptr;
}

Status WriteSafetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const TensorRef& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      return Status::InvalidArgument("safetensors: bad tensor name \"" + t.name + "\"");
    if (header.contains(t.name)) return Status::InvalidArgument("safetensors: duplicate tensor " + t.name);
    int64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) return Status::InvalidArgument("safetensors: negative dimension in " + t.name);
      numel *= d;
    }
    if (numel != int64_t(t.data.size()))
      return Status::InvalidArgument("safetensors: tensor " + t.name + " has shape " + ShapeString(t.shape) +
                                     " but " + std::to_string(t.data.size()) + " values");
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + 4 * uint64_t(numel)}}};
    offset += 4 * uint64_t(numel);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data 8-byte aligned
  const std::string tmp = path + ".tmp";
  {
    File f(std::fopen(tmp.c_str(), "wb"));
    if (!f) return Status::IOError("safetensors: cannot create " + tmp + ": " + std::strerror(errno));
    const uint64_t n = text.size();
    bool ok = std::fwrite(&n, 8, 1, f.get()) == 1 && std::fwrite(text.data(), 1, n, f.get()) == n;
    for (const TensorRef& t : tensors)
      ok = ok && std::fwrite(t.data.data(), 4, t.data.size(), f.get()) == t.data.size();
    ok = ok && std::fflush(f.get()) == 0;
    if (!ok) {
      std::remove(tmp.c_str());
      return Status::IOError("safetensors: write to " + tmp + " failed: " + std::strerror(errno));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    return Status::IOError("safetensors: rename " + tmp + " -> " + path + " failed: " + std::strerror(errno));
  return Status::OK();
}

Result<SafetensorsFile> ReadSafetensors(const std::string& path) {
  auto bad = [&](const std::string& what) { return Status::Corruption("safetensors " + path + ": " + what); };
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) return Status::IOError("safetensors: cannot open " + path + ": " + std::strerror(errno));
  if (std::fseek(f.get(), 0, SEEK_END) != 0) return Status::IOError("safetensors: cannot seek " + path);
  const long size_l = std::ftell(f.get());
  if (size_l < 0) return Status::IOError("safetensors: cannot size " + path);
  const uint64_t size = uint64_t(size_l);
  std::rewind(f.get());
  if (size < 8) return bad("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  if (std::fread(&n, 8, 1, f.get()) != 1) return Status::IOError("safetensors: read failed on " + path);
  if (n > kMaxHeader) return bad("header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > size - 8)
    return bad("header length " + std::to_string(n) + " runs past the end of the " + std::to_string(size) +
               "-byte file (truncated?)");
  std::string text(n, '\0');
  if (std::fread(text.data(), 1, n, f.get()) != n) return Status::IOError("safetensors: read failed on " + path);
  nlohmann::json header = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return bad("header is not valid JSON");
  if (!header.is_object()) return bad("header is not a JSON object");
  SafetensorsFile out;
  struct Span { uint64_t begin, end; size_t index; };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return bad("__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) return bad("__metadata__." + m.key() + " is not a string");
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor " + name + ": ";
    if (!v.is_object()) return bad(where + "entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) return bad(where + "missing dtype");
    const std::string dtype = v["dtype"].get<std::string>();
    if (dtype != "F32")
      return Status::InvalidArgument("safetensors " + path + ": " + where + "dtype " + dtype +
                                     " is not supported (grove reads F32 only)");
    if (!v.contains("shape") || !v["shape"].is_array()) return bad(where + "missing shape");
    SafetensorsFile::Entry e;
    e.name = name;
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) return bad(where + "shape has a non-integer or negative dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > 0 && numel > (size / 4 + 1) / dim) return bad(where + "shape " + v["shape"].dump() + " is larger than the file");
      numel *= dim;
      e.shape.push_back(int64_t(dim));
    }
    const auto& off = v.contains("data_offsets") ? v["data_offsets"] : nlohmann::json();
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return bad(where + "data_offsets must be [begin, end] of non-negative integers");
    const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    if (en < b) return bad(where + "data_offsets end " + std::to_string(en) + " < begin " + std::to_string(b));
    if (en - b != 4 * numel)
      return bad(where + "data_offsets span " + std::to_string(en - b) + " bytes but shape " + v["shape"].dump() +
                 " of F32 needs " + std::to_string(4 * numel));
    if (b % 4 != 0) return bad(where + "data_offsets begin " + std::to_string(b) + " is not 4-byte aligned");
    e.numel = int64_t(numel);
    e.offset = int64_t(b / 4);
    spans.push_back({b, en, out.tensors.size()});
    out.tensors.push_back(std::move(e));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin || (a.begin == b.begin && a.end < b.end); });
  uint64_t expect = 0;
  for (const Span& s : spans) {
    const std::string& nm = out.tensors[s.index].name;
    if (s.begin < expect) return bad("tensor " + nm + " overlaps the tensor before it");
    if (s.begin > expect) return bad("gap of " + std::to_string(s.begin - expect) + " bytes before tensor " + nm);
    expect = s.end;
  }
  const uint64_t data_bytes = size - 8 - n;
  if (expect != data_bytes)
    return bad("tensors cover " + std::to_string(expect) + " data bytes but the file holds " +
               std::to_string(data_bytes) + (expect > data_bytes ? " (truncated?)" : " (trailing bytes)"));
  std::vector<SafetensorsFile::Entry> ordered;
  for (const Span& s : spans) ordered.push_back(std::move(out.tensors[s.index]));
  out.tensors = std::move(ordered);
  out.data.resize(data_bytes / 4);
  if (std::fread(out.data.data(), 4, out.data.size(), f.get()) != out.data.size())
    return Status::IOError("safetensors: read of tensor data failed on " + path);
  return out;
}

}  // namespace grove::model
