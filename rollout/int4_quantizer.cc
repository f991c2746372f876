#include "rollout/int4_quantizer.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace grove::rollout {
namespace {

// The nibble slot (0..7) of column c within its word: the inverse of
// kInt4NibbleOrder (column 2k -> slot k, column 2k+1 -> slot k+4).
constexpr int SlotOf(int64_t c) {
  const int i = static_cast<int>(c % 8);
  return (i % 2 == 0) ? i / 2 : 4 + i / 2;
}

}  // namespace

int Int4Matrix::Value(int64_t r, int64_t c) const {
  const uint32_t word = packed[r * words_per_row() + c / 8];
  return static_cast<int>((word >> (4 * SlotOf(c))) & 0xFu) - 8;
}

Result<Int4Matrix> QuantizeInt4Grouped(const float* w, int64_t rows, int64_t cols, int64_t group_size) {
  if (rows < 0 || cols < 0)
    return Status::InvalidArgument("int4: bad shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
  if (group_size <= 0 || group_size % 8 != 0)
    return Status::InvalidArgument("int4: group size " + std::to_string(group_size) +
                                   " must be a positive multiple of 8");
  Int4Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.group_size = group_size;
  const int64_t words = m.words_per_row(), groups = m.groups_per_row();
  // Padding nibbles hold u = 8 (q = 0): every word starts as 0x88888888.
  m.packed.assign(rows * words, 0x88888888u);
  m.scales.assign(rows * groups, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    uint32_t* out = m.packed.data() + r * words;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group_size, c1 = std::min(cols, c0 + group_size);
      float amax = 0;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(row[c]));
      // An all-zero group keeps scale 0 and dequantizes to exact zeros.
      const float scale = amax / 7.0f;
      m.scales[r * groups + g] = scale;
      for (int64_t c = c0; c < c1; ++c) {
        const float q = scale > 0 ? std::clamp(std::nearbyint(row[c] / scale), -7.0f, 7.0f) : 0.0f;
        const uint32_t u = static_cast<uint32_t>(static_cast<int>(q) + 8);
        const int shift = 4 * SlotOf(c);
        uint32_t& word = out[c / 8];
        word = (word & ~(0xFu << shift)) | (u << shift);
      }
    }
  }
  return m;
}

void DequantizeInt4(const Int4Matrix& m, float* out) {
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.cols; ++c)
      out[r * m.cols + c] = static_cast<float>(m.Value(r, c)) * m.Scale(r, c);
}

double Int4StorageBits(int64_t rows, int64_t cols, int64_t group_size) {
  const int64_t words = (cols + 7) / 8, groups = (cols + group_size - 1) / group_size;
  return 32.0 * static_cast<double>(rows) * static_cast<double>(words + groups);
}

}  // namespace grove::rollout
