// The log-prob head against model/transformer.cc's Score/Backward in double.
// Tolerances: the kernel sums exp2 of logits prescaled by log2(e) in fp32.
// Each term carries the ex2.approx error (< 2^-22 relative) and the rounding
// of the prescaled logit (|z| log2(e) 2^-24 absolute in the exponent, i.e.
// that much relative in the term); the fp32 sum of up to 2^20 terms in
// chunks of a few hundred plus a 9-level tree adds < 2^-15 relative here.
// A relative error e of the sum is an absolute error e of lse, so lse and
// logp get 4e-5 + 2^-23 |z|max absolute. dlogits are rounded once to bf16
// (2^-8 relative) on top of |dlogp| p (that lse error) absolute.
#include "kernels/logprob_head.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

template <typename T>
T FromFloat(float x);
template <>
float FromFloat<float>(float x) { return x; }
template <>
__nv_bfloat16 FromFloat<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
double ToDouble(float x) { return x; }
double ToDouble(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
void CheckHead(int rows, int vocab, float spread) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " rows " + std::to_string(rows) + " vocab " +
               std::to_string(vocab) + (sizeof(T) == 4 ? " fp32" : " bf16"));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, spread);
  std::uniform_int_distribution<int> pick(0, vocab - 1);
  std::vector<T> logits(size_t(rows) * vocab);
  double zmax = 0;
  for (T& z : logits) {
    z = FromFloat<T>(std::max(-8 * spread, std::min(8 * spread, nd(rng))));
    zmax = std::max(zmax, std::fabs(ToDouble(z)));
  }
  std::vector<int32_t> targets(rows);
  std::vector<float> dlogp(rows);
  for (int r = 0; r < rows; ++r) {
    targets[r] = r % 7 == 3 ? -1 : (r % 11 == 5 ? vocab : pick(rng));  // some rows skipped
    dlogp[r] = nd(rng);
  }
  DeviceBuffer<T> d_logits(logits.size());
  DeviceBuffer<int32_t> d_targets(rows);
  DeviceBuffer<float> d_logp(rows), d_lse(rows), d_dlogp(rows);
  DeviceBuffer<__nv_bfloat16> d_dlogits(logits.size());
  GROVE_CUDA_OK(d_logits.Upload(logits));
  GROVE_CUDA_OK(d_targets.Upload(targets));
  GROVE_CUDA_OK(d_dlogp.Upload(dlogp));
  Status s = TokenLogProbForward(d_logits.get(), d_targets.get(), d_logp.get(), d_lse.get(), rows, vocab, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  s = TokenLogProbBackward(d_logits.get(), d_targets.get(), d_lse.get(), d_dlogp.get(), d_dlogits.get(), rows, vocab,
                           nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<float> logp, lse;
  std::vector<__nv_bfloat16> dlogits;
  GROVE_CUDA_OK(d_logp.Download(&logp));
  GROVE_CUDA_OK(d_lse.Download(&lse));
  GROVE_CUDA_OK(d_dlogits.Download(&dlogits));
  const double lse_tol = 4e-5 + 0x1p-23 * zmax;
  size_t bad_lse = 0, bad_logp = 0, bad_grad = 0;
  for (int r = 0; r < rows; ++r) {
    const T* z = &logits[size_t(r) * vocab];
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < vocab; ++v) mx = std::max(mx, ToDouble(z[v]));
    for (int v = 0; v < vocab; ++v) sum += std::exp(ToDouble(z[v]) - mx);
    const double ref_lse = mx + std::log(sum);
    const bool valid = targets[r] >= 0 && targets[r] < vocab;
    const double ref_logp = valid ? ToDouble(z[targets[r]]) - ref_lse : 0.0;
    if (!(std::fabs(lse[r] - ref_lse) <= lse_tol + 0x1p-24 * std::fabs(ref_lse))) ++bad_lse;
    if (!(std::fabs(logp[r] - ref_logp) <= lse_tol + 0x1p-24 * std::fabs(ref_lse))) ++bad_logp;
    const double g = valid ? dlogp[r] : 0.0;
    for (int v = 0; v < vocab; ++v) {
      const double p = std::exp(ToDouble(z[v]) - ref_lse);
      const double ref = g * ((v == targets[r] ? 1.0 : 0.0) - p);
      const double out = __bfloat162float(dlogits[size_t(r) * vocab + v]);
      if (!(std::fabs(out - ref) <= 0x1p-8 * std::fabs(ref) + std::fabs(g) * p * 2 * lse_tol + 1e-30)) ++bad_grad;
    }
  }
  EXPECT_EQ(bad_lse, 0u);
  EXPECT_EQ(bad_logp, 0u);
  EXPECT_EQ(bad_grad, 0u);
}

TEST(LogProbHeadTest, Fp32Logits) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckHead<float>(37, 1000, 3.f);
  CheckHead<float>(64, 32768, 2.f);
  CheckHead<float>(5, 262144, 4.f);
  CheckHead<float>(3, 8, 1.f);
}

TEST(LogProbHeadTest, Bf16Logits) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckHead<__nv_bfloat16>(37, 1000, 3.f);
  CheckHead<__nv_bfloat16>(64, 32768, 2.f);
  CheckHead<__nv_bfloat16>(5, 262144, 4.f);
}

TEST(LogProbHeadTest, RejectsBadShapes) {
  EXPECT_EQ(TokenLogProbForward(static_cast<const float*>(nullptr), nullptr, nullptr, nullptr, 4, 1001, nullptr)
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(TokenLogProbForward(static_cast<const float*>(nullptr), nullptr, nullptr, nullptr, 4, 1000, nullptr)
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(TokenLogProbBackward(static_cast<const __nv_bfloat16*>(nullptr), nullptr, nullptr, nullptr, nullptr, 4,
                                 2 * kLogProbMaxVocab, nullptr)
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(TokenLogProbForward(static_cast<const float*>(nullptr), nullptr, nullptr, nullptr, 0, 1000, nullptr)
                  .ok());
}

}  // namespace
}  // namespace grove::kernels
