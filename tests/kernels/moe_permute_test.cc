// Token permutation to experts and back against model/moe.h's dispatch on
// the CPU. The index (offsets, rows, inverse, load) must equal the CPU's
// stable grouping exactly; the gather is a copy (exact). The gated sum and
// its gradient are fp32 with one rounding to bf16: each output is within
// 2^-8 |ref| (bf16 unit roundoff) + (k + 1) * 2^-24 * sum|terms| (fp32
// accumulation of k + 1 terms) of the double reference; dgates is an fp32
// dot product of `hidden` terms, within hidden * 2^-24 * sum|terms|.
#include "kernels/moe_permute.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

enum class Routing { kRandom, kOneExpert, kFewExperts, kWithDropped };

std::vector<uint16_t> RandomIds(int tokens, int top_k, int experts, Routing routing, std::mt19937_64& rng) {
  const int slots = tokens * top_k;
  std::vector<uint16_t> ids(slots);
  std::vector<int> perm(experts);
  std::iota(perm.begin(), perm.end(), 0);
  std::uniform_real_distribution<double> u(0, 1);
  for (int t = 0; t < tokens; ++t) {
    if (routing == Routing::kRandom || routing == Routing::kWithDropped) std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < top_k; ++j) {
      int e = perm[j];
      if (routing == Routing::kOneExpert) e = 3 % experts;
      if (routing == Routing::kFewExperts) e = int(u(rng) * std::min(experts, 5));  // the rest stay empty
      if (routing == Routing::kWithDropped && u(rng) < 0.05) e = experts + int(u(rng) * 10);
      ids[size_t(t) * top_k + j] = uint16_t(e);
    }
  }
  return ids;
}

// CPU reference index: slots grouped by expert, in slot order.
struct CpuIndex {
  std::vector<int32_t> offsets, row_of_slot, slot_of_row;
};
CpuIndex ReferenceIndex(const std::vector<uint16_t>& ids, int experts) {
  const int slots = int(ids.size());
  std::vector<int32_t> want_offsets(experts + 1, 0), want_row_of_slot(slots, -1), want_slot_of_row(slots, -1);
  for (int s = 0; s < slots; ++s)
    if (ids[s] < experts) ++want_offsets[ids[s] + 1];
  for (int e = 0; e < experts; ++e) want_offsets[e + 1] += want_offsets[e];
  {
    std::vector<int32_t> next(want_offsets.begin(), want_offsets.end() - 1);
    for (int s = 0; s < slots; ++s)
      if (ids[s] < experts) {
        want_row_of_slot[s] = next[ids[s]]++;
        want_slot_of_row[want_row_of_slot[s]] = s;
      }
  }
  return {want_offsets, want_row_of_slot, want_slot_of_row};
}

// MoeRouteIndexOneBlock against the CPU index (which MoeRouteIndex must
// equal too): the same arrays exactly.
void CheckOneBlockIndex(int tokens, int top_k, int experts, Routing routing) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " tokens " + std::to_string(tokens) + " k " +
               std::to_string(top_k) + " E " + std::to_string(experts) + " routing " + std::to_string(int(routing)));
  std::mt19937_64 rng(seed);
  const std::vector<uint16_t> ids = RandomIds(tokens, top_k, experts, routing, rng);
  const CpuIndex want = ReferenceIndex(ids, experts);
  const int slots = tokens * top_k;
  DeviceBuffer<uint16_t> d_ids(std::max(slots, 1));
  DeviceBuffer<int32_t> d_offsets(experts + 1), d_row_of_slot(std::max(slots, 1)), d_slot_of_row(std::max(slots, 1)),
      d_load(experts);
  if (slots > 0) {
    GROVE_CUDA_OK(d_ids.Upload(ids));
  }
  GROVE_CUDA_OK(cudaMemset(d_offsets.get(), 0x7F, (experts + 1) * 4));
  GROVE_CUDA_OK(cudaMemset(d_slot_of_row.get(), 0x7F, d_slot_of_row.count() * 4));
  Status s = MoeRouteIndexOneBlock(d_ids.get(), tokens, top_k, experts, d_offsets.get(), d_row_of_slot.get(),
                                   d_slot_of_row.get(), d_load.get(), nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<int32_t> offsets, row_of_slot, slot_of_row, load;
  GROVE_CUDA_OK(d_offsets.Download(&offsets));
  ASSERT_EQ(offsets, want.offsets);
  GROVE_CUDA_OK(d_load.Download(&load));
  for (int e = 0; e < experts; ++e) EXPECT_EQ(load[e], want.offsets[e + 1] - want.offsets[e]) << "expert " << e;
  if (slots == 0) return;
  GROVE_CUDA_OK(d_row_of_slot.Download(&row_of_slot));
  GROVE_CUDA_OK(d_slot_of_row.Download(&slot_of_row));
  EXPECT_EQ(row_of_slot, want.row_of_slot);
  EXPECT_EQ(slot_of_row, want.slot_of_row);
}

void CheckMoe(int tokens, int top_k, int experts, int hidden, Routing routing) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " tokens " + std::to_string(tokens) + " k " +
               std::to_string(top_k) + " E " + std::to_string(experts) + " hidden " + std::to_string(hidden) +
               " routing " + std::to_string(int(routing)));
  std::mt19937_64 rng(seed);
  const int slots = tokens * top_k;
  const std::vector<uint16_t> ids = RandomIds(tokens, top_k, experts, routing, rng);
  const CpuIndex want_index = ReferenceIndex(ids, experts);
  const std::vector<int32_t>& want_offsets = want_index.offsets;
  const std::vector<int32_t>& want_row_of_slot = want_index.row_of_slot;
  const std::vector<int32_t>& want_slot_of_row = want_index.slot_of_row;

  DeviceBuffer<uint16_t> d_ids(slots);
  DeviceBuffer<int32_t> d_offsets(experts + 1), d_row_of_slot(slots), d_slot_of_row(slots), d_load(experts);
  const size_t ws_bytes = MoeRouteIndexWorkspaceBytes(tokens, top_k, experts);
  DeviceBuffer<char> d_ws(ws_bytes);
  GROVE_CUDA_OK(d_ids.Upload(ids));
  Status s = MoeRouteIndex(d_ids.get(), tokens, top_k, experts, d_ws.get(), ws_bytes, d_offsets.get(),
                           d_row_of_slot.get(), d_slot_of_row.get(), d_load.get(), nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<int32_t> offsets, row_of_slot, slot_of_row, load;
  GROVE_CUDA_OK(d_offsets.Download(&offsets));
  ASSERT_EQ(offsets, want_offsets);
  if (slots == 0) return;
  GROVE_CUDA_OK(d_row_of_slot.Download(&row_of_slot));
  GROVE_CUDA_OK(d_slot_of_row.Download(&slot_of_row));
  GROVE_CUDA_OK(d_load.Download(&load));
  EXPECT_EQ(row_of_slot, want_row_of_slot);
  EXPECT_EQ(slot_of_row, want_slot_of_row);
  for (int e = 0; e < experts; ++e) EXPECT_EQ(load[e], want_offsets[e + 1] - want_offsets[e]) << "expert " << e;

  // Data: x, expert outputs c, gates, dy, da, and old y / dx for accumulate.
  std::vector<__nv_bfloat16> x, c, dy, da, y0, dx0;
  std::vector<double> xd, cd, dyd, dad, y0d, dx0d;
  testing::RandomBf16(rng, size_t(tokens) * hidden, &x, &xd);
  testing::RandomBf16(rng, size_t(slots) * hidden, &c, &cd);
  testing::RandomBf16(rng, size_t(tokens) * hidden, &dy, &dyd);
  testing::RandomBf16(rng, size_t(slots) * hidden, &da, &dad);
  testing::RandomBf16(rng, size_t(tokens) * hidden, &y0, &y0d);
  testing::RandomBf16(rng, size_t(tokens) * hidden, &dx0, &dx0d);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<float> gates(slots);
  for (float& g : gates) g = float(u(rng));
  DeviceBuffer<__nv_bfloat16> d_x(x.size()), d_a(c.size()), d_c(c.size()), d_y(y0.size()), d_dy(dy.size()),
      d_dc(c.size()), d_da(da.size()), d_dx(dx0.size());
  DeviceBuffer<float> d_gates(slots), d_dgates(slots);
  GROVE_CUDA_OK(d_x.Upload(x));
  GROVE_CUDA_OK(d_c.Upload(c));
  GROVE_CUDA_OK(d_dy.Upload(dy));
  GROVE_CUDA_OK(d_da.Upload(da));
  GROVE_CUDA_OK(d_gates.Upload(gates));
  GROVE_CUDA_OK(cudaMemset(d_a.get(), 0x7F, d_a.count() * 2));
  GROVE_CUDA_OK(cudaMemset(d_dc.get(), 0x7F, d_dc.count() * 2));

  ASSERT_TRUE(
      MoePermute(d_x.get(), d_row_of_slot.get(), d_slot_of_row.get(), d_a.get(), slots, top_k, hidden, nullptr).ok());
  std::vector<__nv_bfloat16> a;
  GROVE_CUDA_OK(d_a.Download(&a));
  size_t bad_gather = 0;
  for (int r = 0; r < slots; ++r)
    for (int j = 0; j < hidden; ++j) {
      const int sl = want_slot_of_row[r];
      const float want = sl < 0 ? 0.f : float(xd[size_t(sl / top_k) * hidden + j]);
      if (__bfloat162float(a[size_t(r) * hidden + j]) != want) ++bad_gather;
    }
  EXPECT_EQ(bad_gather, 0u);

  auto within = [](float out, double ref, double sum_abs, int terms) {
    return std::fabs(out - ref) <= 0x1p-8 * std::fabs(ref) + terms * 0x1p-24 * sum_abs + 1e-30;
  };
  for (int accumulate = 0; accumulate < 2; ++accumulate) {
    GROVE_CUDA_OK(d_y.Upload(y0));
    GROVE_CUDA_OK(d_dx.Upload(dx0));
    ASSERT_TRUE(MoeCombine(d_c.get(), d_gates.get(), d_row_of_slot.get(), d_y.get(), accumulate, tokens, top_k,
                           hidden, nullptr).ok());
    ASSERT_TRUE(MoePermuteBackward(d_da.get(), d_row_of_slot.get(), d_dx.get(), accumulate, tokens, top_k, hidden,
                                   nullptr).ok());
    std::vector<__nv_bfloat16> y, dx;
    GROVE_CUDA_OK(d_y.Download(&y));
    GROVE_CUDA_OK(d_dx.Download(&dx));
    size_t bad_y = 0, bad_dx = 0;
    for (int t = 0; t < tokens; ++t)
      for (int j = 0; j < hidden; ++j) {
        const size_t i = size_t(t) * hidden + j;
        double ry = accumulate ? y0d[i] : 0.0, ay = std::fabs(ry);
        double rx = accumulate ? dx0d[i] : 0.0, ax = std::fabs(rx);
        for (int k = 0; k < top_k; ++k) {
          const int row = want_row_of_slot[size_t(t) * top_k + k];
          if (row < 0) continue;
          const double term = gates[size_t(t) * top_k + k] * cd[size_t(row) * hidden + j];
          ry += term;
          ay += std::fabs(term);
          rx += dad[size_t(row) * hidden + j];
          ax += std::fabs(dad[size_t(row) * hidden + j]);
        }
        if (!within(__bfloat162float(y[i]), ry, ay, top_k + 1)) ++bad_y;
        if (!within(__bfloat162float(dx[i]), rx, ax, top_k + 1)) ++bad_dx;
      }
    EXPECT_EQ(bad_y, 0u) << "accumulate " << accumulate;
    EXPECT_EQ(bad_dx, 0u) << "accumulate " << accumulate;
  }

  ASSERT_TRUE(MoeCombineBackward(d_dy.get(), d_c.get(), d_gates.get(), d_row_of_slot.get(), d_dc.get(),
                                 d_dgates.get(), tokens, top_k, hidden, nullptr).ok());
  std::vector<__nv_bfloat16> dc;
  std::vector<float> dgates;
  GROVE_CUDA_OK(d_dc.Download(&dc));
  GROVE_CUDA_OK(d_dgates.Download(&dgates));
  size_t bad_dc = 0, bad_dg = 0;
  for (int t = 0; t < tokens; ++t)
    for (int k = 0; k < top_k; ++k) {
      const int row = want_row_of_slot[size_t(t) * top_k + k];
      const float g = gates[size_t(t) * top_k + k];
      double dot = 0, dot_abs = 0;
      if (row >= 0)
        for (int j = 0; j < hidden; ++j) {
          const double d = dyd[size_t(t) * hidden + j], cv = cd[size_t(row) * hidden + j];
          dot += d * cv;
          dot_abs += std::fabs(d * cv);
          if (!within(__bfloat162float(dc[size_t(row) * hidden + j]), g * d, std::fabs(g * d), 1)) ++bad_dc;
        }
      if (!(std::fabs(dgates[size_t(t) * top_k + k] - dot) <= hidden * 0x1p-24 * dot_abs + 1e-30)) ++bad_dg;
    }
  EXPECT_EQ(bad_dc, 0u);
  EXPECT_EQ(bad_dg, 0u);
}

TEST(MoePermuteTest, RandomRouting) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckMoe(1000, 6, 64, 64, Routing::kRandom);
  CheckMoe(777, 1, 3, 8, Routing::kRandom);
  CheckMoe(513, 16, 256, 24, Routing::kRandom);
}

TEST(MoePermuteTest, GpuReferenceShape) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckMoe(4099, 6, 64, 1024, Routing::kRandom);
}

TEST(MoePermuteTest, RaggedAndEmptyExperts) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckMoe(2000, 6, 64, 32, Routing::kOneExpert);   // every slot on one expert, 63 empty
  CheckMoe(2000, 6, 64, 32, Routing::kFewExperts);  // 5 experts used, ragged
  CheckMoe(1500, 4, 16, 16, Routing::kWithDropped);
  CheckMoe(0, 6, 64, 32, Routing::kRandom);
}

TEST(MoePermuteTest, OneBlockIndexEqualsTheReference) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckOneBlockIndex(1, 6, 64, Routing::kRandom);     // decode batch 1
  CheckOneBlockIndex(1, 8, 66, Routing::kRandom);     // + 2 folded shared experts
  CheckOneBlockIndex(32, 8, 66, Routing::kRandom);    // 256 slots: the limit
  CheckOneBlockIndex(16, 16, 256, Routing::kRandom);  // widest
  CheckOneBlockIndex(37, 5, 7, Routing::kFewExperts);
  CheckOneBlockIndex(40, 6, 64, Routing::kOneExpert);
  CheckOneBlockIndex(50, 4, 16, Routing::kWithDropped);
  CheckOneBlockIndex(3, 1, 1, Routing::kRandom);
  CheckOneBlockIndex(0, 6, 64, Routing::kRandom);
}

TEST(MoePermuteTest, RejectsBadShapes) {
  EXPECT_EQ(MoeRouteIndexOneBlock(nullptr, 33, 8, 64, nullptr, nullptr, nullptr, nullptr, nullptr).code(),
            StatusCode::kInvalidArgument);  // 264 slots > 256
  EXPECT_EQ(MoeRouteIndexOneBlock(nullptr, 1, 6, kMoeMaxExperts + 1, nullptr, nullptr, nullptr, nullptr, nullptr)
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MoeRouteIndex(nullptr, 4, 2, kMoeMaxExperts + 1, nullptr, 0, nullptr, nullptr, nullptr, nullptr, nullptr)
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MoePermute(nullptr, nullptr, nullptr, nullptr, 7, 2, 16, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(MoeCombine(nullptr, nullptr, nullptr, nullptr, false, 4, 2, 12, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MoeCombine(nullptr, nullptr, nullptr, nullptr, false, 4, 17, 16, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MoeCombineBackward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 4, 2, 16, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MoePermuteBackward(nullptr, nullptr, nullptr, false, 4, 2, 16, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
