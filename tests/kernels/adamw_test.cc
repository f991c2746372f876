// Fused AdamW against a double CPU reference over several steps on fresh
// random parameters and gradients. Tolerances: each step is a few fp32
// operations per element (relative error a few 2^-24) whose errors add over
// the steps; held to 1e-5 of |p| + lr per element for the parameters and
// 1e-5 relative for the moments. The bf16 copy must equal the fp32 result
// rounded to nearest-even, bit for bit.
#include "kernels/adamw.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/stochastic_round.h"
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

// bf16 moments against a host emulation of the kernel in fp32 with the
// same stochastic rounding (kernels/stochastic_round.h, the bits of global
// index and step): two calls, the second at an index_base past 2^32, so the
// bits' index is checked to be the global one. The host and the device may
// round an fp32 moment 1 ulp apart (nvcc contracts a * b + c into an fma),
// and such an ulp flips the stochastic bf16 rounding when the dropped bits
// plus the random ones land on 2^16 exactly: ~2^-15 of elements and steps.
// So: moments bit-equal on >= 99.9% of elements, and everywhere within 2^-6
// of the largest magnitude that element's moment had over the steps (a flip
// is one bf16 ulp, 2^-8 relative, of some stored value, carried on with a
// factor beta < 1; relative to the current value alone it is unbounded
// where m cancels toward 0); parameters within 1e-5 (|p| + lr) on >= 99.9%
// and within 1e-5 |p| + 0.1 lr everywhere (a flipped moment moves a step's
// update by ~2^-8 of Adam's largest normalized step, (1 - b1) /
// sqrt(1 - b2) ~ 3, i.e. ~0.012 lr, in each of 5 steps); the bf16 copy the
// fp32 result rounded to nearest-even, bit for bit.
TEST(AdamWTest, Bf16MomentsMatchHostEmulation) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t count = 4 * 250001, split = 4 * 100003;
  const int64_t base_b = (int64_t{1} << 32) + 4;  // the second call's index_base
  auto global_index = [&](int64_t i) { return uint64_t(i < split ? i : base_b + (i - split)); };
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> p(count);
  for (float& x : p) x = nd(rng);
  std::vector<float> rp = p, rm(count, 0.f), rv(count, 0.f), rm_max(count, 0.f), rv_max(count, 0.f);
  DeviceBuffer<float> d_p(count), d_g(count);
  DeviceBuffer<__nv_bfloat16> d_m(count), d_v(count), d_pb(count);
  GROVE_CUDA_OK(d_p.Upload(p));
  GROVE_CUDA_OK(cudaMemset(d_m.get(), 0, count * 2));
  GROVE_CUDA_OK(cudaMemset(d_v.get(), 0, count * 2));
  AdamWHyper h;
  h.lr = 3e-3f;
  h.weight_decay = 0.1f;
  for (int step = 1; step <= 5; ++step) {
    h.step = step;
    h.grad_scale = step == 3 ? 0.37f : 1.f;
    std::vector<float> g(count);
    for (float& x : g) x = 1e-2f * nd(rng) * (1.f + 10.f * float(rng() % 2));
    GROVE_CUDA_OK(d_g.Upload(g));
    ASSERT_TRUE(AdamWStep(d_p.get(), d_g.get(), d_m.get(), d_v.get(), d_pb.get(), split, 0, h, nullptr).ok());
    ASSERT_TRUE(AdamWStep(d_p.get() + split, d_g.get() + split, d_m.get() + split, d_v.get() + split,
                          d_pb.get() + split, count - split, base_b, h, nullptr)
                    .ok());
    const float inv_bc1 = float(1.0 / (1 - std::pow(double{h.beta1}, step)));
    const float inv_bc2 = float(1.0 / (1 - std::pow(double{h.beta2}, step)));
    for (int64_t i = 0; i < count; ++i) {
      const float gi = h.grad_scale * g[i];
      const float mi = h.beta1 * rm[i] + (1.f - h.beta1) * gi;
      const float vi = h.beta2 * rv[i] + (1.f - h.beta2) * gi * gi;
      rp[i] -= h.lr * ((mi * inv_bc1) / (std::sqrt(vi * inv_bc2) + h.eps) + h.weight_decay * rp[i]);
      const uint64_t index = global_index(i);
      const uint32_t r = StochasticRoundBits(StochasticRoundStepKey(step, index >> 32), index);
      rm[i] = Bf16BitsToFloat(Bf16StochasticRound(mi, r));
      rv[i] = Bf16BitsToFloat(Bf16StochasticRound(vi, r >> 16));
      rm_max[i] = std::max(rm_max[i], std::fabs(rm[i]));
      rv_max[i] = std::max(rv_max[i], std::fabs(rv[i]));
    }
  }
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> m, v, pb;
  GROVE_CUDA_OK(d_p.Download(&p));
  GROVE_CUDA_OK(d_m.Download(&m));
  GROVE_CUDA_OK(d_v.Download(&v));
  GROVE_CUDA_OK(d_pb.Download(&pb));
  size_t moment_flips = 0, moment_bad = 0, p_loose = 0, p_bad = 0, bad_bf16 = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float mi = __bfloat162float(m[i]), vi = __bfloat162float(v[i]);
    moment_flips += (mi != rm[i]) || (vi != rv[i]);
    moment_bad += !(std::fabs(mi - rm[i]) <= 0x1p-6f * rm_max[i]) || !(std::fabs(vi - rv[i]) <= 0x1p-6f * rv_max[i]);
    const double err = std::fabs(double(p[i]) - rp[i]);
    p_loose += !(err <= 1e-5 * (std::fabs(rp[i]) + h.lr));
    p_bad += !(err <= 1e-5 * std::fabs(rp[i]) + 0.1 * h.lr);
    const __nv_bfloat16 want = __float2bfloat16_rn(p[i]);
    if (std::memcmp(&want, &pb[i], 2) != 0) ++bad_bf16;
  }
  std::printf("bf16 moments: %zu of %lld elements' moments differ from the host's (%zu past the bound), %zu "
              "parameters past 1e-5 (%zu past the bound)\n",
              moment_flips, (long long)count, moment_bad, p_loose, p_bad);
  EXPECT_LE(moment_flips, size_t(count / 1000));
  EXPECT_EQ(moment_bad, 0u);
  EXPECT_LE(p_loose, size_t(count / 1000));
  EXPECT_EQ(p_bad, 0u);
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
  h.grad_scale = 1.f;
  auto* half = reinterpret_cast<__nv_bfloat16*>(buf);
  EXPECT_EQ(AdamWStep(buf, buf, half, half, nullptr, 8, /*index_base=*/2, h, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(AdamWStep(buf, buf, half + 1, half, nullptr, 8, 0, h, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(AdamWStep(buf, buf, half, half, nullptr, 6, 0, h, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
