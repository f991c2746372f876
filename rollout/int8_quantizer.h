// Weight-only int8 quantization with one scale per output channel (row of a
// [out, in] Linear weight): scale = max|w_row| / 127, q = round(w / scale).
// The CPU rollout engine runs the dequantized weights, which computes exactly
// what an int8-weight kernel with fp32 activations computes, so the rollout
// policy differs from the learner's the way a quantized GPU worker's would.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "actors/weight_transfer.h"
#include "rollout/precision_format.h"

namespace grove::rollout {

struct Int8Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<int8_t> q;      // rows * cols
  std::vector<float> scales;  // rows
};

Int8Matrix QuantizeInt8PerRow(const float* w, int64_t rows, int64_t cols);
void DequantizeInt8(const Int8Matrix& m, float* out);

// Replaces every selected tensor of `flat` by its int8 round trip
// (QuantizeInPlace with kInt8 for the selected tensors).
QuantizationReport QuantizeInt8InPlace(const std::vector<actors::TensorSpec>& tensors,
                                       std::vector<float>& flat,
                                       const std::function<bool(const actors::TensorSpec&)>& select =
                                           IsQuantizedTensor);

}  // namespace grove::rollout
