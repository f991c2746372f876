// MoeInputGrad against a double-precision CPU reference on fresh random
// inputs: token counts that are not multiples of the 64-row tile, h not a
// multiple of the 128-column tile, expert counts that are not whole mma
// k-steps, dropped slots (row -1), top_k 1..8.
//
// Tolerance. da, dlogits and W_router are bf16 and the reference sees the
// same values in double, so every product is exact in fp32; the kernel's
// error is its fp32 adds: over the experts in the mma (the tensor cores may
// truncate: <= experts * 2^-23 relative to the sum of |products|), then the
// top_k rows and the old dx (one rounding each). Bound per element:
// (experts + top_k + 2) * 2^-23 * (sum of |terms|), with factor 2 slack. A
// missed row, a wrong expert or a misplaced tile is O(1) off.
#include "kernels/moe_input_grad.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

struct Case {
  int tokens, top_k, experts, h;
  double dropped;  // fraction of slots with row -1
};

void Check(const Case& c) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " tokens " + std::to_string(c.tokens) + " top_k " +
               std::to_string(c.top_k) + " experts " + std::to_string(c.experts) + " h " + std::to_string(c.h));
  std::mt19937_64 rng(seed);
  const int rows = c.tokens * c.top_k + 7;  // a few rows no slot points at
  std::vector<__nv_bfloat16> da_b, dl_b, w_b;
  std::vector<double> da, dl, w;
  testing::RandomBf16(rng, size_t(rows) * c.h, &da_b, &da);
  testing::RandomBf16(rng, size_t(c.tokens) * c.experts, &dl_b, &dl);
  testing::RandomBf16(rng, size_t(c.experts) * c.h, &w_b, &w);
  std::vector<int32_t> row_of_slot(size_t(c.tokens) * c.top_k);
  std::uniform_int_distribution<int> any_row(0, rows - 1);
  std::bernoulli_distribution drop(c.dropped);
  for (int32_t& r : row_of_slot) r = drop(rng) ? -1 : any_row(rng);
  std::vector<float> dx0(size_t(c.tokens) * c.h);
  std::uniform_real_distribution<float> unit(-2.f, 2.f);
  for (float& v : dx0) v = unit(rng);

  DeviceBuffer<__nv_bfloat16> d_da(da_b.size()), d_dl(dl_b.size()), d_w(w_b.size());
  DeviceBuffer<int32_t> d_slots(row_of_slot.size());
  DeviceBuffer<float> d_dx(dx0.size());
  GROVE_CUDA_OK(d_da.Upload(da_b));
  GROVE_CUDA_OK(d_dl.Upload(dl_b));
  GROVE_CUDA_OK(d_w.Upload(w_b));
  GROVE_CUDA_OK(d_slots.Upload(row_of_slot));
  GROVE_CUDA_OK(d_dx.Upload(dx0));
  MoeInputGradArgs a;
  a.da = d_da.get();
  a.row_of_slot = d_slots.get();
  a.dlogits = d_dl.get();
  a.w_router = d_w.get();
  a.dx = d_dx.get();
  a.tokens = c.tokens;
  a.top_k = c.top_k;
  a.experts = c.experts;
  a.h = c.h;
  const Status s = MoeInputGrad(a, nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<float> got;
  GROVE_CUDA_OK(d_dx.Download(&got));

  int bad = 0;
  double err2 = 0, ref2 = 0;
  for (int t = 0; t < c.tokens; ++t) {
    for (int i = 0; i < c.h; ++i) {
      double want = dx0[size_t(t) * c.h + i], mag = std::fabs(want);
      for (int e = 0; e < c.experts; ++e) {
        const double p = dl[size_t(t) * c.experts + e] * w[size_t(e) * c.h + i];
        want += p;
        mag += std::fabs(p);
      }
      for (int j = 0; j < c.top_k; ++j) {
        const int32_t r = row_of_slot[size_t(t) * c.top_k + j];
        if (r < 0) continue;
        want += da[size_t(r) * c.h + i];
        mag += std::fabs(da[size_t(r) * c.h + i]);
      }
      const double out = got[size_t(t) * c.h + i];
      const double bound = 2.0 * (c.experts + c.top_k + 2) * std::ldexp(1.0, -23) * mag;
      if (!(std::fabs(out - want) <= bound) && bad++ < 5)
        ADD_FAILURE() << "dx[" << t << ", " << i << "] = " << out << ", want " << want << " (bound " << bound << ")";
      err2 += (out - want) * (out - want);
      ref2 += want * want;
    }
  }
  EXPECT_EQ(bad, 0);
  std::printf("  tokens %d top_k %d experts %d h %d: relative L2 error %.3g\n", c.tokens, c.top_k, c.experts, c.h,
              std::sqrt(err2 / ref2));
}

TEST(MoeInputGradTest, MatchesDoubleReference) {
  GROVE_SKIP_WITHOUT_GPU();
  Check({1, 1, 8, 8, 0.0});         // one token, one partial tile, one partial k-step
  Check({200, 6, 64, 1024, 0.05});  // gpu-ref's router and width
  Check({129, 8, 40, 136, 0.2});    // experts not a whole k-step, h one column chunk past a tile
  Check({64, 2, 256, 384, 0.0});    // the widest router
  Check({333, 4, 16, 64, 1.0});     // every slot dropped: the router's part alone
}

TEST(MoeInputGradTest, RejectsBadArguments) {
  GROVE_SKIP_WITHOUT_GPU();
  DeviceBuffer<__nv_bfloat16> b(4096);
  DeviceBuffer<int32_t> slots(64);
  DeviceBuffer<float> dx(4096);
  GROVE_CUDA_OK(cudaMemset(slots.get(), 0xff, 64 * sizeof(int32_t)));  // every slot dropped
  GROVE_CUDA_OK(cudaMemset(b.get(), 0, 4096 * 2));
  MoeInputGradArgs a;
  a.da = b.get();
  a.row_of_slot = slots.get();
  a.dlogits = b.get();
  a.w_router = b.get();
  a.dx = dx.get();
  a.tokens = 4;
  a.top_k = 2;
  a.experts = 8;
  a.h = 64;
  EXPECT_TRUE(MoeInputGrad(a, nullptr).ok());
  for (auto bad : {+[](MoeInputGradArgs& x) { x.top_k = 17; }, +[](MoeInputGradArgs& x) { x.experts = 12; },
                   +[](MoeInputGradArgs& x) { x.experts = 264; }, +[](MoeInputGradArgs& x) { x.h = 60; },
                   +[](MoeInputGradArgs& x) { x.tokens = -1; }, +[](MoeInputGradArgs& x) { x.dx = nullptr; },
                   +[](MoeInputGradArgs& x) { x.da += 1; }}) {
    MoeInputGradArgs x = a;
    bad(x);
    EXPECT_EQ(MoeInputGrad(x, nullptr).code(), StatusCode::kInvalidArgument);
  }
  GROVE_CUDA_OK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace grove::kernels
