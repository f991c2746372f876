// Finite-difference gradient checks in double precision.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <span>
#include <random>
#include <string>
#include <vector>

namespace grove::model::testing {

// Compares analytic[i] with the central difference of loss() in x[i] at
// `samples` random coordinates (all when samples >= x.size()).
// eps = 1e-5 in double: truncation error ~eps^2 and rounding ~1e-16/eps are
// both far below the 1e-7 + 1e-5 * |g| tolerance, while a wrong formula
// misses by O(|g|).
inline void CheckGradient(const std::string& what, std::span<double> x, std::span<const double> analytic,
                          const std::function<double()>& loss, size_t samples, std::mt19937_64& rng) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  std::vector<size_t> idx;
  if (samples >= x.size()) {
    for (size_t i = 0; i < x.size(); ++i) idx.push_back(i);
  } else {
    std::uniform_int_distribution<size_t> pick(0, x.size() - 1);
    for (size_t s = 0; s < samples; ++s) idx.push_back(pick(rng));
  }
  const double eps = 1e-5;
  for (size_t i : idx) {
    const double keep = x[i];
    x[i] = keep + eps;
    const double up = loss();
    x[i] = keep - eps;
    const double down = loss();
    x[i] = keep;
    const double fd = (up - down) / (2 * eps);
    EXPECT_NEAR(analytic[i], fd, 1e-7 + 1e-5 * std::fabs(fd)) << what << " coordinate " << i;
  }
}

inline void CheckGradient(const std::string& what, std::vector<double>* x, const std::vector<double>& analytic,
                          const std::function<double()>& loss, size_t samples, std::mt19937_64& rng) {
  CheckGradient(what, std::span<double>(*x), std::span<const double>(analytic), loss, samples, rng);
}

inline double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace grove::model::testing
