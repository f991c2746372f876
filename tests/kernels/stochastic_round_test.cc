// kernels/stochastic_round.h on the host (the device compiles the same
// functions). Unbiasedness is checked exactly: over all 2^16 random
// values, x rounds up exactly (its dropped 16 bits) times, so the mean of
// the rounded values is x itself.
#include "kernels/stochastic_round.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>

namespace grove::kernels {
namespace {

uint64_t FreshSeed() { return (uint64_t{std::random_device{}()} << 32) | std::random_device{}(); }

// Round to nearest, ties to even, in double: the reference for
// Bf16RoundNearest on finite values.
float ReferenceNearest(float x) {
  const uint32_t bits = FloatBits(x);
  const float down = FloatFromBits(bits & 0xffff0000u);
  const float up = FloatFromBits((bits & 0xffff0000u) + 0x10000u);  // the next magnitude
  // Past the largest bf16 the next magnitude is 2^128 (IEEE rounds to
  // infinity from beyond the midpoint to it).
  const double up_value = std::isinf(up) ? std::copysign(std::ldexp(1.0, 128), x) : double(up);
  const double dd = std::abs(double(x) - down), du = std::abs(up_value - x);
  if (dd < du) return down;
  if (du < dd) return up;
  return ((bits >> 16) & 1u) ? up : down;
}

TEST(StochasticRound, RoundsUpExactlyTheDroppedFractionOfTheTime) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int trial = 0; trial < 64; ++trial) {
    const float x = nd(rng) * std::ldexp(1.f, int(rng() % 60) - 30);
    const uint32_t bits = FloatBits(x);
    const uint16_t down = uint16_t(bits >> 16);
    const uint32_t dropped = bits & 0xffffu;
    uint32_t ups = 0;
    double sum = 0;
    for (uint32_t r = 0; r < 65536; ++r) {
      const uint16_t b = Bf16StochasticRound(x, r);
      ASSERT_TRUE(b == down || b == uint16_t(down + 1)) << x;
      ups += b != down;
      sum += Bf16BitsToFloat(b);
    }
    EXPECT_EQ(ups, dropped) << x;
    // The mean over all r is x exactly (up to the double sum's rounding).
    EXPECT_NEAR(sum / 65536, double(x), 1e-12 * std::abs(double(x))) << x;
  }
}

TEST(StochasticRound, KeepsExactValuesAndSpecials) {
  for (float x : {0.f, -0.f, 1.f, -2.5f, 3.0517578125e-5f, std::numeric_limits<float>::min()}) {
    for (uint32_t r : {0u, 1u, 0x8000u, 0xffffu, 0xdeadbeefu})
      EXPECT_EQ(Bf16BitsToFloat(Bf16StochasticRound(x, r)), x) << x << " r " << r;
    EXPECT_EQ(Bf16BitsToFloat(Bf16RoundNearest(x)), x);
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (uint32_t r : {0u, 0xffffu}) {
    EXPECT_EQ(Bf16BitsToFloat(Bf16StochasticRound(inf, r)), inf);
    EXPECT_EQ(Bf16BitsToFloat(Bf16StochasticRound(-inf, r)), -inf);
    // A NaN whose payload sits only in the dropped bits stays a NaN.
    EXPECT_TRUE(std::isnan(Bf16BitsToFloat(Bf16StochasticRound(FloatFromBits(0x7f800001u), r))));
  }
  EXPECT_EQ(Bf16BitsToFloat(Bf16RoundNearest(inf)), inf);
  EXPECT_TRUE(std::isnan(Bf16BitsToFloat(Bf16RoundNearest(std::nanf("")))));
  EXPECT_TRUE(std::isnan(Bf16BitsToFloat(Bf16RoundNearest(FloatFromBits(0xff800001u)))));
}

TEST(StochasticRound, NearestMatchesReferenceIncludingTies) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = uint32_t(rng());
    if ((bits & 0x7f800000u) == 0x7f800000u) continue;                 // specials above
    if (i % 4 == 0) bits = (bits & 0xffff0000u) | 0x8000u;             // an exact tie
    const float x = FloatFromBits(bits);
    ASSERT_EQ(Bf16BitsToFloat(Bf16RoundNearest(x)), ReferenceNearest(x)) << std::hex << bits;
  }
}

// Why the moments need it: 0.999 v, the second moment's decay with a zero
// gradient, rounds back to v to nearest for every v (the change is under
// half an ulp), so v would never decay.
TEST(StochasticRound, NearestWouldFreezeTheSecondMomentsDecay) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> u(1.f, 2.f);
  for (int i = 0; i < 1000; ++i) {
    const float v = Bf16BitsToFloat(Bf16RoundNearest(u(rng) * 1e-6f));
    EXPECT_EQ(Bf16BitsToFloat(Bf16RoundNearest(0.999f * v)), v);
  }
}

// The random bits: a pure function of (index, step), 16-bit halves spread
// evenly (each field's mean within 5 standard errors of 2^15 - 0.5 over
// 2^18 indices) and uncorrelated between neighbouring indices and steps.
TEST(StochasticRound, BitsAreAFunctionOfIndexAndStepAndLookUniform) {
  const int n = 1 << 18;
  for (int64_t step : {int64_t{1}, int64_t{2}, int64_t{1000003}}) {
    for (uint64_t high : {uint64_t{0}, uint64_t{1}}) {
      const uint32_t key = StochasticRoundStepKey(step, high);
      EXPECT_EQ(key, StochasticRoundStepKey(step, high));
      double lo_sum = 0, hi_sum = 0, same_as_next = 0, same_as_next_step = 0;
      const uint32_t next_key = StochasticRoundStepKey(step + 1, high);
      for (int i = 0; i < n; ++i) {
        const uint64_t index = (high << 32) | uint64_t(i);
        const uint32_t r = StochasticRoundBits(key, index);
        lo_sum += r & 0xffffu;
        hi_sum += r >> 16;
        same_as_next += (r & 0xffffu) == (StochasticRoundBits(key, index + 1) & 0xffffu);
        same_as_next_step += (r & 0xffffu) == (StochasticRoundBits(next_key, index) & 0xffffu);
      }
      const double mean = 32767.5, se = 65536 / std::sqrt(12.0 * n);
      EXPECT_NEAR(lo_sum / n, mean, 5 * se);
      EXPECT_NEAR(hi_sum / n, mean, 5 * se);
      // Equal 16-bit fields happen with probability 2^-16: ~4 of 2^18.
      EXPECT_LT(same_as_next, 40);
      EXPECT_LT(same_as_next_step, 40);
    }
  }
}

}  // namespace
}  // namespace grove::kernels
