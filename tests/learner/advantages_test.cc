#include "learner/advantages.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace grove::learner {
namespace {

// Group [1, 0, 1, 1]: mean 0.75, deviations [.25, -.75, .25, .25], squares sum
// to 0.75; sample std sqrt(0.75/3) = 0.5, population std sqrt(0.75/4).
// Group [2, 2] has no spread and group [3] has one member: advantages 0.
TEST(Advantages, GrpoSampleStdByHand) {
  std::vector<float> r{1, 0, 1, 1, 2, 2, 3};
  std::vector<int64_t> g{4, 2, 1};
  AdvantageOptions o;
  o.eps = 0.0;
  auto a = GroupAdvantages(r, g, o);
  ASSERT_TRUE(a.ok()) << a.status();
  std::vector<float> want{0.5f, -1.5f, 0.5f, 0.5f, 0, 0, 0};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_FLOAT_EQ((*a)[i], want[i]) << i;

  o.eps = 1e-6;  // the default: divides by 0.5 + 1e-6
  a = GroupAdvantages(r, g, o);
  ASSERT_TRUE(a.ok());
  EXPECT_NEAR((*a)[1], -0.75 / (0.5 + 1e-6), 1e-7);
  EXPECT_EQ((*a)[4], 0.0f);
}

TEST(Advantages, PopulationStdAndDrGrpo) {
  std::vector<float> r{1, 0, 1, 1};
  std::vector<int64_t> g{4};
  AdvantageOptions o;
  o.eps = 0.0;
  o.std_kind = StdKind::kPopulation;
  auto a = GroupAdvantages(r, g, o);
  ASSERT_TRUE(a.ok());
  const double pop = std::sqrt(0.75 / 4);
  EXPECT_NEAR((*a)[0], 0.25 / pop, 1e-6);
  EXPECT_NEAR((*a)[1], -0.75 / pop, 1e-6);

  o.scale_by_std = false;  // Dr. GRPO
  a = GroupAdvantages(r, g, o);
  ASSERT_TRUE(a.ok());
  EXPECT_FLOAT_EQ((*a)[0], 0.25f);
  EXPECT_FLOAT_EQ((*a)[1], -0.75f);
}

// On random groups: every group's advantages sum to 0; with the population std
// their mean square is 1 (up to eps); with the sample std it is (G-1)/G.
TEST(Advantages, RandomGroupsAreCenteredAndScaled) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> size(2, 9);
  std::normal_distribution<float> reward(3.0f, 2.0f);
  std::vector<int64_t> groups;
  std::vector<float> r;
  for (int k = 0; k < 50; ++k) {
    groups.push_back(size(rng));
    for (int i = 0; i < groups.back(); ++i) r.push_back(reward(rng));
  }
  for (StdKind kind : {StdKind::kPopulation, StdKind::kSample}) {
    AdvantageOptions o;
    o.std_kind = kind;
    o.eps = 0.0;
    auto a = GroupAdvantages(r, groups, o);
    ASSERT_TRUE(a.ok());
    size_t begin = 0;
    for (int64_t n : groups) {
      double sum = 0, sq = 0;
      for (size_t i = begin; i < begin + n; ++i) {
        sum += (*a)[i];
        sq += (*a)[i] * (*a)[i];
      }
      EXPECT_NEAR(sum, 0.0, 1e-5);
      const double want = kind == StdKind::kPopulation ? 1.0 : (n - 1.0) / n;
      EXPECT_NEAR(sq / n, want, 1e-5);
      begin += n;
    }
  }
}

TEST(Advantages, RejectsBadInput) {
  std::vector<float> r{1, 0, 1};
  std::vector<int64_t> wrong_total{2, 2};
  EXPECT_EQ(GroupAdvantages(r, wrong_total, {}).status().code(), StatusCode::kInvalidArgument);
  std::vector<int64_t> zero{3, 0};
  EXPECT_FALSE(GroupAdvantages(r, zero, {}).ok());
  std::vector<int64_t> ok{3};
  r[1] = std::nanf("");
  auto bad = GroupAdvantages(r, ok, {});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("reward 1"), std::string::npos);
  r[1] = 0;
  AdvantageOptions neg;
  neg.eps = -1;
  EXPECT_FALSE(GroupAdvantages(r, ok, neg).ok());
  EXPECT_FALSE(GroupsWithEqualRewards(r, wrong_total).ok());
  EXPECT_FALSE(GroupsWithEqualRewards(r, ok, -0.1).ok());
}

// DAPO dynamic sampling: all-right, all-wrong and single-member groups are
// dropped; mixed groups stay; a tolerance absorbs float noise.
TEST(Advantages, DynamicSamplingFindsFlatGroups) {
  std::vector<float> r{1, 1, 1, 0, 1, 0, 0, 5, 0.3f, 0.3001f};
  std::vector<int64_t> g{3, 2, 2, 1, 2};
  auto flat = GroupsWithEqualRewards(r, g);
  ASSERT_TRUE(flat.ok());
  EXPECT_EQ(*flat, (std::vector<bool>{true, false, true, true, false}));
  flat = GroupsWithEqualRewards(r, g, 1e-3);
  ASSERT_TRUE(flat.ok());
  EXPECT_EQ(*flat, (std::vector<bool>{true, false, true, true, true}));
}

}  // namespace
}  // namespace grove::learner
