// The PTX wrappers one by one, against the register and memory layouts
// their comments document (the grouped GEMM tests cover the rest: K-major
// wgmma, TMA, mbarrier, cluster; MN-major wgmma is checked here). Values are small integers, exact in bf16 and
// fp32, so every check is an exact comparison.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "tests/kernels/gpu_test_util.h"
#include "tests/kernels/ptx_wrappers_kernels.h"

namespace grove::kernels {
namespace {

TEST(PtxWrappersTest, LdmatrixLayouts) {
  GROVE_SKIP_WITHOUT_GPU();
  for (int matrices : {1, 2, 4}) {
    for (bool trans : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "x" << matrices << (trans ? " trans" : ""));
      std::vector<float> out;
      ASSERT_EQ(testing::RunLdmatrix(matrices, trans, &out), 0);
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < matrices; ++i)
          for (int h = 0; h < 2; ++h) {
            // Lane l holds row l/4, columns 2(l%4)+h of matrix i (of its
            // transpose with .trans); element (r, c) of the source is r*8+c.
            const int r = l / 4, c = 2 * (l % 4) + h;
            const float want = trans ? (8 * i + c) * 8 + r : (8 * i + r) * 8 + c;
            ASSERT_EQ(out[(l * 4 + i) * 2 + h], want) << "lane " << l << " reg " << i;
          }
    }
  }
}

TEST(PtxWrappersTest, StmatrixLayouts) {
  GROVE_SKIP_WITHOUT_GPU();
  struct V { int matrices; bool trans; };
  for (V v : {V{1, false}, V{2, false}, V{4, false}, V{4, true}}) {
    SCOPED_TRACE(::testing::Message() << "x" << v.matrices << (v.trans ? " trans" : ""));
    std::vector<float> out;
    ASSERT_EQ(testing::RunStmatrix(v.matrices, v.trans, &out), 0);
    std::vector<float> want(32 * 8, -1.f);
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < v.matrices; ++i)
        for (int h = 0; h < 2; ++h) {
          const int r = l / 4, c = 2 * (l % 4) + h;
          const int at = v.trans ? (8 * i + c) * 8 + r : (8 * i + r) * 8 + c;
          want[at] = static_cast<float>((i * 32 + l) * 2 + h);
        }
    EXPECT_EQ(out, want);
  }
}

TEST(PtxWrappersTest, MmaM16N8K16) {
  GROVE_SKIP_WITHOUT_GPU();
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<float> a(256), b(128), c, want(128, 0.f);
  for (float& x : a) x = static_cast<float>(small(rng));
  for (float& x : b) x = static_cast<float>(small(rng));
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) want[m * 8 + n] += a[m * 16 + k] * b[n * 16 + k];
  ASSERT_EQ(testing::RunMma(a, b, &c), 0);
  EXPECT_EQ(c, want);
}

TEST(PtxWrappersTest, CpAsyncVariantsAndZeroFill) {
  GROVE_SKIP_WITHOUT_GPU();
  std::mt19937 rng(std::random_device{}());
  std::vector<uint8_t> src(1024), out;
  for (auto& x : src) x = static_cast<uint8_t>(rng());
  ASSERT_EQ(testing::RunCpAsync(src, &out), 0);
  for (int t = 0; t < 64; ++t)
    for (int i = 0; i < 16; ++i) {
      const bool copied = t % 3 != 2 || i < t % 17;
      ASSERT_EQ(out[16 * t + i], copied ? src[16 * t + i] : 0) << "chunk " << t << " byte " << i;
    }
}

TEST(PtxWrappersTest, WgmmaBothOperandsMnMajor) {
  GROVE_SKIP_WITHOUT_GPU();
  cudaDeviceProp prop;
  ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  if (prop.major != 9 || prop.minor != 0) GTEST_SKIP() << "wgmma needs sm_90";
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<float> a(32 * 64), b(32 * 128), c, want(64 * 128, 0.f);
  for (float& x : a) x = static_cast<float>(small(rng));
  for (float& x : b) x = static_cast<float>(small(rng));
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < 128; ++n)
      for (int k = 0; k < 32; ++k) want[m * 128 + n] += a[k * 64 + m] * b[k * 128 + n];
  ASSERT_EQ(testing::RunWgmmaMn(a, b, &c), 0);
  int bad = 0;
  for (int i = 0; i < 64 * 128; ++i)
    if (c[i] != want[i] && bad++ < 5) ADD_FAILURE() << "C[" << i / 128 << ", " << i % 128 << "] = " << c[i] << ", want " << want[i];
  EXPECT_EQ(bad, 0);
}

}  // namespace
}  // namespace grove::kernels
