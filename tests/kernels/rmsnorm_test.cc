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
#include <cstring>
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

// RmsNormBackwardResidual against a double reference on fresh random
// inputs: dy fp32 in [-1, 1], x bf16, rstd given (the float of the double
// rstd, which the reference then uses too, so only the backward is under
// test), dres and grad_w pre-filled with random values.
//
// Tolerances: every output is fp32 and never rounded to bf16 in between, so
// the error is the fp32 arithmetic's: dx = rstd * (dy*w - xhat*mean) with
// mean a sum of `hidden` three-rounding products added at most ~50 deep
// (32 per thread, 5 shuffle levels, up to 8 warps), the residual add one
// more rounding: well under 1e-5 (~170 ulps) of the sum of the magnitudes
// that meet in the element. Rounding dy or dx to bf16 (2^-9) would fail it.
// The weight gradient adds two-rounding products ~100 deep at these shapes
// (the rows a thread keeps, 8 row groups, ~1056 / 32 + 32 across blocks):
// also within 1e-5 of the summed magnitudes. dres_bf16 must be exactly the
// bf16 of the fp32 dres the kernel wrote.
void CheckRmsNormResidual(int tokens, int hidden, bool accumulate_residual,
                          bool accumulate_weight_grad) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " tokens " + std::to_string(tokens) +
               " hidden " + std::to_string(hidden) + " accumulate residual " +
               std::to_string(accumulate_residual) + " weight grad " +
               std::to_string(accumulate_weight_grad));
  std::mt19937_64 rng(seed);
  const size_t n = size_t(tokens) * hidden;
  std::vector<__nv_bfloat16> x_bf;
  std::vector<double> x;
  testing::RandomBf16(rng, n, &x_bf, &x);
  std::uniform_real_distribution<float> unit(-1.f, 1.f), wd(0.5f, 1.5f);
  std::vector<float> dy(n), dres0(n), w(hidden), gw0(hidden), rstd(tokens);
  for (float& v : dy) v = unit(rng);
  for (float& v : dres0) v = unit(rng);
  for (float& v : w) v = wd(rng);
  for (float& v : gw0) v = unit(rng);
  for (int t = 0; t < tokens; ++t) {
    double ss = 0;
    for (int j = 0; j < hidden; ++j) ss += x[size_t(t) * hidden + j] * x[size_t(t) * hidden + j];
    rstd[t] = float(1.0 / std::sqrt(ss / hidden + 1e-6));
  }

  std::vector<double> dres_ref(n), dres_scale(n), gw_ref(hidden), gw_scale(hidden);
  for (int j = 0; j < hidden; ++j) {
    gw_ref[j] = accumulate_weight_grad ? gw0[j] : 0.0;
    gw_scale[j] = std::fabs(gw_ref[j]);
  }
  for (int t = 0; t < tokens; ++t) {
    const size_t o = size_t(t) * hidden;
    const double r = rstd[t];
    double dot = 0, dot_abs = 0;
    for (int j = 0; j < hidden; ++j) {
      const double term = double(dy[o + j]) * w[j] * x[o + j] * r;
      dot += term;
      dot_abs += std::fabs(term);
      gw_ref[j] += double(dy[o + j]) * x[o + j] * r;
      gw_scale[j] += std::fabs(double(dy[o + j]) * x[o + j] * r);
    }
    const double mean = dot / hidden, mean_abs = dot_abs / hidden;
    for (int j = 0; j < hidden; ++j) {
      const double base = accumulate_residual ? dres0[o + j] : 0.0;
      dres_ref[o + j] = base + r * (double(dy[o + j]) * w[j] - x[o + j] * r * mean);
      dres_scale[o + j] = std::fabs(base) + r * (std::fabs(double(dy[o + j]) * w[j]) +
                                                 std::fabs(x[o + j]) * r * mean_abs);
    }
  }

  DeviceBuffer<__nv_bfloat16> d_x(n), d_dres_bf(n);
  DeviceBuffer<float> d_dy(n), d_dres(n), d_w(hidden), d_rstd(tokens), d_gw(hidden);
  DeviceBuffer<uint8_t> d_ws(RmsNormBackwardWorkspaceBytes(tokens, hidden));
  GROVE_CUDA_OK(d_x.Upload(x_bf));
  GROVE_CUDA_OK(d_dy.Upload(dy));
  GROVE_CUDA_OK(d_w.Upload(w));
  GROVE_CUDA_OK(d_rstd.Upload(rstd));
  RmsNormBackwardResidualArgs a;
  a.dy = d_dy.get();
  a.x = d_x.get();
  a.weight = d_w.get();
  a.rstd = d_rstd.get();
  a.dres = d_dres.get();
  a.dres_bf16 = d_dres_bf.get();
  a.grad_w = d_gw.get();
  a.workspace = d_ws.get();
  a.tokens = tokens;
  a.hidden = hidden;
  a.accumulate_residual = accumulate_residual;
  a.accumulate_weight_grad = accumulate_weight_grad;
  // Twice from the same inputs: the weight gradient must repeat bit for bit.
  std::vector<float> gw_runs[2];
  std::vector<float> dres;
  std::vector<__nv_bfloat16> dres_bf;
  for (std::vector<float>& gw : gw_runs) {
    GROVE_CUDA_OK(d_dres.Upload(dres0));
    GROVE_CUDA_OK(d_gw.Upload(gw0));
    GROVE_CUDA_OK(cudaMemset(d_dres_bf.get(), 0xFF, n * 2));
    const Status s = RmsNormBackwardResidual(a, nullptr);
    ASSERT_TRUE(s.ok()) << s;
    GROVE_CUDA_OK(cudaDeviceSynchronize());
    GROVE_CUDA_OK(d_gw.Download(&gw));
  }
  GROVE_CUDA_OK(d_dres.Download(&dres));
  GROVE_CUDA_OK(d_dres_bf.Download(&dres_bf));

  size_t bad = 0, bad_bf = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!(std::fabs(dres[i] - dres_ref[i]) <= 1e-5 * dres_scale[i] + 1e-30)) {
      if (bad++ < 5) ADD_FAILURE() << "dres[" << i << "] " << dres[i] << " want " << dres_ref[i];
    }
    const __nv_bfloat16 want = __float2bfloat16(dres[i]);
    if (std::memcmp(&want, &dres_bf[i], sizeof want) != 0) ++bad_bf;
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(bad_bf, 0u) << "dres_bf16 is not the bf16 of dres";
  for (int j = 0; j < hidden; ++j) {
    ASSERT_NEAR(gw_runs[0][j], gw_ref[j], 1e-5 * gw_scale[j]) << "column " << j;
    ASSERT_EQ(std::memcmp(&gw_runs[0][j], &gw_runs[1][j], sizeof(float)), 0)
        << "column " << j << " differs between runs";
  }
}

TEST(RmsNormTest, BackwardResidualShapesAndModes) {
  GROVE_SKIP_WITHOUT_GPU();
  // 64 and 1024 one warp per row, 1032 two, 4096 four, 8192 eight.
  for (int hidden : {64, 1024, 1032, 4096})
    for (int tokens : {1, 7, 300, 4096})
      for (bool acc_res : {false, true})
        for (bool acc_w : {false, true}) CheckRmsNormResidual(tokens, hidden, acc_res, acc_w);
  CheckRmsNormResidual(5, kRmsNormMaxHidden, true, true);
  CheckRmsNormResidual(37, kRmsNormMaxHidden, false, false);
}

TEST(RmsNormTest, BackwardResidualNoTokens) {
  GROVE_SKIP_WITHOUT_GPU();
  DeviceBuffer<float> gw(64);
  const std::vector<float> ones(64, 1.f);
  RmsNormBackwardResidualArgs a;
  a.grad_w = gw.get();
  a.hidden = 64;
  GROVE_CUDA_OK(gw.Upload(ones));
  a.accumulate_weight_grad = true;  // nothing to add
  ASSERT_TRUE(RmsNormBackwardResidual(a, nullptr).ok());
  std::vector<float> h;
  GROVE_CUDA_OK(gw.Download(&h));
  for (float v : h) EXPECT_EQ(v, 1.f);
  a.accumulate_weight_grad = false;  // the gradient of no rows
  ASSERT_TRUE(RmsNormBackwardResidual(a, nullptr).ok());
  GROVE_CUDA_OK(gw.Download(&h));
  for (float v : h) EXPECT_EQ(v, 0.f);
}

TEST(RmsNormTest, BackwardResidualRejectsBadArguments) {
  // Host buffers: every case is refused before anything touches the device.
  alignas(16) static __nv_bfloat16 xb[64];
  alignas(16) static float f[64];
  RmsNormBackwardResidualArgs good;
  good.dy = f; good.x = xb; good.weight = f; good.rstd = f; good.dres = f;
  good.dres_bf16 = xb; good.grad_w = f; good.workspace = f;
  good.tokens = 2; good.hidden = 16;
  auto code = [&](auto edit) {
    RmsNormBackwardResidualArgs a = good;
    edit(a);
    return RmsNormBackwardResidual(a, nullptr).code();
  };
  using A = RmsNormBackwardResidualArgs;
  EXPECT_EQ(code([](A& a) { a.hidden = 12; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.hidden = kRmsNormMaxHidden + 8; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.tokens = -1; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.dy = nullptr; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.x = nullptr; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.rstd = nullptr; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.dres = nullptr; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.dres_bf16 = nullptr; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.grad_w = nullptr; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.workspace = nullptr; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.dres = f + 1; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](A& a) { a.dres_bf16 = xb + 4; }), StatusCode::kInvalidArgument);
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
