// Weight-only int8 quantization with one scale per output channel (row of a
// [out, in] Linear weight): scale = max|w_row| / 127, q = round(w / scale).
// The CPU rollout engine runs the dequantized weights, which computes exactly
// what an int8-weight kernel with fp32 activations computes, so the rollout
// policy differs from the learner's the way a quantized GPU worker's would.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "actors/weight_transfer.h"

namespace grove::rollout {

struct Int8Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<int8_t> q;      // rows * cols
  std::vector<float> scales;  // rows
};

Int8Matrix QuantizeInt8PerRow(const float* w, int64_t rows, int64_t cols);
void DequantizeInt8(const Int8Matrix& m, float* out);

struct QuantizationReport {
  int64_t tensors_quantized = 0;
  int64_t params_quantized = 0;
  int64_t params_total = 0;
  double max_abs_error = 0;   // over all quantized weights
  double rel_l2_error = 0;    // ||w - dq|| / ||w|| over all quantized weights
  // Average storage bits per weight of the whole model (8 + 32/cols for
  // quantized rows, 32 for the rest).
  double bits_per_weight = 32;
};

// Which tensors a rollout worker quantizes: 2-D weights, except embeddings,
// the router and norms, which stay fp32 (small, and sensitive: the router's
// top-k choice must stay close to the learner's).
bool IsQuantizedTensor(const actors::TensorSpec& t);

// Replaces every selected tensor of `flat` by its int8 round trip.
QuantizationReport QuantizeInt8InPlace(const std::vector<actors::TensorSpec>& tensors,
                                       std::vector<float>& flat,
                                       const std::function<bool(const actors::TensorSpec&)>& select =
                                           IsQuantizedTensor);

}  // namespace grove::rollout
