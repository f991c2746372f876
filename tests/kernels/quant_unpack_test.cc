// The int4 / int8 unpack recipes of kernels/quant_unpack.h, run through their
// host twins of lop3 / prmt, against rollout/'s quantizers: every nibble value
// at every position, every int8 byte at every position. Runs without a GPU;
// the GPU test (quant_kernel_test.cc) checks the device instructions give the
// same bits as these twins.
#include "kernels/quant_unpack.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "rollout/int4_quantizer.h"
#include "rollout/int8_quantizer.h"

namespace grove::kernels {
namespace {

TEST(Lop3Host, MatchesTheBooleanFunctionOfItsTruthTable) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 1000; ++trial) {
    const uint32_t a = rng(), b = rng(), c = rng();
    EXPECT_EQ(Lop3Host(kLop3AndOr, a, b, c), (a & b) | c);
    EXPECT_EQ(Lop3Host(0x96, a, b, c), a ^ b ^ c);
    EXPECT_EQ(Lop3Host(0xF0, a, b, c), a);
    EXPECT_EQ(Lop3Host(0x80, a, b, c), a & b & c);
  }
}

TEST(PrmtHost, SelectsAndSignReplicatesBytes) {
  EXPECT_EQ(PrmtHost(0x33221100u, 0x77665544u, 0x3210u), 0x33221100u);
  EXPECT_EQ(PrmtHost(0x33221100u, 0x77665544u, 0x7654u), 0x77665544u);
  EXPECT_EQ(PrmtHost(0x33221100u, 0x77665544u, 0x0415u), 0x00441155u);
  // Bit 3 of a selector nibble: the selected byte's sign, replicated.
  EXPECT_EQ(PrmtHost(0x000080FFu, 0u, 0x4449u), 0x000000FFu);
  EXPECT_EQ(PrmtHost(0x0000807Fu, 0u, 0x4448u), 0x00000000u);
}

// The word of 8 columns whose column c holds u = us[c] (offset-binary), by
// the quantizer's definition of the layout (nibble i holds column
// kInt4NibbleOrder[i]).
uint32_t PackWord(const int (&us)[8]) {
  uint32_t word = 0;
  for (int i = 0; i < 8; ++i) word |= static_cast<uint32_t>(us[rollout::kInt4NibbleOrder[i]]) << (4 * i);
  return word;
}

void ExpectWordMatchesValue(uint32_t word) {
  rollout::Int4Matrix m;
  m.rows = 1;
  m.cols = 8;
  m.packed = {word};
  m.scales = {1.f};
  float q[8];
  Int4WordToFloats(word, q);
  uint32_t pairs[4];
  Int4WordToBf16Pairs(word, pairs);
  for (int c = 0; c < 8; ++c) {
    EXPECT_EQ(q[c], static_cast<float>(m.Value(0, c))) << "word " << std::hex << word << " column " << c;
    const float from_pair = c % 2 == 0 ? Bf16LowToFloat(pairs[c / 2]) : Bf16HighToFloat(pairs[c / 2]);
    EXPECT_EQ(from_pair, q[c]);
  }
}

TEST(Int4Unpack, EveryNibbleValueAtEveryColumn) {
  std::mt19937 rng(11);
  for (int col = 0; col < 8; ++col)
    for (int u = 0; u < 16; ++u)
      for (int trial = 0; trial < 16; ++trial) {
        int us[8];
        for (int c = 0; c < 8; ++c) us[c] = static_cast<int>(rng() % 16);
        us[col] = u;
        const uint32_t word = PackWord(us);
        ExpectWordMatchesValue(word);
        float q[8];
        Int4WordToFloats(word, q);
        EXPECT_EQ(q[col], static_cast<float>(u - 8));
      }
}

TEST(Int4Unpack, EveryPairOfNibblesSharingALop3) {
  // Pair k's two columns (2k, 2k+1) come from one lop3: all 256 combinations.
  for (int k = 0; k < 4; ++k)
    for (int lo = 0; lo < 16; ++lo)
      for (int hi = 0; hi < 16; ++hi) {
        int us[8] = {8, 8, 8, 8, 8, 8, 8, 8};
        us[2 * k] = lo;
        us[2 * k + 1] = hi;
        ExpectWordMatchesValue(PackWord(us));
      }
}

TEST(Int4Unpack, QuantizedMatrixRoundTripsThroughTheRecipe) {
  std::mt19937 rng(13);
  std::normal_distribution<float> dist(0.f, 0.05f);
  const int64_t rows = 8, cols = 384;
  std::vector<float> w(rows * cols);
  for (auto& v : w) v = dist(rng);
  for (int64_t c = 0; c < 128; ++c) w[3 * cols + c] = 0.f;  // an all-zero group
  auto m = rollout::QuantizeInt4Grouped(w.data(), rows, cols);
  ASSERT_TRUE(m.ok());
  std::vector<float> dq(rows * cols);
  rollout::DequantizeInt4(*m, dq.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < m->words_per_row(); ++j) {
      float q[8];
      Int4WordToFloats(m->packed[r * m->words_per_row() + j], q);
      for (int e = 0; e < 8; ++e) {
        const int64_t c = 8 * j + e;
        EXPECT_EQ(q[e] * m->Scale(r, c), dq[r * cols + c]) << r << "," << c;
      }
    }
}

TEST(Int8Unpack, EveryByteValueAtEveryPosition) {
  for (int pos = 0; pos < 4; ++pos)
    for (int v = -128; v <= 127; ++v) {
      const uint32_t filler = 0x5AC3A5F0u;  // other bytes: arbitrary, must not leak in
      const uint32_t word = (filler & ~(0xFFu << (8 * pos))) | (static_cast<uint32_t>(static_cast<uint8_t>(v)) << (8 * pos));
      EXPECT_EQ(Int8ByteToFloat(word, pos), static_cast<float>(v)) << "pos " << pos;
      float q[4];
      Int8WordToFloats(word, q);
      EXPECT_EQ(q[pos], static_cast<float>(v));
    }
}

TEST(Int8Unpack, QuantizedMatrixRoundTripsThroughTheRecipe) {
  std::mt19937 rng(17);
  std::normal_distribution<float> dist(0.f, 1.f);
  const int64_t rows = 4, cols = 64;
  std::vector<float> w(rows * cols);
  for (auto& v : w) v = dist(rng);
  const rollout::Int8Matrix m = rollout::QuantizeInt8PerRow(w.data(), rows, cols);
  std::vector<float> dq(rows * cols);
  rollout::DequantizeInt8(m, dq.data());
  for (int64_t i = 0; i < rows * cols; i += 4) {
    uint32_t word;
    std::memcpy(&word, m.q.data() + i, 4);
    float q[4];
    Int8WordToFloats(word, q);
    for (int e = 0; e < 4; ++e) EXPECT_EQ(q[e] * m.scales[(i + e) / cols], dq[i + e]);
  }
}

TEST(Bf16Unpack, WordsGiveTheirHalvesInColumnOrder) {
  const uint32_t words[4] = {0x3F80C000u, 0x00008000u, 0x7F804000u, 0x3C003E80u};
  float v[8];
  Bf16WordsToFloats(words, v);
  const float expect[8] = {-2.f, 1.f, -0.f, 0.f, 2.f, INFINITY, 0.25f, 0.0078125f};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(v[i], expect[i]) << i;
}

}  // namespace
}  // namespace grove::kernels
