// Fused AdamW against a double CPU reference over several steps on fresh
// random parameters and gradients. Tolerances: each step is a few fp32
// operations per element (relative error a few 2^-24) whose errors add over
// the steps; held to 1e-5 of |p| + lr per element for the parameters and
// 1e-5 relative for the moments. The bf16 copy must equal the fp32 result
// rounded to nearest-even, bit for bit.
#include "kernels/adamw.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

TEST(AdamWTest, MatchesReferenceOverSteps) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t count = 4 * 250001;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> p(count), m(count, 0.f), v(count, 0.f);
  for (float& x : p) x = nd(rng);
  std::vector<double> rp(p.begin(), p.end()), rm(count, 0.0), rv(count, 0.0);
  DeviceBuffer<float> d_p(count), d_g(count), d_m(count), d_v(count);
  DeviceBuffer<__nv_bfloat16> d_pb(count);
  GROVE_CUDA_OK(d_p.Upload(p));
  GROVE_CUDA_OK(d_m.Upload(m));
  GROVE_CUDA_OK(d_v.Upload(v));
  AdamWHyper h;
  h.lr = 3e-3f;
  h.weight_decay = 0.1f;
  for (int step = 1; step <= 5; ++step) {
    h.step = step;
    // Steps 3 and 4 clip (a folded-in gradient scale), the others do not.
    h.grad_scale = (step == 3 || step == 4) ? 0.37f : 1.f;
    std::vector<float> g(count);
    for (float& x : g) x = 1e-2f * nd(rng);
    GROVE_CUDA_OK(d_g.Upload(g));
    ASSERT_TRUE(AdamWStep(d_p.get(), d_g.get(), d_m.get(), d_v.get(), d_pb.get(), count, h,
                          nullptr).ok());
    const double bc1 = 1 - std::pow(double{h.beta1}, step), bc2 = 1 - std::pow(double{h.beta2}, step);
    for (int64_t i = 0; i < count; ++i) {
      const double gi = double{h.grad_scale} * g[i];
      rm[i] = h.beta1 * rm[i] + (1 - double{h.beta1}) * gi;
      rv[i] = h.beta2 * rv[i] + (1 - double{h.beta2}) * gi * gi;
      rp[i] -= h.lr * (rm[i] / bc1 / (std::sqrt(rv[i] / bc2) + h.eps) + h.weight_decay * rp[i]);
    }
  }
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> pb;
  GROVE_CUDA_OK(d_p.Download(&p));
  GROVE_CUDA_OK(d_m.Download(&m));
  GROVE_CUDA_OK(d_v.Download(&v));
  GROVE_CUDA_OK(d_pb.Download(&pb));
  size_t bad = 0, bad_bf16 = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (!(std::fabs(p[i] - rp[i]) <= 1e-5 * (std::fabs(rp[i]) + h.lr))) ++bad;
    if (!(std::fabs(m[i] - rm[i]) <= 1e-5 * std::fabs(rm[i]) + 1e-9)) ++bad;  // m can cancel
    if (!(std::fabs(v[i] - rv[i]) <= 1e-5 * std::fabs(rv[i]) + 1e-14)) ++bad;
    const __nv_bfloat16 want = __float2bfloat16_rn(p[i]);
    if (std::memcmp(&want, &pb[i], 2) != 0) ++bad_bf16;
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(bad_bf16, 0u);
}

TEST(AdamWTest, RejectsBadArguments) {
  alignas(16) static float buf[16];
  AdamWHyper h;
  EXPECT_EQ(AdamWStep(buf, buf, buf, buf, nullptr, 6, h, nullptr).code(),
            StatusCode::kInvalidArgument);
  h.step = 0;
  EXPECT_EQ(AdamWStep(buf, buf, buf, buf, nullptr, 8, h, nullptr).code(),
            StatusCode::kInvalidArgument);
  h.step = 1;
  h.beta2 = 1.f;
  EXPECT_EQ(AdamWStep(buf, buf, buf, buf, nullptr, 8, h, nullptr).code(),
            StatusCode::kInvalidArgument);
  h.beta2 = 0.95f;
  h.grad_scale = -1.f;
  EXPECT_EQ(AdamWStep(buf, buf, buf, buf, nullptr, 8, h, nullptr).code(),
            StatusCode::kInvalidArgument);
  h.grad_scale = std::nanf("");
  EXPECT_EQ(AdamWStep(buf, buf, buf, buf, nullptr, 8, h, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
