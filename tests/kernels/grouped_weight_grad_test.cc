// GroupedWeightGrad against a double-precision CPU reference on fresh random
// inputs: ragged experts (0, 1, non-multiples of 32 rows), 1 and 64
// experts, gpu-ref's shapes and small odd-but-aligned ones, accumulate and
// overwrite, one and two outputs.
//
// Tolerances. dY and X are bf16 and the reference sees the same values in
// double, so each product dY[t, j] X[t, i] is exact in fp32 and the only
// error is the fp32 summation of T_e products (T_e = the expert's rows),
// plus one rounding when adding to the old G. Element-wise bound, as in
// grouped_gemm_test: |err| <= 2 * T_e * 2^-23 * sum_t |dY X| (2^-23: the
// tensor cores' fp32 adds may truncate; factor 2 slack), + 2^-23 * |G|.
// Norm-wise: random signs make the error ~sqrt(T_e) * 2^-24 relative if
// rounded, up to ~T_e / 16 * 2^-23 if truncated once per 16-row mma
// (T_e <= ~1000 here: <= 1e-5); we assert 1e-4. A lost row block, a wrong
// index or a race gives >= 1/sqrt(T_e) ~ 3e-2 and fails both.
#include "kernels/grouped_weight_grad.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

// Starting value of G for overwrite, and of the gaps between experts' G.
constexpr float kSentinel = 12345.f;

struct Case {
  std::vector<int> counts;  // rows per expert
  int n = 0, k = 0;
  int64_t stride = 0;       // 0: n * k
  bool accumulate = true;
  bool two_outputs = false;
  int extra_rows = 0;       // NaN rows past the last expert: must never be read
};

// G[e][j][i] = sum over expert e's rows t of dy[t, j] * x[t, i], and the
// matching sums of |terms|.
void Reference(const std::vector<double>& dy, const std::vector<double>& x,
               const std::vector<int32_t>& offsets, int n, int k, std::vector<double>* g,
               std::vector<double>* abs_sum) {
  const size_t experts = offsets.size() - 1, nk = static_cast<size_t>(n) * k;
  g->assign(experts * nk, 0.0);
  abs_sum->assign(experts * nk, 0.0);
  for (size_t e = 0; e < experts; ++e) {
    double* ge = g->data() + e * nk;
    double* ae = abs_sum->data() + e * nk;
    for (int t = offsets[e]; t < offsets[e + 1]; ++t) {
      const double* dyt = dy.data() + static_cast<size_t>(t) * n;
      const double* xt = x.data() + static_cast<size_t>(t) * k;
      for (int j = 0; j < n; ++j) {
        const double d = dyt[j];
        double* gr = ge + static_cast<size_t>(j) * k;
        double* ar = ae + static_cast<size_t>(j) * k;
        for (int i = 0; i < k; ++i) {
          gr[i] += d * xt[i];
          ar[i] += std::fabs(d * xt[i]);
        }
      }
    }
  }
}

// Compares one output's G buffer (`got`, started as `g0`) with the reference.
void CheckOutput(const Case& c, const char* what, int64_t stride, const std::vector<float>& g0,
                 const std::vector<float>& got, const std::vector<double>& ref,
                 const std::vector<double>& abs_sum) {
  const int experts = static_cast<int>(c.counts.size());
  const int64_t nk = static_cast<int64_t>(c.n) * c.k;
  const int k = c.k;
  double err2 = 0, ref2 = 0;
  int bad = 0;
  for (int e = 0; e < experts; ++e) {
    const int rows = c.counts[e];
    for (int64_t i = 0; i < nk; ++i) {
      const size_t at = static_cast<size_t>(e * stride + i);
      const double start = c.accumulate ? g0[at] : 0.0;
      const double want = start + ref[e * nk + i];
      const double out = got[at];
      if (rows == 0 && c.accumulate) {
        // Untouched, bit for bit.
        if (std::memcmp(&got[at], &g0[at], sizeof(float)) != 0 && bad++ < 5)
          ADD_FAILURE() << "empty expert " << e << " element " << i << " changed: " << out;
        continue;
      }
      const double bound = 2.0 * rows * std::ldexp(1.0, -23) * abs_sum[e * nk + i] +
                           std::ldexp(1.0, -23) * (std::fabs(want) + std::fabs(start)) + 1e-30;
      if (!(std::fabs(out - want) <= bound) && bad++ < 5)
        ADD_FAILURE() << "expert " << e << " (" << rows << " rows) G[" << i / k << ", " << i % k
                      << "] = " << out << ", want " << want << " (bound " << bound << ")";
      err2 += (out - want) * (out - want);
      ref2 += (want - start) * (want - start);
    }
    // Gap after this expert (stride > n * k): never written.
    if (e + 1 < experts) {
      for (int64_t i = nk; i < stride; ++i) {
        if (got[e * stride + i] != kSentinel && bad++ < 5)
          ADD_FAILURE() << "gap element " << e * stride + i << " written: " << got[e * stride + i];
      }
    }
  }
  EXPECT_EQ(bad, 0);
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0;
  std::printf("  experts=%d n=%d k=%d %s: relative L2 error %.3g\n", experts, c.n, c.k, what, rel);
  EXPECT_LE(rel, 1e-4);
}

// GroupedWeightGradArgs::sum_sq's blocks of G_e (128 x 128) and slots a block.
constexpr int kSquareBlock = 128, kSlotsPerBlock = 8;

// Each block's sum of squares of `g` (one output's buffer), long double, in
// sum_sq's slot order: [expert][row block][column block].
std::vector<long double> BlockSquares(const Case& c, int64_t stride, const std::vector<float>& g) {
  const int rbs = (c.n + kSquareBlock - 1) / kSquareBlock, cbs = (c.k + kSquareBlock - 1) / kSquareBlock;
  std::vector<long double> out(c.counts.size() * rbs * cbs, 0.0L);
  for (size_t e = 0; e < c.counts.size(); ++e)
    for (int r = 0; r < c.n; ++r)
      for (int i = 0; i < c.k; ++i) {
        const long double v = g[e * stride + static_cast<int64_t>(r) * c.k + i];
        out[(e * rbs + r / kSquareBlock) * cbs + i / kSquareBlock] += v * v;
      }
  return out;
}

// sum_sq's slots laid out for these outputs' blocks: a block's sum in its
// first slot, zeros in the others (what a buffer that describes G may hold).
std::vector<double> SlotsOf(const Case& c, const std::vector<std::vector<long double>>& blocks) {
  const size_t per_output = blocks[0].size() / c.counts.size();
  std::vector<double> slots(blocks.size() * blocks[0].size() * kSlotsPerBlock, 0.0);
  for (size_t e = 0; e < c.counts.size(); ++e)
    for (size_t o = 0; o < blocks.size(); ++o)
      for (size_t b = 0; b < per_output; ++b)
        slots[((e * blocks.size() + o) * per_output + b) * kSlotsPerBlock] =
            static_cast<double>(blocks[o][e * per_output + b]);
  return slots;
}

const WeightGradImpl kImpls[] = {WeightGradImpl::kAuto,      WeightGradImpl::kMmaSync,
                                 WeightGradImpl::kWgmma,     WeightGradImpl::kWgmmaN256,
                                 WeightGradImpl::kTma,       WeightGradImpl::kTmaN128,
                                 WeightGradImpl::kTmaPersistentRed,
                                 WeightGradImpl::kTmaPersistentN256};

bool CanRun(WeightGradImpl impl) {
  int dev = 0, major = 0, minor = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  const bool wgmma = impl == WeightGradImpl::kWgmma || impl == WeightGradImpl::kWgmmaN256 ||
                     impl == WeightGradImpl::kTma || impl == WeightGradImpl::kTmaN128 ||
                     impl == WeightGradImpl::kTmaPersistentRed ||
                     impl == WeightGradImpl::kTmaPersistentN256;
  return wgmma ? major == 9 && minor == 0 : major >= 8;
}

void RunCase(const Case& c) {
  const uint64_t seed = testing::FreshSeed();
  const int experts = static_cast<int>(c.counts.size());
  const int n = c.n, k = c.k;
  const int64_t nk = static_cast<int64_t>(n) * k;
  const int64_t stride = c.stride > 0 ? c.stride : nk;
  SCOPED_TRACE("seed " + std::to_string(seed) + " experts=" + std::to_string(experts) +
               " n=" + std::to_string(n) + " k=" + std::to_string(k) +
               (c.accumulate ? " accumulate" : " overwrite") + (c.two_outputs ? " two" : " one"));
  std::mt19937_64 rng(seed);
  std::vector<int32_t> offsets(experts + 1, 0);
  for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + c.counts[e];
  const int routed = offsets.back(), total_rows = routed + c.extra_rows;
  const int outputs = c.two_outputs ? 2 : 1;

  // Inputs; rows past `routed` are NaN (bf16 0xFFFF).
  std::vector<std::vector<__nv_bfloat16>> dy_bf(outputs);
  std::vector<std::vector<double>> dy(outputs);
  std::vector<__nv_bfloat16> x_bf;
  std::vector<double> x;
  auto poison_tail = [&](std::vector<__nv_bfloat16>* v, int cols) {
    __nv_bfloat16_raw nan_bits;
    nan_bits.x = 0xFFFF;
    for (size_t i = static_cast<size_t>(routed) * cols; i < v->size(); ++i) (*v)[i] = nan_bits;
  };
  for (int o = 0; o < outputs; ++o) {
    testing::RandomBf16(rng, static_cast<size_t>(total_rows) * n, &dy_bf[o], &dy[o]);
    poison_tail(&dy_bf[o], n);
  }
  testing::RandomBf16(rng, static_cast<size_t>(total_rows) * k, &x_bf, &x);
  poison_tail(&x_bf, k);

  // Gradient buffers: stride per expert (gaps included), starting values
  // random in [-1, 1] for accumulate, a sentinel for overwrite; gaps keep
  // the sentinel and must not change.
  const size_t g_elems = static_cast<size_t>(stride) * (experts - 1) + nk;
  std::vector<std::vector<float>> g0(outputs, std::vector<float>(g_elems, kSentinel));
  std::uniform_real_distribution<float> unit(-1.f, 1.f);
  for (int o = 0; o < outputs && c.accumulate; ++o)
    for (int e = 0; e < experts; ++e)
      for (int64_t i = 0; i < nk; ++i) g0[o][e * stride + i] = unit(rng);

  DeviceBuffer<__nv_bfloat16> d_x(std::max<size_t>(x_bf.size(), 8));
  DeviceBuffer<int32_t> d_off(offsets.size());
  std::vector<std::unique_ptr<DeviceBuffer<__nv_bfloat16>>> d_dy;
  std::vector<std::unique_ptr<DeviceBuffer<float>>> d_g;
  for (int o = 0; o < outputs; ++o) {
    d_dy.push_back(std::make_unique<DeviceBuffer<__nv_bfloat16>>(std::max<size_t>(dy_bf[o].size(), 8)));
    d_g.push_back(std::make_unique<DeviceBuffer<float>>(g_elems));
    ASSERT_TRUE(d_dy[o]->get() && d_g[o]->get());
    if (total_rows > 0) {
      GROVE_CUDA_OK(d_dy[o]->Upload(dy_bf[o]));
    }
  }
  ASSERT_TRUE(d_x.get() && d_off.get());
  if (total_rows > 0) {
    GROVE_CUDA_OK(d_x.Upload(x_bf));
  }
  GROVE_CUDA_OK(d_off.Upload(offsets));

  std::vector<std::vector<double>> ref(outputs), abs_sum(outputs);
  for (int o = 0; o < outputs; ++o) Reference(dy[o], x, offsets, n, k, &ref[o], &abs_sum[o]);

  // sum_sq starts as the squares of the starting G (blocks of empty experts
  // must keep them when accumulating; every other block is rewritten).
  std::vector<std::vector<long double>> start_blocks;
  for (int o = 0; o < outputs; ++o) start_blocks.push_back(BlockSquares(c, stride, g0[o]));
  const std::vector<double> slots0 = SlotsOf(c, start_blocks);
  DeviceBuffer<double> d_slots(slots0.size());
  ASSERT_TRUE(d_slots.get());

  for (WeightGradImpl impl : kImpls) {
    if (!CanRun(impl)) continue;
    SCOPED_TRACE(WeightGradImplName(impl));
    for (int o = 0; o < outputs; ++o) {
      GROVE_CUDA_OK(d_g[o]->Upload(g0[o]));
    }
    GROVE_CUDA_OK(d_slots.Upload(slots0));
    GroupedWeightGradArgs args;
    args.dy = d_dy[0]->get();
    args.x = d_x.get();
    args.expert_offsets = d_off.get();
    args.total_rows = total_rows;
    args.num_experts = experts;
    args.n = n;
    args.k = k;
    args.g = d_g[0]->get();
    args.g_expert_stride = stride;
    if (c.two_outputs) {
      args.dy2 = d_dy[1]->get();
      args.g2 = d_g[1]->get();
    }
    args.accumulate = c.accumulate;
    args.sum_sq = d_slots.get();
    ASSERT_EQ(GroupedWeightGradSquareSlots(args), static_cast<int64_t>(slots0.size()));
    const Status s = GroupedWeightGrad(args, nullptr, impl);
    ASSERT_TRUE(s.ok()) << s;
    GROVE_CUDA_OK(cudaDeviceSynchronize());
    std::vector<std::vector<long double>> got_blocks;
    for (int o = 0; o < outputs; ++o) {
      SCOPED_TRACE("output " + std::to_string(o));
      std::vector<float> got;
      GROVE_CUDA_OK(d_g[o]->Download(&got));
      const std::string what = std::string(WeightGradImplName(impl)) + " output " + std::to_string(o);
      CheckOutput(c, what.c_str(), stride, g0[o], got, ref[o], abs_sum[o]);
      got_blocks.push_back(BlockSquares(c, stride, got));
    }
    // Each block's eight slots sum to its elements' squares: fp32 squares
    // and per-thread sums of <= 64 of them err by <= 64 * 2^-24 ~ 3.8e-6
    // relative (all terms positive); a missed, misplaced or stale slot is
    // off by a whole block (>= 1% between random blocks, the sentinel's
    // 1.5e8 per element where overwrite should have written).
    std::vector<double> slots;
    GROVE_CUDA_OK(d_slots.Download(&slots));
    const std::vector<double> want = SlotsOf(c, got_blocks);
    int bad = 0;
    for (size_t b = 0; b < want.size() / kSlotsPerBlock; ++b) {
      double sum = 0;
      for (int w = 0; w < kSlotsPerBlock; ++w) sum += slots[b * kSlotsPerBlock + w];
      const double expect = want[b * kSlotsPerBlock];
      if (!(std::fabs(sum - expect) <= 1e-5 * expect + 1e-30) && bad++ < 5)
        ADD_FAILURE() << "sum_sq block " << b << ": slots sum to " << sum << ", G's squares " << expect;
    }
    EXPECT_EQ(bad, 0);
  }
}

// Skewed routing like a real batch: log-normal popularity, scaled to about
// `total` rows, with the edge cases forced in front.
std::vector<int> SkewedCounts(int experts, int total, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::lognormal_distribution<double> pop(0.0, 0.7);
  std::vector<double> w(experts);
  double sum = 0;
  for (double& v : w) sum += (v = pop(rng));
  std::vector<int> counts(experts);
  for (int e = 0; e < experts; ++e) counts[e] = static_cast<int>(w[e] / sum * total);
  const int forced[] = {0, 1, 31, 33, 0, 64, 97};
  for (int i = 0; i < experts && i < 7; ++i) counts[i] = forced[i];
  return counts;
}

// The simplest case first: one expert, one 128 x 128 tile, one 16-row step.
TEST(GroupedWeightGradTest, OneTileOneStep) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({.counts = {16}, .n = 128, .k = 128, .accumulate = false});
}

TEST(GroupedWeightGradTest, SmallRaggedAccumulate) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({.counts = {0, 1, 33, 64, 95, 0, 7}, .n = 40, .k = 24, .accumulate = true,
           .extra_rows = 5});
}

TEST(GroupedWeightGradTest, SmallRaggedOverwriteWithGaps) {
  GROVE_SKIP_WITHOUT_GPU();
  // Overwrite: the empty experts' G become zero; stride leaves gaps.
  RunCase({.counts = {5, 0, 130, 1}, .n = 136, .k = 200, .stride = 136 * 200 + 24,
           .accumulate = false, .extra_rows = 3});
}

TEST(GroupedWeightGradTest, OneExpertOddShapes) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({.counts = {77}, .n = 264, .k = 136, .accumulate = true});
  RunCase({.counts = {257}, .n = 8, .k = 1032, .accumulate = false});
}

TEST(GroupedWeightGradTest, TwoOutputsSmall) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({.counts = {3, 0, 45, 32}, .n = 56, .k = 144, .stride = 3 * 56 * 144,
           .accumulate = true, .two_outputs = true, .extra_rows = 2});
  RunCase({.counts = {0, 19}, .n = 136, .k = 40, .accumulate = false, .two_outputs = true});
}

// gpu-ref's per-layer shapes (H = 1024, F = 512, 64 experts) with a skewed
// routing of ~2000 rows (the CPU reference is the cost: ~1e9 products each).
TEST(GroupedWeightGradTest, GpuRefW2) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({.counts = SkewedCounts(64, 1500, testing::FreshSeed()), .n = 1024, .k = 512,
           .stride = 1024 * 512 + 64, .accumulate = true, .extra_rows = 1});
}

TEST(GroupedWeightGradTest, GpuRefW1W3) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({.counts = SkewedCounts(64, 1000, testing::FreshSeed()), .n = 512, .k = 1024,
           .stride = 1024 * 512 + 64, .accumulate = true, .two_outputs = true});
}

TEST(GroupedWeightGradTest, NoRowsOverwriteZeroes) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({.counts = {0, 0, 0}, .n = 16, .k = 8, .accumulate = false});
}

// More experts than the persistent kernels rank in shared memory (1024):
// their queue keeps expert order. One tiny tile each.
TEST(GroupedWeightGradTest, ManyExpertsUnranked) {
  GROVE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(testing::FreshSeed());
  std::vector<int> counts(1100);
  for (int& c : counts) c = static_cast<int>(rng() % 5);
  RunCase({.counts = counts, .n = 16, .k = 8, .accumulate = true, .extra_rows = 2});
}

// The persistent implementations reduce each tile over the same rows in the
// same order as the plain-grid kernel of their tiling and add to G once:
// the same bits, at gpu-ref scale (many tiles per CTA, long experts), for
// accumulate and overwrite. No CPU reference (the sums are checked above).
TEST(GroupedWeightGradTest, PersistentSameBitsAsPlainGrid) {
  GROVE_SKIP_WITHOUT_GPU();
  if (!CanRun(WeightGradImpl::kTmaPersistentN256)) GTEST_SKIP() << "needs sm_90";
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> unit(-1.f, 1.f);
  const std::vector<int> counts = SkewedCounts(64, 40000, seed);
  std::vector<int32_t> offsets(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int rows = offsets.back() + 3, experts = static_cast<int>(counts.size());
  struct Shape { int n, k; bool two, accumulate; };
  for (const Shape sh : {Shape{1024, 512, false, true}, Shape{512, 1024, true, false}}) {
    SCOPED_TRACE("n=" + std::to_string(sh.n) + " k=" + std::to_string(sh.k));
    const int64_t stride = 3LL * sh.n * sh.k;
    auto random_bf16 = [&](size_t count) {
      std::vector<__nv_bfloat16> v(count);
      for (auto& b : v) b = __float2bfloat16(unit(rng));
      return v;
    };
    const int outputs = sh.two ? 2 : 1;
    DeviceBuffer<__nv_bfloat16> d_dy(static_cast<size_t>(rows) * sh.n * outputs),
        d_x(static_cast<size_t>(rows) * sh.k);
    DeviceBuffer<int32_t> d_off(offsets.size());
    const size_t g_elems = static_cast<size_t>(stride) * experts;
    DeviceBuffer<float> d_g(g_elems);
    ASSERT_TRUE(d_dy.get() && d_x.get() && d_off.get() && d_g.get());
    GROVE_CUDA_OK(d_dy.Upload(random_bf16(static_cast<size_t>(rows) * sh.n * outputs)));
    GROVE_CUDA_OK(d_x.Upload(random_bf16(static_cast<size_t>(rows) * sh.k)));
    GROVE_CUDA_OK(d_off.Upload(offsets));
    std::vector<float> g0(g_elems);
    for (float& v : g0) v = unit(rng);
    auto run = [&](WeightGradImpl impl, std::vector<float>* got) {
      GROVE_CUDA_OK(d_g.Upload(g0));
      GroupedWeightGradArgs args;
      args.dy = d_dy.get();
      args.x = d_x.get();
      args.expert_offsets = d_off.get();
      args.total_rows = rows;
      args.num_experts = experts;
      args.n = sh.n;
      args.k = sh.k;
      args.g = d_g.get();
      args.g_expert_stride = stride;
      if (sh.two) {
        args.dy2 = d_dy.get() + static_cast<size_t>(rows) * sh.n;
        args.g2 = d_g.get() + static_cast<int64_t>(sh.n) * sh.k;
      }
      args.accumulate = sh.accumulate;
      const Status s = GroupedWeightGrad(args, nullptr, impl);
      ASSERT_TRUE(s.ok()) << s;
      GROVE_CUDA_OK(cudaDeviceSynchronize());
      GROVE_CUDA_OK(d_g.Download(got));
    };
    const std::pair<WeightGradImpl, WeightGradImpl> pairs[] = {
        {WeightGradImpl::kTmaN128, WeightGradImpl::kTmaPersistentRed},
        {WeightGradImpl::kTma, WeightGradImpl::kTmaPersistentN256}};
    for (const auto& [plain, persistent] : pairs) {
      SCOPED_TRACE(std::string(WeightGradImplName(persistent)) + " vs " +
                   WeightGradImplName(plain));
      std::vector<float> want, got;
      run(plain, &want);
      run(persistent, &got);
      ASSERT_EQ(want.size(), got.size());
      size_t differ = 0, first = 0;
      for (size_t i = 0; i < want.size(); ++i)
        if (std::memcmp(&want[i], &got[i], sizeof(float)) != 0 && differ++ == 0) first = i;
      EXPECT_EQ(differ, 0u) << "first at " << first << ": " << got[first] << " vs " << want[first];
    }
  }
}

// Argument checks happen before any CUDA call: runs without a GPU too.
TEST(GroupedWeightGradTest, RejectsBadArguments) {
  alignas(16) static __nv_bfloat16 bf[64];
  alignas(16) static float f[256];
  alignas(16) static int32_t off[4];
  GroupedWeightGradArgs ok;
  ok.dy = bf;
  ok.x = bf;
  ok.expert_offsets = off;
  ok.total_rows = 4;
  ok.num_experts = 2;
  ok.n = 8;
  ok.k = 8;
  ok.g = f;
  ok.g_expert_stride = 64;
  auto expect_invalid = [](GroupedWeightGradArgs a, const char* what) {
    const Status s = GroupedWeightGrad(a, nullptr);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << what << ": " << s;
  };
  GroupedWeightGradArgs a = ok;
  a.n = 12;
  expect_invalid(a, "n not a multiple of 8");
  a = ok;
  a.k = 0;
  expect_invalid(a, "k = 0");
  a = ok;
  a.num_experts = 0;
  expect_invalid(a, "no experts");
  a = ok;
  a.total_rows = -1;
  expect_invalid(a, "negative rows");
  a = ok;
  a.g = f + 1;
  expect_invalid(a, "misaligned G");
  a = ok;
  a.x = bf + 1;
  expect_invalid(a, "misaligned X");
  a = ok;
  a.g_expert_stride = 32;
  expect_invalid(a, "overlapping experts");
  a = ok;
  a.g_expert_stride = 66;
  expect_invalid(a, "stride not a multiple of 4");
  a = ok;
  a.dy2 = bf;
  expect_invalid(a, "dy2 without g2");
  a = ok;
  a.dy = nullptr;
  expect_invalid(a, "null dY");
  a = ok;
  a.expert_offsets = nullptr;
  expect_invalid(a, "null offsets");
}

}  // namespace
}  // namespace grove::kernels
