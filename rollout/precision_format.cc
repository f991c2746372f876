#include "rollout/precision_format.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "rollout/int4_quantizer.h"
#include "rollout/int8_quantizer.h"

namespace grove::rollout {

std::string_view FormatName(PrecisionFormat f) {
  switch (f) {
    case PrecisionFormat::kBF16: return "bf16";
    case PrecisionFormat::kInt8: return "int8";
    case PrecisionFormat::kInt4: return "int4";
  }
  return "?";
}

Result<PrecisionFormat> ParseFormat(std::string_view name) {
  for (PrecisionFormat f : {PrecisionFormat::kBF16, PrecisionFormat::kInt8, PrecisionFormat::kInt4})
    if (FormatName(f) == name) return f;
  return Status::InvalidArgument("unknown weight format \"" + std::string(name) + "\" (bf16, int8 or int4)");
}

double StorageBits(PrecisionFormat f, int64_t rows, int64_t cols) {
  switch (f) {
    case PrecisionFormat::kBF16: return 16.0 * static_cast<double>(rows * cols);
    case PrecisionFormat::kInt8: return 8.0 * static_cast<double>(rows * cols) + 32.0 * static_cast<double>(rows);
    case PrecisionFormat::kInt4: return Int4StorageBits(rows, cols);
  }
  return 32.0 * static_cast<double>(rows * cols);
}

float RoundToBf16(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  if (std::isnan(x)) return std::bit_cast<float>((u | 0x00400000u) & 0xFFFF0000u);  // stays a (quiet) NaN
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return std::bit_cast<float>(u & 0xFFFF0000u);
}

void RoundTripInPlace(PrecisionFormat f, float* w, int64_t rows, int64_t cols) {
  switch (f) {
    case PrecisionFormat::kBF16:
      for (int64_t i = 0; i < rows * cols; ++i) w[i] = RoundToBf16(w[i]);
      return;
    case PrecisionFormat::kInt8:
      DequantizeInt8(QuantizeInt8PerRow(w, rows, cols), w);
      return;
    case PrecisionFormat::kInt4: {
      // The default group size is valid and shapes are non-negative: cannot fail.
      Result<Int4Matrix> m = QuantizeInt4Grouped(w, rows, cols);
      DequantizeInt4(*m, w);
      return;
    }
  }
}

bool IsQuantizedTensor(const actors::TensorSpec& t) {
  if (t.shape.size() != 2) return false;
  const std::string& n = t.name;
  for (const char* keep : {"embed", "router", "gate_bias", "norm"})
    if (n.find(keep) != std::string::npos) return false;
  return true;
}

QuantizationReport StorageReport(const std::vector<actors::TensorSpec>& tensors, const FormatChooser& choose) {
  QuantizationReport rep;
  double bits = 0;
  for (const actors::TensorSpec& t : tensors) {
    rep.params_total += static_cast<int64_t>(t.count);
    const std::optional<PrecisionFormat> f = t.shape.size() == 2 ? choose(t) : std::nullopt;
    if (!f || t.count == 0) {
      bits += 32.0 * t.count;
      continue;
    }
    bits += StorageBits(*f, t.shape[0], t.shape[1]);
    rep.tensors_quantized += 1;
    rep.params_quantized += static_cast<int64_t>(t.count);
  }
  rep.bits_per_weight = rep.params_total > 0 ? bits / rep.params_total : 32;
  return rep;
}

QuantizationReport QuantizeInPlace(const std::vector<actors::TensorSpec>& tensors, std::vector<float>& flat,
                                   const FormatChooser& choose) {
  QuantizationReport rep = StorageReport(tensors, choose);
  double err2 = 0, ref2 = 0;
  std::vector<float> dq;
  for (const actors::TensorSpec& t : tensors) {
    const std::optional<PrecisionFormat> f = t.shape.size() == 2 ? choose(t) : std::nullopt;
    if (!f || t.count == 0) continue;
    const int64_t rows = t.shape[0], cols = t.shape[1];
    float* w = flat.data() + t.offset;
    dq.assign(w, w + t.count);
    RoundTripInPlace(*f, dq.data(), rows, cols);
    for (size_t i = 0; i < t.count; ++i) {
      const double e = static_cast<double>(w[i]) - dq[i];
      err2 += e * e;
      ref2 += static_cast<double>(w[i]) * w[i];
      rep.max_abs_error = std::max(rep.max_abs_error, std::fabs(e));
    }
    std::copy(dq.begin(), dq.end(), w);
  }
  rep.rel_l2_error = ref2 > 0 ? std::sqrt(err2 / ref2) : 0;
  return rep;
}

}  // namespace grove::rollout
