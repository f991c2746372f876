#include "rollout/int4_quantizer.h"

#include <bit>
#include <cfloat>
#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "rollout/precision_format.h"

namespace grove::rollout {
namespace {

std::vector<float> RandomRows(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0, 1);
  std::vector<float> w(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w[r * cols + c] = n(rng) * (0.01f + 0.3f * r);
  return w;
}

// Every element within half a step of its group's scale, the group scale is
// max|w| / 7 over exactly its columns (last group partial), q in [-7, 7].
void CheckBound(int64_t rows, int64_t cols, int64_t group, uint32_t seed) {
  std::vector<float> w = RandomRows(rows, cols, seed);
  Result<Int4Matrix> m = QuantizeInt4Grouped(w.data(), rows, cols, group);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->groups_per_row(), (cols + group - 1) / group);
  std::vector<float> dq(w.size());
  DequantizeInt4(*m, dq.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < m->groups_per_row(); ++g) {
      float amax = 0;
      for (int64_t c = g * group; c < std::min(cols, (g + 1) * group); ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      EXPECT_FLOAT_EQ(m->scales[r * m->groups_per_row() + g], amax / 7.0f) << r << "," << g;
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float s = m->Scale(r, c);
      EXPECT_LE(std::fabs(w[r * cols + c] - dq[r * cols + c]), s * (0.5f + 16 * FLT_EPSILON)) << r << "," << c;
      EXPECT_GE(m->Value(r, c), -7);
      EXPECT_LE(m->Value(r, c), 7);
      // And it is the nearest level: no other q is closer.
      const float x = w[r * cols + c] / s;
      EXPECT_LE(std::fabs(x - m->Value(r, c)), 0.5f + 1e-4f);
    }
}

TEST(Int4Quantizer, ErrorWithinHalfAStepPerGroup) { CheckBound(9, 384, 128, 1); }
TEST(Int4Quantizer, PartialLastGroup) { CheckBound(7, 300, 128, 2); }    // groups 128, 128, 44
TEST(Int4Quantizer, ColsNotMultipleOfEight) { CheckBound(5, 13, 128, 3); }  // one 13-wide group, padded word
TEST(Int4Quantizer, SmallGroups) { CheckBound(4, 77, 16, 4); }

TEST(Int4Quantizer, MaximaOfBothSignsAreExact) {
  std::vector<float> w = {0.7f, -0.7f, 0.1f, 0.35f, 0.0f, 0, 0, 0};
  Result<Int4Matrix> m = QuantizeInt4Grouped(w.data(), 1, 8);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->Value(0, 0), 7);
  EXPECT_EQ(m->Value(0, 1), -7);
  EXPECT_EQ(m->Value(0, 3), 4);  // 0.35 / 0.1 = 3.5: ties round to even (4)
  std::vector<float> dq(8);
  DequantizeInt4(*m, dq.data());
  EXPECT_FLOAT_EQ(dq[0], 0.7f);
  EXPECT_FLOAT_EQ(dq[1], -0.7f);
  EXPECT_EQ(dq[4], 0.0f);
}

TEST(Int4Quantizer, ZeroGroupStaysZero) {
  std::vector<float> w(20, 0.0f);
  w[19] = 3.0f;  // second group (size 16) non-zero
  Result<Int4Matrix> m = QuantizeInt4Grouped(w.data(), 1, 20, 16);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->scales[0], 0.0f);
  std::vector<float> dq(20);
  DequantizeInt4(*m, dq.data());
  for (int i = 0; i < 19; ++i) EXPECT_EQ(dq[i], 0.0f);
  EXPECT_FLOAT_EQ(dq[19], 3.0f);
}

// The documented nibble layout, decoded the way a kernel does: offset-binary
// nibbles, (word >> 4k) & 0x000F000F gives columns 2k (low half) and 2k+1
// (high half); padding nibbles are 8 (q = 0).
TEST(Int4Quantizer, InterleavedNibbleLayout) {
  const int64_t cols = 12;  // one full word and one half-padded word
  std::vector<float> w(cols);
  const int q[cols] = {-7, -5, -3, -1, 0, 1, 3, 7, 2, -2, 6, -6};
  for (int64_t c = 0; c < cols; ++c) w[c] = static_cast<float>(q[c]);
  Result<Int4Matrix> m = QuantizeInt4Grouped(w.data(), 1, cols);
  ASSERT_TRUE(m.ok());
  ASSERT_FLOAT_EQ(m->scales[0], 1.0f);
  ASSERT_EQ(m->packed.size(), 2u);
  for (int64_t j = 0; j < 2; ++j)
    for (int k = 0; k < 4; ++k) {
      const uint32_t pair = (m->packed[j] >> (4 * k)) & 0x000F000Fu;
      const int lo = static_cast<int>(pair & 0xF) - 8, hi = static_cast<int>(pair >> 16) - 8;
      const int64_t c0 = 8 * j + 2 * k;
      EXPECT_EQ(lo, c0 < cols ? q[c0] : 0) << "column " << c0;
      EXPECT_EQ(hi, c0 + 1 < cols ? q[c0 + 1] : 0) << "column " << c0 + 1;
    }
  // Nibble i of word 0 holds column kInt4NibbleOrder[i].
  for (int i = 0; i < 8; ++i)
    EXPECT_EQ(static_cast<int>((m->packed[0] >> (4 * i)) & 0xF) - 8, q[kInt4NibbleOrder[i]]);
}

TEST(Int4Quantizer, RejectsBadGroupSize) {
  std::vector<float> w(16, 1.0f);
  EXPECT_EQ(QuantizeInt4Grouped(w.data(), 1, 16, 12).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeInt4Grouped(w.data(), 1, 16, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeInt4Grouped(w.data(), -1, 16).status().code(), StatusCode::kInvalidArgument);
}

TEST(PrecisionFormat, StorageBitsIncludeScales) {
  // 64 x 256: int4 = 4 bits + 2 scales of 32 bits per 256-column row.
  EXPECT_DOUBLE_EQ(StorageBits(PrecisionFormat::kInt4, 64, 256) / (64 * 256), 4.0 + 64.0 / 256);
  EXPECT_DOUBLE_EQ(StorageBits(PrecisionFormat::kInt8, 64, 256) / (64 * 256), 8.0 + 32.0 / 256);
  EXPECT_DOUBLE_EQ(StorageBits(PrecisionFormat::kBF16, 64, 256) / (64 * 256), 16.0);
  // Partial group and row padding: 13 columns = 2 words + 1 scale per row.
  EXPECT_DOUBLE_EQ(StorageBits(PrecisionFormat::kInt4, 3, 13), 3 * 32.0 * 3);
}

TEST(PrecisionFormat, Bf16RoundsToNearestEven) {
  std::mt19937 rng(9);
  std::normal_distribution<float> n(0, 10);
  for (int i = 0; i < 1000; ++i) {
    const float x = n(rng), y = RoundToBf16(x);
    EXPECT_EQ(std::bit_cast<uint32_t>(y) & 0xFFFFu, 0u);
    EXPECT_LE(std::fabs(x - y), std::fabs(x) * std::ldexp(1.0f, -8));  // half an 8-bit-mantissa ulp
  }
  // Ties go to the even mantissa: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
  EXPECT_EQ(RoundToBf16(1.0f + std::ldexp(1.0f, -8)), 1.0f);
  EXPECT_EQ(RoundToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(RoundToBf16(NAN)));
  EXPECT_EQ(ParseFormat("int4").value(), PrecisionFormat::kInt4);
  EXPECT_FALSE(ParseFormat("int3").ok());
}

TEST(PrecisionFormat, QuantizeInPlaceAppliesChosenFormats) {
  std::vector<actors::TensorSpec> t = {{"a", {4, 200}, 0, 800}, {"b", {4, 200}, 800, 800}, {"n", {4}, 1600, 4}};
  std::vector<float> flat = RandomRows(1, 1604, 7);
  const std::vector<float> orig = flat;
  QuantizationReport rep = QuantizeInPlace(t, flat, [](const actors::TensorSpec& s) -> std::optional<PrecisionFormat> {
    if (s.name == "a") return PrecisionFormat::kInt4;
    if (s.name == "b") return PrecisionFormat::kBF16;
    return PrecisionFormat::kInt8;  // 1-D: must be ignored
  });
  std::vector<float> a(orig.begin(), orig.begin() + 800);
  RoundTripInPlace(PrecisionFormat::kInt4, a.data(), 4, 200);
  for (int i = 0; i < 800; ++i) EXPECT_EQ(flat[i], a[i]);
  for (int i = 800; i < 1600; ++i) EXPECT_EQ(flat[i], RoundToBf16(orig[i]));
  for (int i = 1600; i < 1604; ++i) EXPECT_EQ(flat[i], orig[i]);
  EXPECT_EQ(rep.tensors_quantized, 2);
  EXPECT_DOUBLE_EQ(rep.bits_per_weight,
                   (StorageBits(PrecisionFormat::kInt4, 4, 200) + 16.0 * 800 + 32.0 * 4) / 1604);
}

}  // namespace
}  // namespace grove::rollout
