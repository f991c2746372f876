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

bool IsQuantizedTensor(const actors::TensorSpec& t) {
  if (t.shape.size() != 2) return false;
  const std::string& n = t.name;
  for (const char* keep : {"embed", "router", "gate_bias", "norm"})
    if (n.find(keep) != std::string::npos) return false;
  return true;
}

QuantizationReport QuantizeInt8InPlace(const std::vector<actors::TensorSpec>& tensors,
                                       std::vector<float>& flat,
                                       const std::function<bool(const actors::TensorSpec&)>& select) {
  QuantizationReport rep;
  double err2 = 0, ref2 = 0, bits = 0;
  std::vector<float> dq;
  for (const actors::TensorSpec& t : tensors) {
    rep.params_total += static_cast<int64_t>(t.count);
    if (!select(t) || t.count == 0) {
      bits += 32.0 * t.count;
      continue;
    }
    const int64_t rows = t.shape[0], cols = t.shape[1];
    float* w = flat.data() + t.offset;
    Int8Matrix m = QuantizeInt8PerRow(w, rows, cols);
    dq.resize(t.count);
    DequantizeInt8(m, dq.data());
    for (size_t i = 0; i < t.count; ++i) {
      const double e = static_cast<double>(w[i]) - dq[i];
      err2 += e * e;
      ref2 += static_cast<double>(w[i]) * w[i];
      rep.max_abs_error = std::max(rep.max_abs_error, std::fabs(e));
    }
    std::copy(dq.begin(), dq.end(), w);
    bits += 8.0 * t.count + 32.0 * rows;
    rep.tensors_quantized += 1;
    rep.params_quantized += static_cast<int64_t>(t.count);
  }
  rep.rel_l2_error = ref2 > 0 ? std::sqrt(err2 / ref2) : 0;
  rep.bits_per_weight = rep.params_total > 0 ? bits / rep.params_total : 32;
  return rep;
}

}  // namespace grove::rollout
