#include "rollout/int8_quantizer.h"

#include <algorithm>
#include <cmath>

namespace grove::rollout {

Int8Matrix QuantizeInt8PerRow(const float* w, int64_t rows, int64_t cols) {
  Int8Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.q.resize(rows * cols);
  m.scales.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    float amax = 0;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(row[c]));
    // An all-zero row keeps scale 0 and dequantizes to exact zeros.
    const float scale = amax / 127.0f;
    const float inv = scale > 0 ? 1.0f / scale : 0.0f;
    m.scales[r] = scale;
    for (int64_t c = 0; c < cols; ++c) {
      float v = std::nearbyint(row[c] * inv);
      m.q[r * cols + c] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
    }
  }
  return m;
}

void DequantizeInt8(const Int8Matrix& m, float* out) {
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.cols; ++c)
      out[r * m.cols + c] = static_cast<float>(m.q[r * m.cols + c]) * m.scales[r];
}

QuantizationReport QuantizeInt8InPlace(const std::vector<actors::TensorSpec>& tensors,
                                       std::vector<float>& flat,
                                       const std::function<bool(const actors::TensorSpec&)>& select) {
  return QuantizeInPlace(tensors, flat, [&](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
    if (!select(t)) return std::nullopt;
    return PrecisionFormat::kInt8;
  });
}

}  // namespace grove::rollout
