// SumOfSquares against a long-double CPU sum on fresh random inputs.
// Tolerance: the kernel squares and adds in double (every product of two
// floats is exact in double; each add rounds by 2^-53 relative, a few
// thousand adds along any path), so the result is within 1e-12 relative of
// the exact sum, far tighter than any float accumulation could meet (a float
// sum of 10^6 terms is off by ~1e-4). Determinism: two runs give the same bits.
#include "kernels/sum_of_squares.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

double RunSumOfSquares(const DeviceBuffer<float>& x, int64_t count) {
  DeviceBuffer<double> result(1);
  DeviceBuffer<char> ws(SumOfSquaresWorkspaceBytes());
  const Status s = SumOfSquares(x.get(), count, result.get(), ws.get(), SumOfSquaresWorkspaceBytes(), nullptr);
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::vector<double> host;
  EXPECT_EQ(result.Download(&host), cudaSuccess);
  return host[0];
}

TEST(SumOfSquaresTest, MatchesLongDoubleSumAtManyLengths) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  // Lengths around every branch: empty, below one float4, not a multiple of
  // 4, one element per thread, and past the grid's 4-loads-per-iteration stride.
  for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{5}, int64_t{1023}, int64_t{262147},
                        int64_t{1048576 + 7}, int64_t{9 * 1048576 + 2}}) {
    SCOPED_TRACE("count " + std::to_string(count));
    // Gradients span magnitudes: a log-uniform scale per element.
    std::uniform_real_distribution<float> mag(-12.f, 4.f), sign(-1.f, 1.f);
    std::vector<float> x(count);
    long double exact = 0;
    for (float& v : x) {
      v = std::copysign(std::exp2(mag(rng)), sign(rng));
      exact += static_cast<long double>(v) * v;
    }
    DeviceBuffer<float> d(std::max<int64_t>(count, 1));
    if (count > 0) {
      GROVE_CUDA_OK(d.Upload(x));
    }
    const double got = RunSumOfSquares(d, count);
    EXPECT_NEAR(got, double(exact), 1e-12 * double(exact)) << "got " << got;
    EXPECT_EQ(got, RunSumOfSquares(d, count)) << "not deterministic";
  }
}

TEST(SumOfSquaresTest, NonFiniteInputGivesNonFiniteResult) {
  GROVE_SKIP_WITHOUT_GPU();
  std::vector<float> x(100003, 0.5f);
  DeviceBuffer<float> d(x.size());
  x[77777] = std::numeric_limits<float>::quiet_NaN();
  GROVE_CUDA_OK(d.Upload(x));
  EXPECT_TRUE(std::isnan(RunSumOfSquares(d, int64_t(x.size()))));
  x[77777] = 0.5f;
  x[100002] = -std::numeric_limits<float>::infinity();  // the scalar tail
  GROVE_CUDA_OK(d.Upload(x));
  EXPECT_TRUE(std::isinf(RunSumOfSquares(d, int64_t(x.size()))));
  // Squares that overflow float still sum in double: no spurious infinity.
  std::vector<float> big(64, 3e30f);
  DeviceBuffer<float> db(big.size());
  GROVE_CUDA_OK(db.Upload(big));
  const double b = double(big[0]), want = 64 * b * b;  // the float's exact value, squared in double
  EXPECT_NEAR(RunSumOfSquares(db, 64), want, 1e-12 * want);
}

// Several runs of one buffer (gaps between them not counted, tails not a
// multiple of 4) plus device partials (a kernel's own sums of squares), as
// the optimizer's norm reads the gradients the expert dW kernels did not sum.
TEST(SumOfSquaresTest, RunsAndPartialsMatchLongDoubleSum) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> mag(-12.f, 4.f), sign(-1.f, 1.f);
  std::vector<float> x(3 * 1048576 + 64);
  for (float& v : x) v = std::copysign(std::exp2(mag(rng)), sign(rng));
  std::vector<double> partials(700001);
  std::uniform_real_distribution<double> positive(0.0, 5.0);
  for (double& p : partials) p = positive(rng);
  DeviceBuffer<float> d(x.size());
  DeviceBuffer<double> dp(partials.size()), result(1);
  DeviceBuffer<char> ws(SumOfSquaresWorkspaceBytes());
  GROVE_CUDA_OK(d.Upload(x));
  GROVE_CUDA_OK(dp.Upload(partials));
  // Runs start 16-byte aligned (multiples of 4 elements).
  const std::vector<std::pair<int64_t, int64_t>> pieces = {{0, 5}, {8, 1023}, {2048, 1048576 + 3},
                                                           {2 * 1048576, 0}, {2 * 1048576 + 4, 1000000}};
  std::vector<SquaresRun> runs;
  long double exact = 0;
  for (const auto& [begin, count] : pieces) {
    runs.push_back({d.get() + begin, count});
    for (int64_t i = begin; i < begin + count; ++i) exact += static_cast<long double>(x[i]) * x[i];
  }
  for (double p : partials) exact += p;
  auto run = [&](int64_t partial_count) {
    const Status s = SumOfSquaresOfRuns(runs.data(), int(runs.size()), dp.get(), partial_count, result.get(),
                                        ws.get(), SumOfSquaresWorkspaceBytes(), nullptr);
    EXPECT_TRUE(s.ok()) << s.ToString();
    std::vector<double> host;
    EXPECT_EQ(result.Download(&host), cudaSuccess);
    return host[0];
  };
  const double got = run(int64_t(partials.size()));
  EXPECT_NEAR(got, double(exact), 1e-12 * double(exact));
  EXPECT_EQ(got, run(int64_t(partials.size()))) << "not deterministic";
  // One run and no partials: SumOfSquares' bits.
  runs = {{d.get(), int64_t(x.size())}};
  EXPECT_EQ(run(0), RunSumOfSquares(d, int64_t(x.size())));
}

TEST(SumOfSquaresTest, RejectsBadArguments) {
  GROVE_SKIP_WITHOUT_GPU();
  DeviceBuffer<float> x(16);
  DeviceBuffer<double> result(1);
  DeviceBuffer<char> ws(SumOfSquaresWorkspaceBytes());
  const size_t wsb = SumOfSquaresWorkspaceBytes();
  EXPECT_EQ(SumOfSquares(x.get(), -1, result.get(), ws.get(), wsb, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SumOfSquares(nullptr, 4, result.get(), ws.get(), wsb, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SumOfSquares(x.get(), 4, nullptr, ws.get(), wsb, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SumOfSquares(x.get() + 1, 4, result.get(), ws.get(), wsb, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SumOfSquares(x.get(), 4, result.get(), ws.get(), wsb - 8, nullptr).code(),
            StatusCode::kInvalidArgument);
  std::vector<SquaresRun> runs(kSumOfSquaresMaxRuns + 1, SquaresRun{x.get(), 4});
  EXPECT_EQ(SumOfSquaresOfRuns(runs.data(), int(runs.size()), nullptr, 0, result.get(), ws.get(), wsb, nullptr).code(),
            StatusCode::kInvalidArgument);
  runs = {{x.get(), 4}, {x.get() + 2, 4}};  // the second run misaligned
  EXPECT_EQ(SumOfSquaresOfRuns(runs.data(), 2, nullptr, 0, result.get(), ws.get(), wsb, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SumOfSquaresOfRuns(runs.data(), 1, nullptr, 3, result.get(), ws.get(), wsb, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SumOfSquaresOfRuns(runs.data(), -1, nullptr, 0, result.get(), ws.get(), wsb, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
