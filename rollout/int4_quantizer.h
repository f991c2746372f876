// Weight-only int4 quantization, group-wise along the input dimension: for a
// Linear weight W [rows = out, cols = in], each row is cut into groups of
// `group_size` (128) consecutive columns, the last one partial when cols is
// not a multiple; each (row, group) has one fp32 scale.
//
// Values: symmetric, q = round(w / scale) in [-7, 7], scale = max|w| / 7 over
// the group. -8 is never produced: with scale = max/8 the group's largest
// positive weight would have to clamp to 7 and lose up to a whole step, while
// [-7, 7] maps both signs of the maximum exactly and keeps every element
// within half a step: |w - q * scale| <= scale * (0.5 + 16 * FLT_EPSILON)
// (fp32 rounding of w / scale and of q * scale; the stored scale is the one
// used, so its own rounding does not enter; q never clamps because
// max|w| / fl(max|w| / 7) <= 7 * (1 + FLT_EPSILON) < 7.5).
//
// Packing (what a GPU kernel reads): the nibble of q is stored offset-binary,
// u = q + 8 in [1, 15]. Each row is padded to a multiple of 8 columns (pad
// u = 8, i.e. q = 0) and stored as 32-bit little-endian words, 8 columns per
// word, interleaved: nibble i (bits 4i..4i+3) of the word for columns
// 8j..8j+7 holds column 8j + kInt4NibbleOrder[i], order {0,2,4,6,1,3,5,7}.
// So (word >> 4k) & 0x000F000F puts column 8j+2k in the low and 8j+2k+1 in
// the high 16-bit half: one lop3 with 0x43004300 then makes the bf16 pair
// (128 + u), and one bf16x2 subtract of 136 gives (q_{2k}, q_{2k+1}), four
// shifts per word and no per-element shuffles (the layout of the fast
// int4 -> bf16 converters). Words of a row are contiguous; scales are
// [rows, groups_per_row] row-major.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "base/result.h"

namespace grove::rollout {

inline constexpr int64_t kInt4GroupSize = 128;
inline constexpr std::array<int, 8> kInt4NibbleOrder = {0, 2, 4, 6, 1, 3, 5, 7};

struct Int4Matrix {
  int64_t rows = 0, cols = 0, group_size = kInt4GroupSize;
  std::vector<uint32_t> packed;  // rows * words_per_row()
  std::vector<float> scales;     // rows * groups_per_row()

  int64_t words_per_row() const { return (cols + 7) / 8; }
  int64_t groups_per_row() const { return (cols + group_size - 1) / group_size; }
  // q in [-7, 7] of element (r, c), read through the packing above.
  int Value(int64_t r, int64_t c) const;
  float Scale(int64_t r, int64_t c) const { return scales[r * groups_per_row() + c / group_size]; }
};

// InvalidArgument unless rows, cols >= 0 and group_size is a positive
// multiple of 8 (a group must start on a word boundary).
Result<Int4Matrix> QuantizeInt4Grouped(const float* w, int64_t rows, int64_t cols,
                                       int64_t group_size = kInt4GroupSize);
// out [rows, cols] = q * scale.
void DequantizeInt4(const Int4Matrix& m, float* out);

// Storage bits of an int4 [rows, cols] weight: packed words (row padding
// included) plus one fp32 scale per (row, group).
double Int4StorageBits(int64_t rows, int64_t cols, int64_t group_size = kInt4GroupSize);

}  // namespace grove::rollout
