// ResidualGemm (model/residual_gemm.h) against a double reference on fresh
// random bf16 inputs: D = A B^T + C rounded once to bf16. Skips without a GPU.
#include "model/residual_gemm.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace grove::model {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct DeviceBf16 {
  explicit DeviceBf16(const std::vector<__nv_bfloat16>& host) : n(host.size()) {
    EXPECT_EQ(cudaMalloc(&p, n * sizeof(__nv_bfloat16)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, host.data(), n * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBf16() { cudaFree(p); }
  std::vector<__nv_bfloat16> Download() const {
    std::vector<__nv_bfloat16> host(n);
    EXPECT_EQ(cudaMemcpy(host.data(), p, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
  __nv_bfloat16* p = nullptr;
  size_t n;
};

std::vector<__nv_bfloat16> Random(size_t n, float scale, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<__nv_bfloat16> v(n);
  for (auto& x : v) x = __float2bfloat16(dist(rng));
  return v;
}

// Each element of D within two bf16 roundings -- cuBLASLt rounds the
// product A B^T to the output type before it adds C (measured on the H100:
// errors of ~2^-9 |A B^T| where D is small) and rounds the sum -- each
// bounded by 2^-8 of its value (twice the half-ulp, so that a value near a
// rounding boundary cannot fail it), plus fp32 accumulation of K terms
// (K * 2^-24 of their absolute sum).
void ExpectMatches(int64_t M, int64_t N, int64_t K, int64_t ldc, bool in_place, std::mt19937_64& rng) {
  const auto a = Random(size_t(M) * K, 1.f, rng), b = Random(size_t(N) * K, 0.05f, rng),
             c = Random(size_t(M) * ldc, 1.f, rng);
  DeviceBf16 da(a), db(b), dc(c), dd(std::vector<__nv_bfloat16>(c.size(), __float2bfloat16(0.f)));
  auto gemm = ResidualGemm::Create();
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  __nv_bfloat16* out = in_place ? dc.p : dd.p;
  const Status s = (*gemm)->Run(M, N, K, da.p, K, db.p, K, dc.p, out, ldc, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = in_place ? dc.Download() : dd.Download();
  int bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double product = 0, abs_sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double t = double(__bfloat162float(a[m * K + k])) * __bfloat162float(b[n * K + k]);
        product += t;
        abs_sum += std::fabs(t);
      }
      const double ref = product + __bfloat162float(c[m * ldc + n]);
      const double g = __bfloat162float(got[m * ldc + n]);
      const double tol =
          std::ldexp(std::fabs(ref) + std::fabs(product), -8) + K * std::ldexp(abs_sum, -24);
      if (!(std::fabs(g - ref) <= tol) && ++bad <= 5)
        ADD_FAILURE() << "D[" << m << "," << n << "] = " << g << ", reference " << ref << " (tolerance " << tol
                      << ")";
    }
  }
  EXPECT_EQ(bad, 0) << M << "x" << N << "x" << K;
  if (!in_place) {
    const auto c_after = dc.Download();
    for (size_t i = 0; i < c.size(); ++i)
      ASSERT_EQ(__bfloat16_as_ushort(c_after[i]), __bfloat16_as_ushort(c[i])) << "C changed at " << i;
  }
}

TEST(ResidualGemmTest, MatchesReferenceAtSeveralShapes) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(std::random_device{}());
  ExpectMatches(257, 128, 64, 128, /*in_place=*/false, rng);
  ExpectMatches(64, 256, 1024, 256, false, rng);
  ExpectMatches(1000, 128, 512, 136, false, rng);  // ldc past N
  ExpectMatches(33, 64, 96, 64, /*in_place=*/true, rng);
}

TEST(ResidualGemmTest, RefusesMisalignedAndBadShapes) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  auto gemm = ResidualGemm::Create();
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  std::mt19937_64 rng(1);
  DeviceBf16 buf(Random(4096, 1.f, rng));
  EXPECT_EQ((*gemm)->Run(8, 8, 8, buf.p + 1, 8, buf.p, 8, buf.p, buf.p, 8, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ((*gemm)->Run(8, 8, 16, buf.p, 8, buf.p, 16, buf.p, buf.p, 8, nullptr).code(),
            StatusCode::kInvalidArgument);  // lda < K
  EXPECT_TRUE((*gemm)->Run(0, 8, 8, nullptr, 8, nullptr, 8, nullptr, nullptr, 8, nullptr).ok());
}

}  // namespace
}  // namespace grove::model
