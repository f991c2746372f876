// RMSNorm forward and backward against a double-precision CPU reference on
// fresh random bf16 inputs.
//
// Tolerances: the inputs are bf16 values the reference sees exactly; the
// kernels work in fp32 (sums of `hidden` squares or products: relative error
// ~hidden * 2^-24 at worst, ~1e-5 at hidden 8192) with rsqrtf (2 ulp). So:
// fp32 outputs (rstd, dweight) within 1e-5 relative plus the summation
// bound; bf16 outputs (y, dx) add one rounding, 2^-9 relative, so each
// element is held to 2^-8 of its magnitude plus 1e-5 of the magnitudes of
// the terms that cancel in it, and norm-wise within 5e-3.
#include "kernels/rmsnorm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

void CheckRmsNorm(int tokens, int hidden) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " tokens " + std::to_string(tokens) +
               " hidden " + std::to_string(hidden));
  std::mt19937_64 rng(seed);
  const float eps = 1e-6f;
  std::vector<__nv_bfloat16> x_bf, dy_bf;
  std::vector<double> x, dy;
  testing::RandomBf16(rng, size_t(tokens) * hidden, &x_bf, &x);
  testing::RandomBf16(rng, size_t(tokens) * hidden, &dy_bf, &dy);
  std::vector<float> w(hidden);
  std::uniform_real_distribution<float> wd(0.5f, 1.5f);
  for (float& v : w) v = wd(rng);

  // Reference.
  std::vector<double> y_ref(x.size()), rstd_ref(tokens), dx_ref(x.size()), dx_scale(x.size()),
      dw_ref(hidden, 0.0), dw_abs(hidden, 0.0);
  for (int t = 0; t < tokens; ++t) {
    const double* xr = &x[size_t(t) * hidden];
    const double* dyr = &dy[size_t(t) * hidden];
    double ss = 0;
    for (int j = 0; j < hidden; ++j) ss += xr[j] * xr[j];
    const double r = 1.0 / std::sqrt(ss / hidden + eps);
    rstd_ref[t] = r;
    double dot = 0;
    for (int j = 0; j < hidden; ++j) {
      y_ref[size_t(t) * hidden + j] = xr[j] * r * w[j];
      dot += dyr[j] * w[j] * xr[j] * r;
      dw_ref[j] += dyr[j] * xr[j] * r;
      dw_abs[j] += std::fabs(dyr[j] * xr[j] * r);
    }
    const double mean = dot / hidden;
    for (int j = 0; j < hidden; ++j) {
      dx_ref[size_t(t) * hidden + j] = r * (dyr[j] * w[j] - xr[j] * r * mean);
      dx_scale[size_t(t) * hidden + j] = r * (std::fabs(dyr[j] * w[j]) + std::fabs(xr[j] * r * mean));
    }
  }

  DeviceBuffer<__nv_bfloat16> d_x(x_bf.size()), d_dy(dy_bf.size()), d_y(x_bf.size()),
      d_dx(x_bf.size());
  DeviceBuffer<float> d_w(hidden), d_rstd(tokens), d_dw(hidden);
  DeviceBuffer<uint8_t> d_ws(RmsNormBackwardWorkspaceBytes(tokens, hidden));
  GROVE_CUDA_OK(d_x.Upload(x_bf));
  GROVE_CUDA_OK(d_dy.Upload(dy_bf));
  GROVE_CUDA_OK(d_w.Upload(w));
  GROVE_CUDA_OK(cudaMemset(d_y.get(), 0xFF, d_y.count() * 2));
  GROVE_CUDA_OK(cudaMemset(d_dx.get(), 0xFF, d_dx.count() * 2));
  GROVE_CUDA_OK(cudaMemset(d_dw.get(), 0xFF, d_dw.count() * 4));

  Status s = RmsNormForward(d_x.get(), d_w.get(), d_y.get(), d_rstd.get(), tokens, hidden, eps,
                            nullptr);
  ASSERT_TRUE(s.ok()) << s;
  s = RmsNormBackward(d_dy.get(), d_x.get(), d_w.get(), d_rstd.get(), d_dx.get(), d_dw.get(),
                      d_ws.get(), tokens, hidden, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  GROVE_CUDA_OK(cudaDeviceSynchronize());

  std::vector<__nv_bfloat16> y_bf, dx_bf;
  std::vector<float> rstd, dw;
  GROVE_CUDA_OK(d_y.Download(&y_bf));
  GROVE_CUDA_OK(d_dx.Download(&dx_bf));
  GROVE_CUDA_OK(d_rstd.Download(&rstd));
  GROVE_CUDA_OK(d_dw.Download(&dw));

  std::vector<double> y(y_bf.size()), dx(dx_bf.size());
  size_t bad_y = 0, bad_dx = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    y[i] = __bfloat162float(y_bf[i]);
    dx[i] = __bfloat162float(dx_bf[i]);
    if (!(std::fabs(y[i] - y_ref[i]) <= std::ldexp(1.0, -8) * std::fabs(y_ref[i]) + 1e-5 * std::fabs(y_ref[i]) + 1e-30)) ++bad_y;
    if (!(std::fabs(dx[i] - dx_ref[i]) <= std::ldexp(1.0, -8) * std::fabs(dx_ref[i]) + 1e-5 * dx_scale[i] + 1e-30)) ++bad_dx;
  }
  EXPECT_EQ(bad_y, 0u);
  EXPECT_EQ(bad_dx, 0u);
  EXPECT_LT(testing::RelativeError(y, y_ref), 5e-3);
  EXPECT_LT(testing::RelativeError(dx, dx_ref), 5e-3);
  for (int t = 0; t < tokens; ++t)
    ASSERT_NEAR(rstd[t], rstd_ref[t], 1e-5 * rstd_ref[t]) << "row " << t;
  for (int j = 0; j < hidden; ++j)
    ASSERT_NEAR(dw[j], dw_ref[j], 1e-5 * dw_abs[j] + tokens * std::ldexp(1.0, -23) * dw_abs[j])
        << "column " << j;
}

TEST(RmsNormTest, ModelWidth) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRmsNorm(1000, 1024);
}

TEST(RmsNormTest, OddTokenCountsAndWidths) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRmsNorm(1, 8);
  CheckRmsNorm(37, 264);
  CheckRmsNorm(3, 8192);  // more than 48 KB of per-warp partial sums
}

TEST(RmsNormTest, NoTokensGivesZeroWeightGradient) {
  GROVE_SKIP_WITHOUT_GPU();
  DeviceBuffer<float> w(64), dw(64);
  GROVE_CUDA_OK(cudaMemset(dw.get(), 0xFF, 64 * 4));
  ASSERT_TRUE(RmsNormBackward(nullptr, nullptr, w.get(), nullptr, nullptr, dw.get(), nullptr, 0,
                              64, nullptr).ok());
  std::vector<float> h;
  GROVE_CUDA_OK(dw.Download(&h));
  for (float v : h) EXPECT_EQ(v, 0.f);
}

TEST(RmsNormTest, RejectsBadShapes) {
  alignas(16) static __nv_bfloat16 buf[64];
  alignas(16) static float w[64];
  EXPECT_EQ(RmsNormForward(buf, w, buf, nullptr, 2, 12, 1e-6f, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(RmsNormForward(buf, w, buf, nullptr, 2, kRmsNormMaxHidden + 8, 1e-6f, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(RmsNormForward(buf, w, buf, nullptr, 2, 16, 0.f, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(RmsNormForward(buf + 1, w, buf, nullptr, 2, 16, 1e-6f, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
