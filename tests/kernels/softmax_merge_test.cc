// MergeSoftmaxStates on the CPU (the same function PagedAttention's warps
// and PagedAttentionSplit's combine call): random scores and values split
// into consecutive chunks, each chunk's state built by the kernels' online
// update (fp32), merged, compared with a direct double softmax.
#include "kernels/softmax_merge.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace grove::kernels {
namespace {

struct State {
  float m = -INFINITY, l = 0.f, acc = 0.f;
};

// The kernels' per-key update (AttendKeys in kernels/paged_kv.cu).
void Update(State& st, float s, float v) {
  const float m_new = std::fmax(st.m, s);
  const float corr = std::exp(st.m - m_new), p = std::exp(s - m_new);
  st.l = st.l * corr + p;
  st.acc = st.acc * corr + p * v;
  st.m = m_new;
}

TEST(SoftmaxMerge, ChunkedStatesMatchTheDirectSoftmax) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int trial = 0; trial < 200; ++trial) {
    const int keys = 1 + int(rng() % 500), chunk = 1 + int(rng() % 80);
    const float spread = 1.f + float(rng() % 20);  // scores up to ~+-60: exp would overflow without the max
    std::vector<float> s(keys), v(keys);
    for (int j = 0; j < keys; ++j) {
      s[j] = spread * nd(rng);
      v[j] = nd(rng);
    }
    const int chunks = (keys + chunk - 1) / chunk + 2;  // two trailing empty states (a skipped chunk)
    std::vector<float> m(chunks, -INFINITY), l(chunks, 0.f), acc(chunks, 0.f);
    for (int c = 0; c * chunk < keys; ++c) {
      State st;
      for (int j = c * chunk; j < std::min(keys, (c + 1) * chunk); ++j) Update(st, s[j], v[j]);
      m[c] = st.m;
      l[c] = st.l;
      acc[c] = st.acc;
    }
    float M, num, den;
    MergeSoftmaxStates(chunks, m.data(), l.data(), acc.data(), 1, 1, &M, &num, &den);
    double dm = -1e300, dl = 0, dacc = 0;
    for (float x : s) dm = std::max(dm, double(x));
    for (int j = 0; j < keys; ++j) {
      dl += std::exp(double(s[j]) - dm);
      dacc += std::exp(double(s[j]) - dm) * v[j];
    }
    // The max is exact (a max of floats). den and num come from <= keys fp32
    // additions and rescalings, each rounding by <= 2^-24 of a partial sum
    // bounded by the final sum of |terms|, and exps within ~2 ulps: a
    // worst-case error of keys * 2^-22 of sum |terms| (2^-21 with margin).
    // The output's error is then below keys * 2^-20 * max |v| (num's error
    // over den, plus out times den's relative error).
    double vmax = 0;
    for (float x : v) vmax = std::max(vmax, double(std::fabs(x)));
    ASSERT_EQ(M, float(dm)) << "trial " << trial;
    ASSERT_GT(den, 0.f);
    EXPECT_NEAR(den, dl, dl * keys * std::ldexp(1.0, -21)) << "trial " << trial;
    EXPECT_NEAR(num / den, dacc / dl, keys * std::ldexp(1.0, -20) * vmax)
        << "trial " << trial << " keys " << keys << " chunk " << chunk;
  }
}

TEST(SoftmaxMerge, AllEmptyStatesGiveZeroDenominator) {
  const float m[3] = {-INFINITY, -INFINITY, -INFINITY}, l[3] = {0, 0, 0}, acc[3] = {0, 0, 0};
  float M, num, den;
  MergeSoftmaxStates(3, m, l, acc, 1, 1, &M, &num, &den);
  EXPECT_EQ(den, 0.f);
  EXPECT_EQ(num, 0.f);
}

TEST(SoftmaxMerge, StridesSelectTheStates) {
  // Two states interleaved with junk: stride 2 must read only the even entries.
  const float m[4] = {1.f, 1e9f, 3.f, 1e9f}, l[4] = {2.f, 1e9f, 1.f, 1e9f}, acc[8] = {4.f, 0, 1e9f, 0, 2.f, 0, 1e9f, 0};
  float M, num, den;
  MergeSoftmaxStates(2, m, l, acc, 2, 4, &M, &num, &den);
  EXPECT_EQ(M, 3.f);
  EXPECT_FLOAT_EQ(den, 2.f * std::exp(-2.f) + 1.f);
  EXPECT_FLOAT_EQ(num, 4.f * std::exp(-2.f) + 2.f);
}

}  // namespace
}  // namespace grove::kernels
