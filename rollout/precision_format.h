// The weight formats a rollout worker can hold a Linear weight in, their
// storage cost, and applying them to a flat parameter buffer.
//
//   kBF16: bf16 values (round to nearest even), 16 bits.
//   kInt8: per-row int8, one fp32 scale per row (int8_quantizer.h).
//   kInt4: group-wise int4, one fp32 scale per (row, 128 columns)
//          (int4_quantizer.h).
//
// The CPU engine runs the round trip (the dequantized fp32 values), which is
// what a kernel that reads the format and computes in fp32 computes, so the
// CPU rollout policy differs from the learner's as a GPU worker's would.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "actors/weight_transfer.h"
#include "base/result.h"

namespace grove::rollout {

enum class PrecisionFormat { kBF16, kInt8, kInt4 };

std::string_view FormatName(PrecisionFormat f);  // "bf16", "int8", "int4"
Result<PrecisionFormat> ParseFormat(std::string_view name);

// Storage bits of a [rows, cols] weight in format f, scales included.
double StorageBits(PrecisionFormat f, int64_t rows, int64_t cols);

float RoundToBf16(float x);

// w [rows, cols] := its round trip through f.
void RoundTripInPlace(PrecisionFormat f, float* w, int64_t rows, int64_t cols);

struct QuantizationReport {
  int64_t tensors_quantized = 0;
  int64_t params_quantized = 0;
  int64_t params_total = 0;
  double max_abs_error = 0;   // over all quantized weights
  double rel_l2_error = 0;    // ||w - dq|| / ||w|| over all quantized weights
  // Average storage bits per weight of the whole model (StorageBits of each
  // quantized tensor, 32 for the rest).
  double bits_per_weight = 32;
};

// Which tensors a rollout worker quantizes: 2-D weights, except embeddings,
// the router and norms, which stay fp32 (small, and sensitive: the router's
// top-k choice must stay close to the learner's).
bool IsQuantizedTensor(const actors::TensorSpec& t);

// The format of one tensor, or nullopt to leave it fp32. A format is only
// applied to 2-D tensors.
using FormatChooser = std::function<std::optional<PrecisionFormat>(const actors::TensorSpec&)>;

// The counts and storage bits of applying `choose` (errors left 0): what a
// worker that quantizes on the GPU reports.
QuantizationReport StorageReport(const std::vector<actors::TensorSpec>& tensors, const FormatChooser& choose);

// Replaces each tensor of `flat` that `choose` gives a format by its round
// trip through that format.
QuantizationReport QuantizeInPlace(const std::vector<actors::TensorSpec>& tensors, std::vector<float>& flat,
                                   const FormatChooser& choose);

}  // namespace grove::rollout
