// RoPE against model/layers.h: the reference takes the CPU model's fp32
// tables (cos, sin of the double angle rounded to fp32) and rotates in
// double. The kernel rotates in fp32 (two products and a sum: within
// 2 * 2^-24 * (|a| + |b|)) and rounds once to bf16 (unit roundoff 2^-8), so
// each output is within 2^-8 |ref| + 2^-22 (|a| + |b|) of the reference; the
// slack also covers a last-bit difference between the device's and glibc's
// double cos/sin showing up after rounding to fp32.
#include "kernels/rope.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

void CheckRope(int tokens, int heads, int head_dim, int64_t row_stride, int max_len, bool backward) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " tokens " + std::to_string(tokens) + " heads " +
               std::to_string(heads) + " head_dim " + std::to_string(head_dim) + " stride " +
               std::to_string(row_stride) + (backward ? " backward" : " forward"));
  std::mt19937_64 rng(seed);
  const double base = 10000.0;
  const int64_t stride = row_stride ? row_stride : int64_t(heads) * head_dim;
  // Packed sequences of random lengths: positions restart at 0.
  std::vector<int32_t> pos(tokens);
  std::uniform_int_distribution<int> len_dist(1, max_len);
  for (int t = 0; t < tokens;) {
    const int len = len_dist(rng);
    for (int i = 0; i < len && t < tokens; ++i) pos[t++] = i;
  }
  std::vector<__nv_bfloat16> x;
  std::vector<double> xd;
  testing::RandomBf16(rng, size_t(tokens) * stride, &x, &xd);
  DeviceBuffer<__nv_bfloat16> d_x(x.size());
  DeviceBuffer<int32_t> d_pos(tokens);
  GROVE_CUDA_OK(d_x.Upload(x));
  GROVE_CUDA_OK(d_pos.Upload(pos));
  Status s = backward ? RopeBackward(d_x.get(), d_pos.get(), tokens, heads, head_dim, base, nullptr, row_stride)
                      : RopeForward(d_x.get(), d_pos.get(), tokens, heads, head_dim, base, nullptr, row_stride);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<__nv_bfloat16> out;
  GROVE_CUDA_OK(d_x.Download(&out));
  const int half = head_dim / 2;
  size_t bad = 0, untouched_changed = 0;
  for (int t = 0; t < tokens; ++t) {
    for (int i = 0; i < half; ++i) {
      const double angle = double(pos[t]) * std::pow(base, -2.0 * double(i) / double(head_dim));
      const double c = float(std::cos(angle));
      const double sn = (backward ? -1.0 : 1.0) * double(float(std::sin(angle)));
      for (int h = 0; h < heads; ++h) {
        const size_t lo = size_t(t) * stride + size_t(h) * head_dim + i, hi = lo + half;
        const double a = xd[lo], b = xd[hi];
        const double ref_lo = a * c - b * sn, ref_hi = a * sn + b * c;
        const double slack = 0x1p-22 * (std::fabs(a) + std::fabs(b));
        if (!(std::fabs(__bfloat162float(out[lo]) - ref_lo) <= 0x1p-8 * std::fabs(ref_lo) + slack)) ++bad;
        if (!(std::fabs(__bfloat162float(out[hi]) - ref_hi) <= 0x1p-8 * std::fabs(ref_hi) + slack)) ++bad;
      }
    }
    for (int64_t j = int64_t(heads) * head_dim; j < stride; ++j)  // padding past the heads is left alone
      if (__bfloat162float(out[size_t(t) * stride + j]) != float(xd[size_t(t) * stride + j])) ++untouched_changed;
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(untouched_changed, 0u);
}

TEST(RopeTest, GpuReferenceShapes) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRope(4100, 8, 128, 0, 4096, false);  // q
  CheckRope(4100, 2, 128, 0, 4096, false);  // k
  CheckRope(4100, 8, 128, 0, 4096, true);
  // GpuTransformer's call: q's 8 and k's 2 heads at once in fused [q | k | v]
  // rows (v, past the rotated heads, must stay as it was).
  CheckRope(4100, 8 + 2, 128, (8 + 2 * 2) * 128, 4096, false);
  CheckRope(4100, 8 + 2, 128, (8 + 2 * 2) * 128, 4096, true);
}

TEST(RopeTest, StridedAndScalarPaths) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckRope(333, 2, 64, 8 * 64 + 2 * 64 + 2 * 64, 100, false);  // q inside a fused qkv row
  CheckRope(333, 3, 6, 0, 50, false);                           // half = 3: scalar path
  CheckRope(333, 3, 6, 21, 50, true);
  CheckRope(1, 1, 2, 0, 1, false);
}

TEST(RopeTest, RejectsBadShapes) {
  EXPECT_EQ(RopeForward(nullptr, nullptr, 4, 2, 7, 10000.0, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeForward(nullptr, nullptr, 4, 2, 1024, 10000.0, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeForward(nullptr, nullptr, 4, 2, 8, 1.0, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeForward(nullptr, nullptr, 4, 2, 8, 10000.0, nullptr, 15).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeBackward(nullptr, nullptr, 4, 2, 8, 10000.0, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
