// SwiGLU forward and backward against a double CPU reference on fresh
// random bf16 inputs. Tolerances: fp32 arithmetic with __expf (a few ulp,
// ~1e-6 relative on the sigmoid), then one bf16 rounding (2^-9 relative):
// each element within 2^-8 of its magnitude plus 1e-5 of the magnitude of
// its factors (silu'(g) crosses zero near g = -1.28, where the relative
// error of the result is unbounded but the absolute one is not).
#include "kernels/swiglu.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

void CheckSwiGlu(int64_t count) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " count " + std::to_string(count));
  std::mt19937_64 rng(seed);
  std::vector<__nv_bfloat16> g_bf, u_bf, dh_bf;
  std::vector<double> g, u, dh;
  testing::RandomBf16(rng, count, &g_bf, &g);
  testing::RandomBf16(rng, count, &u_bf, &u);
  testing::RandomBf16(rng, count, &dh_bf, &dh);
  for (auto* v : {&g_bf}) {  // gates span the interesting range of silu: [-6, 6]
    for (int64_t i = 0; i < count; ++i) {
      (*v)[i] = __float2bfloat16(6.f * __bfloat162float((*v)[i]));
      g[i] = __bfloat162float((*v)[i]);
    }
  }
  DeviceBuffer<__nv_bfloat16> d_g(count), d_u(count), d_dh(count), d_h(count), d_dg(count),
      d_du(count);
  GROVE_CUDA_OK(d_g.Upload(g_bf));
  GROVE_CUDA_OK(d_u.Upload(u_bf));
  GROVE_CUDA_OK(d_dh.Upload(dh_bf));
  for (auto* b : {&d_h, &d_dg, &d_du}) GROVE_CUDA_OK(cudaMemset(b->get(), 0xFF, count * 2));
  ASSERT_TRUE(SwiGluForward(d_g.get(), d_u.get(), d_h.get(), count, nullptr).ok());
  ASSERT_TRUE(
      SwiGluBackward(d_dh.get(), d_g.get(), d_u.get(), d_dg.get(), d_du.get(), count, nullptr).ok());
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> h, dg, du;
  GROVE_CUDA_OK(d_h.Download(&h));
  GROVE_CUDA_OK(d_dg.Download(&dg));
  GROVE_CUDA_OK(d_du.Download(&du));
  size_t bad = 0;
  auto check = [&](double got, double want, double scale) {
    if (!(std::fabs(got - want) <= std::ldexp(1.0, -8) * std::fabs(want) + 1e-5 * scale + 1e-30))
      ++bad;
  };
  for (int64_t i = 0; i < count; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-g[i]));
    const double silu = g[i] * s;
    check(__bfloat162float(h[i]), silu * u[i], std::fabs(g[i] * u[i]));
    check(__bfloat162float(dg[i]), dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)),
          std::fabs(dh[i] * u[i]) * (1.0 + std::fabs(g[i])));
    check(__bfloat162float(du[i]), dh[i] * silu, std::fabs(dh[i] * g[i]));
  }
  EXPECT_EQ(bad, 0u);
}

TEST(SwiGluTest, MatchesReference) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckSwiGlu(8);
  CheckSwiGlu(1000 * 512);
  CheckSwiGlu(8 * 1000003);  // more chunks than the grid: the grid-stride loop
}

TEST(SwiGluTest, RejectsBadCounts) {
  alignas(16) static __nv_bfloat16 buf[16];
  EXPECT_EQ(SwiGluForward(buf, buf, buf, 12, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGluBackward(buf, buf, buf, buf, buf, -8, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGluForward(buf + 1, buf, buf, 8, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
