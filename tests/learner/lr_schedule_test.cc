#include "learner/lr_schedule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

namespace grove::learner {
namespace {

TEST(LrSchedule, WarmupThenConstant) {
  auto s = LrSchedule::Create({1e-3, 10, LrDecay::kConstant, 0, 0.0});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_DOUBLE_EQ(s->At(0), 1e-4);  // the first step already moves
  EXPECT_DOUBLE_EQ(s->At(4), 5e-4);
  EXPECT_DOUBLE_EQ(s->At(9), 1e-3);  // last warm-up step reaches the peak
  EXPECT_DOUBLE_EQ(s->At(10), 1e-3);
  EXPECT_DOUBLE_EQ(s->At(100000), 1e-3);
  EXPECT_DOUBLE_EQ(s->At(-3), 1e-4);
  auto none = LrSchedule::Create({2e-5, 0, LrDecay::kConstant, 0, 0.0});
  ASSERT_TRUE(none.ok());
  EXPECT_DOUBLE_EQ(none->At(0), 2e-5);
}

// Warm-up 10, cosine over steps 10..110 from 1e-3 to 1e-5:
// at 10 the peak, at 35 (quarter) floor + span*(1+cos(pi/4))/2, at 60 the
// midpoint, at 110 and after the floor.
TEST(LrSchedule, WarmupThenCosineToFloor) {
  const double peak = 1e-3, floor = 1e-5;
  auto s = LrSchedule::Create({peak, 10, LrDecay::kCosine, 110, floor});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_DOUBLE_EQ(s->At(0), 1e-4);
  EXPECT_DOUBLE_EQ(s->At(10), peak);
  EXPECT_NEAR(s->At(35), floor + (peak - floor) * (1 + std::cos(std::numbers::pi / 4)) / 2, 1e-15);
  EXPECT_NEAR(s->At(60), (peak + floor) / 2, 1e-15);
  EXPECT_NEAR(s->At(110), floor, 1e-15);
  EXPECT_NEAR(s->At(1000), floor, 1e-15);
  for (int k = 10; k < 110; ++k) EXPECT_GE(s->At(k), s->At(k + 1)) << k;  // monotone decay
}

TEST(LrSchedule, RejectsBadOptions) {
  EXPECT_FALSE(LrSchedule::Create({0.0, 0, LrDecay::kConstant, 0, 0.0}).ok());
  EXPECT_FALSE(LrSchedule::Create({1e-3, -1, LrDecay::kConstant, 0, 0.0}).ok());
  EXPECT_FALSE(LrSchedule::Create({1e-3, 10, LrDecay::kCosine, 10, 0.0}).ok());
  EXPECT_FALSE(LrSchedule::Create({1e-3, 0, LrDecay::kCosine, 10, 2e-3}).ok());
  EXPECT_FALSE(ParseLrDecay("linear").ok());
  EXPECT_EQ(*ParseLrDecay("cosine"), LrDecay::kCosine);
}

}  // namespace
}  // namespace grove::learner
