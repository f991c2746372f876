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
#include <cstring>
#include <string>
#include <vector>

#include "kernels/grouped_gemm.h"
#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;
using testing::IsHopper;

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


// The grouped GEMM's rotary epilogue (GroupedGemmArgs::rope_table) against
// the same GEMM followed by RopeForward: the same bits, heads past
// rope_columns untouched; ragged experts, rows not a multiple of the tile,
// a rope_columns that ends inside a 256-column tile.
void CheckRopeEpilogue(const std::vector<int>& counts, int n, int k, int rope_columns) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n " + std::to_string(n) + " rope_columns " +
               std::to_string(rope_columns));
  std::mt19937_64 rng(seed);
  const int experts = int(counts.size());
  std::vector<int32_t> offsets(experts + 1, 0);
  for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int rows = offsets[experts], max_pos = 300;
  std::vector<__nv_bfloat16> a, w;
  std::vector<double> unused;
  testing::RandomBf16(rng, size_t(rows) * k, &a, &unused);
  testing::RandomBf16(rng, size_t(experts) * n * k, &w, &unused);
  std::vector<int32_t> pos(rows);
  std::uniform_int_distribution<int> pick(0, max_pos - 1);
  for (int32_t& p : pos) p = pick(rng);
  DeviceBuffer<__nv_bfloat16> d_a(a.size()), d_w(w.size()), d_plain(size_t(rows) * n), d_fused(size_t(rows) * n);
  DeviceBuffer<int32_t> d_off(offsets.size()), d_pos(rows);
  DeviceBuffer<float2> d_table(size_t(max_pos) * 64);
  GROVE_CUDA_OK(d_a.Upload(a));
  GROVE_CUDA_OK(d_w.Upload(w));
  GROVE_CUDA_OK(d_off.Upload(offsets));
  GROVE_CUDA_OK(d_pos.Upload(pos));
  ASSERT_TRUE(RopeCosSinTable(d_table.get(), max_pos, 128, 10000.0, nullptr).ok());
  GroupedGemmArgs args;
  args.a = d_a.get();
  args.w = d_w.get();
  args.c = d_plain.get();
  args.expert_offsets = d_off.get();
  args.total_rows = rows;
  args.num_experts = experts;
  args.n = n;
  args.k = k;
  args.out_type = GemmOutType::kBF16;
  Status s = GroupedGemm(args, GroupedGemmImpl::kWgmmaStaged, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  s = RopeForward(d_plain.get(), d_pos.get(), rows, rope_columns / 128, 128, 10000.0, nullptr, n);
  ASSERT_TRUE(s.ok()) << s;
  args.c = d_fused.get();
  args.rope_table = d_table.get();
  args.rope_positions = d_pos.get();
  args.rope_columns = rope_columns;
  s = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<__nv_bfloat16> plain, fused;
  GROVE_CUDA_OK(d_plain.Download(&plain));
  GROVE_CUDA_OK(d_fused.Download(&fused));
  size_t differ = 0;
  for (size_t i = 0; i < plain.size(); ++i) differ += std::memcmp(&plain[i], &fused[i], 2) != 0;
  EXPECT_EQ(differ, 0u) << "of " << plain.size();
}

TEST(RopeTest, GroupedGemmEpilogueGivesRopeForwardsBits) {
  GROVE_SKIP_WITHOUT_GPU();
  if (!IsHopper()) GTEST_SKIP() << "the rotary epilogue is sm_90 only";
  CheckRopeEpilogue({1000}, 1536, 1024, 1280);   // gpu-ref's q, k, v heads
  CheckRopeEpilogue({77, 0, 200}, 640, 256, 384);  // ends inside a tile
  CheckRopeEpilogue({33}, 256, 64, 256);
}

TEST(RopeTest, GroupedGemmEpilogueRejectsBadArguments) {
  // Argument checks run before any device query.
  __nv_bfloat16* dummy = reinterpret_cast<__nv_bfloat16*>(uintptr_t{256});
  GroupedGemmArgs args;
  args.a = dummy;
  args.w = dummy;
  args.c = dummy;
  args.expert_offsets = reinterpret_cast<int32_t*>(uintptr_t{512});
  args.num_experts = 1;
  args.n = 256;
  args.k = 64;
  args.out_type = GemmOutType::kBF16;
  args.rope_table = reinterpret_cast<float2*>(uintptr_t{1024});
  args.rope_positions = args.expert_offsets;
  args.rope_columns = 128;
  EXPECT_TRUE(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).ok());  // no rows: nothing to do
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kMmaSync, nullptr).code(), StatusCode::kInvalidArgument);
  for (int columns : {100, 384, -128}) {
    args.rope_columns = columns;
    EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument) << columns;
  }
  args.rope_columns = 128;
  args.out_type = GemmOutType::kF32;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.out_type = GemmOutType::kBF16;
  args.rope_positions = nullptr;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeCosSinTable(nullptr, 10, 127, 10000.0, nullptr).code(), StatusCode::kInvalidArgument);
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
