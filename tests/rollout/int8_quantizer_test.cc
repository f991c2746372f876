#include "rollout/int8_quantizer.h"

#include <cmath>
#include <random>

#include <gtest/gtest.h>

namespace grove::rollout {
namespace {

TEST(Int8Quantizer, ErrorWithinHalfAStepPerRow) {
  std::mt19937 rng(123);
  std::normal_distribution<float> n(0, 1);
  const int64_t rows = 37, cols = 91;
  std::vector<float> w(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w[r * cols + c] = n(rng) * (0.01f + r);  // rows of varied range
  Int8Matrix m = QuantizeInt8PerRow(w.data(), rows, cols);
  std::vector<float> dq(w.size());
  DequantizeInt8(m, dq.data());
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
    EXPECT_FLOAT_EQ(m.scales[r], amax / 127.0f);
    for (int64_t c = 0; c < cols; ++c) {
      // Round-to-nearest: at most half a quantization step, plus float rounding.
      EXPECT_LE(std::fabs(w[r * cols + c] - dq[r * cols + c]), 0.5f * m.scales[r] * (1 + 1e-5f) + 1e-7f);
      EXPECT_LE(std::abs(int(m.q[r * cols + c])), 127);
    }
  }
}

TEST(Int8Quantizer, ZeroRowStaysZero) {
  std::vector<float> w = {0, 0, 0, 1, -2, 3};
  Int8Matrix m = QuantizeInt8PerRow(w.data(), 2, 3);
  std::vector<float> dq(6);
  DequantizeInt8(m, dq.data());
  EXPECT_EQ(dq[0], 0.f);
  EXPECT_EQ(dq[2], 0.f);
  EXPECT_FLOAT_EQ(dq[5], 3.f);  // the row maximum is exact
}

TEST(Int8Quantizer, InPlaceSkipsEmbeddingsRouterAndNorms) {
  std::vector<actors::TensorSpec> t = {{"embed.weight", {4, 8}, 0, 32},
                                       {"layers.0.moe.router", {2, 8}, 32, 16},
                                       {"layers.0.attn_norm", {8}, 48, 8},
                                       {"layers.0.attn.wq", {8, 8}, 56, 64}};
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> flat(120);
  for (float& x : flat) x = u(rng);
  std::vector<float> orig = flat;
  QuantizationReport rep = QuantizeInt8InPlace(t, flat);
  EXPECT_EQ(rep.tensors_quantized, 1);
  EXPECT_EQ(rep.params_quantized, 64);
  EXPECT_EQ(rep.params_total, 120);
  for (int i = 0; i < 56; ++i) EXPECT_EQ(flat[i], orig[i]) << i;
  int changed = 0;
  for (int i = 56; i < 120; ++i) changed += flat[i] != orig[i];
  EXPECT_GT(changed, 32);
  EXPECT_GT(rep.rel_l2_error, 0);
  EXPECT_LT(rep.rel_l2_error, 0.02);  // ~ step/sqrt(12) relative to a uniform row
  EXPECT_NEAR(rep.bits_per_weight, (56 * 32.0 + 64 * 8 + 8 * 32) / 120, 1e-9);
}

}  // namespace
}  // namespace grove::rollout
