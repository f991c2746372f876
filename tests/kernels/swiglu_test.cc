// SwiGLU forward and backward against a double CPU reference on fresh
// random bf16 inputs. Tolerances: fp32 arithmetic with __expf (a few ulp,
// ~1e-6 relative on the sigmoid), then one bf16 rounding (2^-9 relative):
// each element within 2^-8 of its magnitude plus 1e-5 of the magnitude of
// its factors (silu'(g) crosses zero near g = -1.28, where the relative
// error of the result is unbounded but the absolute one is not).
#include "kernels/swiglu.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
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

// The packed form ([g | u] per row) runs the same arithmetic as the flat
// form (checked against the reference above), so its outputs must equal the
// flat kernels' bit for bit on the same values; NaN-filled outputs show any
// element it fails to write, or writes in the wrong half.
void CheckPackedEqualsFlat(int64_t rows, int width) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " rows " + std::to_string(rows) + " width " + std::to_string(width));
  std::mt19937_64 rng(seed);
  const int64_t count = rows * width;
  std::vector<__nv_bfloat16> g, u, dh;
  std::vector<double> unused;
  testing::RandomBf16(rng, count, &g, &unused);
  testing::RandomBf16(rng, count, &u, &unused);
  testing::RandomBf16(rng, count, &dh, &unused);
  std::vector<__nv_bfloat16> gu(2 * count);
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < width; ++j) {
      gu[r * 2 * width + j] = g[r * width + j];
      gu[r * 2 * width + width + j] = u[r * width + j];
    }
  DeviceBuffer<__nv_bfloat16> d_g(count), d_u(count), d_dh(count), d_gu(2 * count), d_h(count), d_hp(count),
      d_dg(count), d_du(count), d_dgu(2 * count);
  GROVE_CUDA_OK(d_g.Upload(g));
  GROVE_CUDA_OK(d_u.Upload(u));
  GROVE_CUDA_OK(d_dh.Upload(dh));
  GROVE_CUDA_OK(d_gu.Upload(gu));
  GROVE_CUDA_OK(cudaMemset(d_hp.get(), 0xFF, count * 2));
  GROVE_CUDA_OK(cudaMemset(d_dgu.get(), 0xFF, 2 * count * 2));
  ASSERT_TRUE(SwiGluForward(d_g.get(), d_u.get(), d_h.get(), count, nullptr).ok());
  ASSERT_TRUE(SwiGluBackward(d_dh.get(), d_g.get(), d_u.get(), d_dg.get(), d_du.get(), count, nullptr).ok());
  ASSERT_TRUE(SwiGluForwardPacked(d_gu.get(), d_hp.get(), rows, width, nullptr).ok());
  ASSERT_TRUE(SwiGluBackwardPacked(d_dh.get(), d_gu.get(), d_dgu.get(), rows, width, nullptr).ok());
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> h, hp, dg, du, dgu;
  GROVE_CUDA_OK(d_h.Download(&h));
  GROVE_CUDA_OK(d_hp.Download(&hp));
  GROVE_CUDA_OK(d_dg.Download(&dg));
  GROVE_CUDA_OK(d_du.Download(&du));
  GROVE_CUDA_OK(d_dgu.Download(&dgu));
  auto bits = [](__nv_bfloat16 v) { return __bfloat16_as_ushort(v); };
  size_t bad = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < width; ++j) {
      const int64_t i = r * width + j, p = r * 2 * width + j;
      bad += bits(hp[i]) != bits(h[i]);
      bad += bits(dgu[p]) != bits(dg[i]);
      bad += bits(dgu[p + width]) != bits(du[i]);
    }
  EXPECT_EQ(bad, 0u);
}

TEST(SwiGluTest, PackedEqualsFlat) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckPackedEqualsFlat(1, 8);
  CheckPackedEqualsFlat(3, 1032);
  CheckPackedEqualsFlat(1000, 512);
  CheckPackedEqualsFlat(70001, 512);  // more chunks than the grid: the grid-stride loop
}

// The gated backward of the MoE (swiglu.h: the router gate kept out of the
// GEMMs) against a double reference: rows in a random slot order, gates in
// (0, 1]; dg, du and gate * h within the elementwise bound above; each
// slot's dgate = <dh_ungated, h> within 1e-5 of the sum of |terms| (fp32
// accumulation over `width` products, __expf's few ulp) -- and written for
// every slot (the buffer starts as NaN).
void CheckGated(int64_t tokens, int top_k, int width) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " tokens " + std::to_string(tokens) + " width " +
               std::to_string(width));
  std::mt19937_64 rng(seed);
  const int64_t rows = tokens * top_k, count = rows * width;
  std::vector<__nv_bfloat16> gu_bf(2 * count), dhu_bf;
  std::vector<double> dhu, gu_d;
  testing::RandomBf16(rng, 2 * count, &gu_bf, &gu_d);
  for (int64_t r = 0; r < rows; ++r)  // g spans silu's interesting range: [-6, 6]
    for (int j = 0; j < width; ++j) {
      const int64_t i = r * 2 * width + j;
      gu_bf[i] = __float2bfloat16(6.f * __bfloat162float(gu_bf[i]));
      gu_d[i] = __bfloat162float(gu_bf[i]);
    }
  testing::RandomBf16(rng, count, &dhu_bf, &dhu);
  std::vector<int32_t> slot_of_row(rows);
  for (int64_t r = 0; r < rows; ++r) slot_of_row[r] = int32_t(r);
  std::shuffle(slot_of_row.begin(), slot_of_row.end(), rng);
  std::vector<float> gates(rows);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  for (float& g : gates) g = 1.f - unit(rng);  // (0, 1]
  DeviceBuffer<__nv_bfloat16> d_dhu(count), d_gu(2 * count), d_dgu(2 * count), d_hg(count);
  DeviceBuffer<int32_t> d_slot(rows);
  DeviceBuffer<float> d_gates(rows), d_dgates(rows);
  GROVE_CUDA_OK(d_dhu.Upload(dhu_bf));
  GROVE_CUDA_OK(d_gu.Upload(gu_bf));
  GROVE_CUDA_OK(d_slot.Upload(slot_of_row));
  GROVE_CUDA_OK(d_gates.Upload(gates));
  GROVE_CUDA_OK(cudaMemset(d_dgu.get(), 0xFF, 2 * count * 2));
  GROVE_CUDA_OK(cudaMemset(d_hg.get(), 0xFF, count * 2));
  GROVE_CUDA_OK(cudaMemset(d_dgates.get(), 0xFF, rows * 4));
  ASSERT_TRUE(SwiGluBackwardGated(d_dhu.get(), d_gu.get(), d_slot.get(), d_gates.get(), d_dgu.get(), d_hg.get(),
                                  d_dgates.get(), rows, width, nullptr)
                  .ok());
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> dgu, hg;
  std::vector<float> dgates;
  GROVE_CUDA_OK(d_dgu.Download(&dgu));
  GROVE_CUDA_OK(d_hg.Download(&hg));
  GROVE_CUDA_OK(d_dgates.Download(&dgates));
  size_t bad = 0, bad_dgate = 0;
  auto check = [&](double got, double want, double scale) {
    if (!(std::fabs(got - want) <= std::ldexp(1.0, -8) * std::fabs(want) + 1e-5 * scale + 1e-30)) ++bad;
  };
  for (int64_t r = 0; r < rows; ++r) {
    const double gate = gates[slot_of_row[r]];
    double dot = 0, dot_abs = 0;
    for (int j = 0; j < width; ++j) {
      const double g = gu_d[r * 2 * width + j], u = gu_d[r * 2 * width + width + j];
      const double dh_u = dhu[r * width + j], dh = gate * dh_u;
      const double sg = 1.0 / (1.0 + std::exp(-g)), h = g * sg * u;
      dot += dh_u * h;
      dot_abs += std::fabs(dh_u * h);
      check(__bfloat162float(dgu[r * 2 * width + j]), dh * u * sg * (1.0 + g * (1.0 - sg)),
            std::fabs(dh * u) * (1.0 + std::fabs(g)));
      check(__bfloat162float(dgu[r * 2 * width + width + j]), dh * g * sg, std::fabs(dh * g));
      check(__bfloat162float(hg[r * width + j]), gate * h, std::fabs(gate * g * u));
    }
    const double got = dgates[slot_of_row[r]];
    if (!(std::fabs(got - dot) <= 1e-5 * dot_abs + 1e-30)) ++bad_dgate;
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(bad_dgate, 0u);
}

TEST(SwiGluTest, GatedBackwardMatchesReference) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckGated(1, 1, 8);
  CheckGated(37, 6, 264);  // width not a multiple of 32 chunks: lanes without a chunk
  CheckGated(2000, 6, 512);
  CheckGated(6000, 6, 512);  // more rows than the grid's warps: the grid-stride loop
}

TEST(SwiGluTest, RejectsBadCounts) {
  alignas(16) static __nv_bfloat16 buf[16];
  EXPECT_EQ(SwiGluForward(buf, buf, buf, 12, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGluBackward(buf, buf, buf, buf, buf, -8, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGluForward(buf + 1, buf, buf, 8, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGluForwardPacked(buf, buf, 1, 12, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGluBackwardPacked(buf, buf, buf, -1, 8, nullptr).code(), StatusCode::kInvalidArgument);
  alignas(16) static int32_t slots[4];
  alignas(16) static float gates[4];
  EXPECT_EQ(SwiGluBackwardGated(buf, buf, nullptr, gates, buf, buf, gates, 1, 8, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGluBackwardGated(buf, buf, slots, gates, buf, buf, gates, 1, 12, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SwiGluBackwardPacked(buf, buf + 1, buf, 1, 8, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
