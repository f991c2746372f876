#include "model/sampling.h"

#include <gtest/gtest.h>

#include <cmath>

namespace grove::model {
namespace {

TEST(Sampler, MatchesTemperedSoftmax) {
  SamplingOptions o;
  o.temperature = 2.0;
  o.seed = 3;
  Sampler s(o, 0);
  const std::vector<double> logits = {1.0, 2.0, 0.0, -1.0};
  std::vector<double> p(4);
  double z = 0;
  for (int i = 0; i < 4; ++i) z += p[i] = std::exp(logits[i] / 2.0);
  std::vector<int> count(4, 0);
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++count[s.Sample(logits)];
  // Binomial std of a frequency is <= sqrt(0.25/n) = 0.0025; allow 4 sigma.
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(double(count[i]) / n, p[i] / z, 0.01) << i;
}

TEST(Sampler, TopKTopPAndGreedy) {
  const std::vector<double> logits = {0.5, 3.0, 2.9, -2.0, 1.0};
  SamplingOptions o;
  o.top_k = 2;
  Sampler k2(o, 1);
  for (int i = 0; i < 2000; ++i) {
    int t = k2.Sample(logits);
    EXPECT_TRUE(t == 1 || t == 2) << t;
  }
  o.top_k = 0;
  o.top_p = 0.3;  // the top token alone holds more than 0.3 of the mass
  Sampler p(o, 1);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(p.Sample(logits), 1);
  o.top_p = 1.0;
  o.temperature = 0.0;
  Sampler g(o, 1);
  EXPECT_EQ(g.Sample(logits), 1);
}

TEST(Sampler, SeededStreamsRepeat) {
  SamplingOptions o;
  o.seed = 99;
  Sampler a(o, 4), b(o, 4), c(o, 5);
  const std::vector<double> logits(10, 0.0);
  int same_ab = 0, same_ac = 0;
  for (int i = 0; i < 100; ++i) {
    int x = a.Sample(logits), y = b.Sample(logits), z = c.Sample(logits);
    same_ab += x == y;
    same_ac += x == z;
  }
  EXPECT_EQ(same_ab, 100);
  EXPECT_LT(same_ac, 40);
}

TEST(Sampler, ValidatesOptions) {
  SamplingOptions o;
  EXPECT_TRUE(ValidateSampling(o).ok());
  o.temperature = -1;
  EXPECT_FALSE(ValidateSampling(o).ok());
  o.temperature = 1;
  o.top_p = 1.5;
  EXPECT_FALSE(ValidateSampling(o).ok());
  o.top_p = 1;
  o.top_k = -3;
  EXPECT_FALSE(ValidateSampling(o).ok());
}

}  // namespace
}  // namespace grove::model
