// The grouped expert GEMM against a plain double-precision CPU reference, on
// fresh random inputs, for every implementation and both output types.
//
// Tolerances. The inputs are bf16 and the reference sees exactly the same
// bf16 values (in double), so the only differences are (1) the fp32
// accumulation of k products (each product of two bf16 is exact in fp32):
// |err| <= k * u * sum_k |a_k w_k| with u = 2^-23 for truncating adders
// (the element-wise bound checked below, with a factor 2 slack), and
// typically ~sqrt(k) * 2^-24 relative, far under the norm-wise 2e-5; and
// (2) for bf16 output, one rounding to 8 significant bits: at most 2^-9
// relative per element (element bound 2^-8 |ref|, norm-wise 5e-3). A wrong
// index, a lost k block or a race gives errors of order 1e-1 and more.
#include "kernels/grouped_gemm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/swiglu.h"
#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;
using testing::IsHopper;
using testing::RelativeError;

// C[r, j] = sum_k A[r, k] * W[e(r), j, k] in double, with |.|-sums for the bound.
void ReferenceGroupedGemm(const std::vector<double>& a, const std::vector<double>& w,
                          const std::vector<int32_t>& offsets, int n, int k,
                          std::vector<double>* c, std::vector<double>* abs_sum) {
  const int rows = offsets.back();
  c->assign(static_cast<size_t>(rows) * n, 0.0);
  abs_sum->assign(static_cast<size_t>(rows) * n, 0.0);
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const double* we = w.data() + e * static_cast<size_t>(n) * k;
    for (int r = offsets[e]; r < offsets[e + 1]; ++r) {
      const double* ar = a.data() + static_cast<size_t>(r) * k;
      for (int j = 0; j < n; ++j) {
        const double* wj = we + static_cast<size_t>(j) * k;
        double s = 0, sa = 0;
        for (int i = 0; i < k; ++i) {
          s += ar[i] * wj[i];
          sa += std::fabs(ar[i] * wj[i]);
        }
        (*c)[static_cast<size_t>(r) * n + j] = s;
        (*abs_sum)[static_cast<size_t>(r) * n + j] = sa;
      }
    }
  }
}

const GroupedGemmImpl kAllImpls[] = {GroupedGemmImpl::kAuto, GroupedGemmImpl::kWgmmaBn128,
                                     GroupedGemmImpl::kWgmmaBn256, GroupedGemmImpl::kWgmmaBn256Bk32,
                                     GroupedGemmImpl::kWgmmaPingpong, GroupedGemmImpl::kWgmmaCluster,
                                     GroupedGemmImpl::kWgmmaStaged,
                                     GroupedGemmImpl::kMmaSync,
                                     GroupedGemmImpl::kWmma};

// The implementations documented to read kMnMajor weights (kAuto: whatever
// it picks must).
bool ReadsMnMajor(GroupedGemmImpl impl) {
  return impl == GroupedGemmImpl::kAuto || impl == GroupedGemmImpl::kWgmmaBn128 ||
         impl == GroupedGemmImpl::kWgmmaBn256 || impl == GroupedGemmImpl::kWgmmaPingpong ||
         impl == GroupedGemmImpl::kWgmmaStaged || impl == GroupedGemmImpl::kMmaSync;
}


// The experts' weights [experts, n, k] as GroupedGemm reads them: the
// stored matrix per expert is [n, k], or [k, n] for kMnMajor; gap_rows > 0:
// w_expert_rows = own rows + gap_rows apart, the rows between them NaN.
std::vector<__nv_bfloat16> StoredWeights(std::vector<__nv_bfloat16> w_bf, int experts, int n, int k,
                                         GemmWeightLayout layout, int gap_rows) {
  const bool mn = layout == GemmWeightLayout::kMnMajor;
  const int own_rows = mn ? k : n, row_len = mn ? n : k;
  if (mn) {
    std::vector<__nv_bfloat16> t(w_bf.size());
    for (int e = 0; e < experts; ++e)
      for (int j = 0; j < n; ++j)
        for (int i = 0; i < k; ++i)
          t[(static_cast<size_t>(e) * k + i) * n + j] = w_bf[(static_cast<size_t>(e) * n + j) * k + i];
    w_bf = std::move(t);
  }
  if (gap_rows > 0) {
    __nv_bfloat16_raw nan_bits;
    nan_bits.x = 0x7FC0;
    const size_t expert_elems = static_cast<size_t>(n) * k;
    const size_t stride = static_cast<size_t>(own_rows + gap_rows) * row_len;
    std::vector<__nv_bfloat16> spaced((experts - 1) * stride + expert_elems, nan_bits);
    for (int e = 0; e < experts; ++e)
      std::copy(w_bf.begin() + e * expert_elems, w_bf.begin() + (e + 1) * expert_elems,
                spaced.begin() + e * stride);
    w_bf = std::move(spaced);
  }
  return w_bf;
}

// Runs every implementation and output type on one routing and compares
// each with the reference. `extra_rows` rows of A/C past offsets.back()
// must stay untouched. gap_rows > 0: the experts' weights lie
// w_expert_rows = n + gap_rows rows apart (as in the model's parameter
// layout), the rows between them NaN, so a weight read from a gap (or from
// the wrong expert) shows in a stored column. kMnMajor: each expert's
// weight is stored transposed ([k, n]; rows of n, gap_rows of them after
// its k), and the implementations that do not read that layout must
// refuse it with InvalidArgument (and write nothing).
void CheckCase(const std::vector<int>& counts, int n, int k, int extra_rows, int gap_rows = 0,
               GemmWeightLayout layout = GemmWeightLayout::kKMajor) {
  const bool mn = layout == GemmWeightLayout::kMnMajor;
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " n=" + std::to_string(n) +
               " k=" + std::to_string(k) + (mn ? " MN-major" : " K-major") +
               " gap_rows=" + std::to_string(gap_rows));
  std::mt19937_64 rng(seed);
  const int experts = static_cast<int>(counts.size());
  std::vector<int32_t> offsets(experts + 1, 0);
  for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int routed = offsets.back();
  const int total_rows = routed + extra_rows;

  std::vector<__nv_bfloat16> a_bf, w_bf;
  std::vector<double> a, w;
  testing::RandomBf16(rng, static_cast<size_t>(total_rows) * k, &a_bf, &a);
  testing::RandomBf16(rng, static_cast<size_t>(experts) * n * k, &w_bf, &w);
  std::vector<double> ref, abs_sum;
  ReferenceGroupedGemm(a, w, offsets, n, k, &ref, &abs_sum);

  const int own_rows = mn ? k : n;
  w_bf = StoredWeights(std::move(w_bf), experts, n, k, layout, gap_rows);
  DeviceBuffer<__nv_bfloat16> d_a(a_bf.size()), d_w(w_bf.size());
  DeviceBuffer<int32_t> d_off(offsets.size());
  DeviceBuffer<float> d_c(static_cast<size_t>(std::max(total_rows, 1)) * n);
  ASSERT_TRUE(d_w.get() && d_off.get() && d_c.get());
  if (total_rows > 0) {
    GROVE_CUDA_OK(d_a.Upload(a_bf));
  }
  GROVE_CUDA_OK(d_w.Upload(w_bf));
  GROVE_CUDA_OK(d_off.Upload(offsets));

  for (GroupedGemmImpl impl : kAllImpls) {
    const bool wgmma = impl == GroupedGemmImpl::kWgmmaBn128 ||
                       impl == GroupedGemmImpl::kWgmmaBn256 ||
                       impl == GroupedGemmImpl::kWgmmaBn256Bk32 ||
                       impl == GroupedGemmImpl::kWgmmaPingpong ||
                       impl == GroupedGemmImpl::kWgmmaCluster ||
                       impl == GroupedGemmImpl::kWgmmaStaged;
    if (wgmma && !IsHopper()) continue;
    for (GemmOutType out : {GemmOutType::kF32, GemmOutType::kBF16}) {
      const bool f32 = out == GemmOutType::kF32;
      SCOPED_TRACE(std::string(GroupedGemmImplName(impl)) + (f32 ? " f32" : " bf16"));
      // Poison: 0xFF bytes are NaN in fp32 and bf16 alike.
      GROVE_CUDA_OK(cudaMemset(d_c.get(), 0xFF, d_c.count() * sizeof(float)));
      GroupedGemmArgs args;
      args.a = d_a.get();
      args.w = d_w.get();
      args.c = d_c.get();
      args.expert_offsets = d_off.get();
      args.total_rows = total_rows;
      args.num_experts = experts;
      args.n = n;
      args.k = k;
      args.out_type = out;
      args.w_layout = layout;
      args.w_expert_rows = gap_rows > 0 ? own_rows + gap_rows : 0;
      Status s = GroupedGemm(args, impl, nullptr);
      if (mn && !ReadsMnMajor(impl)) {
        EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
        EXPECT_NE(s.message().find("MN-major"), std::string::npos) << s;
        GROVE_CUDA_OK(cudaDeviceSynchronize());
        std::vector<float> h(d_c.count());
        GROVE_CUDA_OK(cudaMemcpy(h.data(), d_c.get(), h.size() * 4, cudaMemcpyDeviceToHost));
        EXPECT_TRUE(std::all_of(h.begin(), h.end(), [](float v) { return std::isnan(v); }))
            << "a refused call wrote C";
        continue;
      }
      ASSERT_TRUE(s.ok()) << s;
      GROVE_CUDA_OK(cudaDeviceSynchronize());

      std::vector<double> got(static_cast<size_t>(routed) * n);
      size_t poisoned_tail = 0;
      if (f32) {
        std::vector<float> h(static_cast<size_t>(total_rows) * n);
        GROVE_CUDA_OK(cudaMemcpy(h.data(), d_c.get(), h.size() * 4, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < got.size(); ++i) got[i] = h[i];
        for (size_t i = got.size(); i < h.size(); ++i) poisoned_tail += std::isnan(h[i]) ? 1 : 0;
      } else {
        std::vector<__nv_bfloat16> h(static_cast<size_t>(total_rows) * n);
        GROVE_CUDA_OK(cudaMemcpy(h.data(), d_c.get(), h.size() * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < got.size(); ++i) got[i] = __bfloat162float(h[i]);
        for (size_t i = got.size(); i < h.size(); ++i)
          poisoned_tail += std::isnan(__bfloat162float(h[i])) ? 1 : 0;
      }
      EXPECT_EQ(poisoned_tail, static_cast<size_t>(extra_rows) * n)
          << "rows past the last expert were written";

      const double rel = RelativeError(got, ref);
      EXPECT_LT(rel, f32 ? 2e-5 : 5e-3);
      size_t bad = 0, first_bad = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double bound = 2.0 * k * std::ldexp(1.0, -23) * abs_sum[i] +
                             (f32 ? 0.0 : std::ldexp(1.0, -8) * std::fabs(ref[i])) + 1e-30;
        if (!(std::fabs(got[i] - ref[i]) <= bound)) {
          if (bad == 0) first_bad = i;
          ++bad;
        }
      }
      EXPECT_EQ(bad, 0u) << "first bad element row " << first_bad / n << " col " << first_bad % n
                         << ": got " << got[first_bad] << " want " << ref[first_bad]
                         << " (rel err " << rel << ")";
    }
  }
}

TEST(GroupedGemmTest, RaggedWithEmptyExpertsAndTails) {
  GROVE_SKIP_WITHOUT_GPU();
  // Counts around the 128-row tile: empty, 1, tile-1, tile, tile+1, several
  // tiles; n = 264 leaves a partial column tile, k = 200 a partial k block.
  CheckCase({0, 1, 127, 128, 129, 300, 0, 45}, 264, 200, 0);
}

TEST(GroupedGemmTest, OnlyOneExpertHasTokens) {
  GROVE_SKIP_WITHOUT_GPU();
  std::vector<int> counts(16, 0);
  counts[5] = 77;
  CheckCase(counts, 128, 64, 0);
}

TEST(GroupedGemmTest, RowsPastTheLastExpertStayUntouched) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckCase({33, 0, 190}, 136, 72, 19);
}

TEST(GroupedGemmTest, TrainingShapeUpProjectionRandomRouting) {
  GROVE_SKIP_WITHOUT_GPU();
  // The reference model's w1/w3 shape ([T_e,1024] x [1024,512]) on fewer
  // experts so the CPU reference stays fast; counts drawn fresh.
  std::mt19937_64 rng(testing::FreshSeed());
  std::uniform_int_distribution<int> count(0, 400);
  std::vector<int> counts(8);
  for (int& c : counts) c = count(rng);
  CheckCase(counts, 512, 1024, 0);
}

TEST(GroupedGemmTest, TrainingShapeDownProjectionRandomRouting) {
  GROVE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(testing::FreshSeed());
  std::uniform_int_distribution<int> count(0, 400);
  std::vector<int> counts(8);
  for (int& c : counts) c = count(rng);
  CheckCase(counts, 1024, 512, 0);
}

// The model's layout: each expert's w1, w2, w3 adjacent, so one expert's
// w1 (n = F rows of k = H) is 3F rows from the next one's, and its w2
// (H rows of F) 3H rows. Fewer experts than the model's so the CPU
// reference stays fast.
TEST(GroupedGemmTest, WeightsAtAnExpertStrideAsInTheParameterLayout) {
  GROVE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(testing::FreshSeed());
  std::uniform_int_distribution<int> count(0, 300);
  std::vector<int> counts(6);
  for (int& c : counts) c = count(rng);
  counts[2] = 0;
  CheckCase(counts, 512, 1024, 0, 2 * 512);  // w1 / w3
  CheckCase(counts, 1024, 512, 0, 2 * 1024);  // w2
  CheckCase({0, 1, 127, 129, 45}, 264, 200, 3, 8);  // partial tiles next to the gaps
}

// MN-major weights (B = W^T stored [k, n] per expert, as the backward's
// dX = dY W reads a Linear weight in place): the same reference, the
// weights transposed on the host.
TEST(GroupedGemmTest, MnMajorRaggedWithEmptyExpertsAndTails) {
  GROVE_SKIP_WITHOUT_GPU();
  // n = 264: a partial column tile, whose 256-wide tile has W boxes (64
  // columns) wholly past n, which are not loaded; k = 200 and 72: a partial
  // k block, whose rows past k must read as zeros.
  CheckCase({0, 1, 127, 128, 129, 300, 0, 45}, 264, 200, 0, 0, GemmWeightLayout::kMnMajor);
  CheckCase({33, 0, 190}, 136, 72, 19, 0, GemmWeightLayout::kMnMajor);
}

TEST(GroupedGemmTest, MnMajorSquareAndRectangularShapes) {
  GROVE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(testing::FreshSeed());
  std::uniform_int_distribution<int> count(0, 300);
  for (auto [n, k] : {std::pair{512, 512}, std::pair{1024, 1024}, std::pair{2048, 512},
                      std::pair{512, 2048}, std::pair{1024, 2048}}) {
    std::vector<int> counts(6);
    for (int& c : counts) c = count(rng);
    counts[3] = 0;
    CheckCase(counts, n, k, 0, 0, GemmWeightLayout::kMnMajor);
  }
}

// Between the experts' [k, n] blocks lie NaN rows (gap_rows of n): a k
// block past an expert's k rows must read zeros, not the gap (0 * NaN).
TEST(GroupedGemmTest, MnMajorWeightsAtAnExpertStrideWithNaNGaps) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckCase({0, 1, 127, 129, 45}, 264, 200, 3, 8, GemmWeightLayout::kMnMajor);
  CheckCase({70, 0, 5}, 64, 72, 0, 56, GemmWeightLayout::kMnMajor);
}

// The GPU reference model's backward dX GEMMs as the model runs them on the
// bf16 mirror (E = 64, H = 1024, F = 512; each expert's w1, w3, w2
// adjacent, 3 F H elements per expert): through w2, B = W2 [H, F] (k = H,
// n = F) every 3H rows of F; through w1|w3, B = [w1; w3] [2F, H] (k = 2F,
// n = H) every 3F rows of H. Fewer tokens than a step so the CPU reference
// stays fast; routing drawn fresh, one expert empty.
TEST(GroupedGemmTest, MnMajorGpuRefBackwardShapesInTheParameterLayout) {
  GROVE_SKIP_WITHOUT_GPU();
  const int E = 64, H = 1024, F = 512;
  std::mt19937_64 rng(testing::FreshSeed());
  std::uniform_int_distribution<int> count(0, 48);
  std::vector<int> counts(E);
  for (int& c : counts) c = count(rng);
  counts[17] = 0;
  CheckCase(counts, F, H, 0, 3 * H - H, GemmWeightLayout::kMnMajor);          // deh = dey W2
  CheckCase(counts, H, 2 * F, 0, 3 * F - 2 * F, GemmWeightLayout::kMnMajor);  // dxe = deab W13
}

// What both SwiGLU-backward epilogue checks start from: A and W (stored in
// `layout`, gap_rows between experts), the forward's [a | b] with a scaled
// to [-6, 6] to span silu's curved range, dh = A W^T in double with its
// terms' absolute sums, all uploaded, and the GEMM's args (C unset).
struct SwiGluBwdInputs {
  SwiGluBwdInputs(const std::vector<int>& counts, int n_, int k_, int extra_rows, int gap_rows,
                  GemmWeightLayout layout, std::mt19937_64& rng)
      : n(n_), k(k_), experts(static_cast<int>(counts.size())), offsets(experts + 1, 0) {
    for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
    routed = offsets.back();
    total_rows = routed + extra_rows;
    out_elems = static_cast<size_t>(total_rows) * 2 * n;
    std::vector<__nv_bfloat16> a_bf, w_bf;
    std::vector<double> a, w;
    testing::RandomBf16(rng, static_cast<size_t>(total_rows) * k, &a_bf, &a);
    testing::RandomBf16(rng, static_cast<size_t>(experts) * n * k, &w_bf, &w);
    testing::RandomBf16(rng, out_elems, &ab_bf, &ab);
    for (int r = 0; r < total_rows; ++r) {
      for (int j = 0; j < n; ++j) {
        const size_t i = static_cast<size_t>(r) * 2 * n + j;
        ab_bf[i] = __float2bfloat16(6.f * __bfloat162float(ab_bf[i]));
        ab[i] = __bfloat162float(ab_bf[i]);
      }
    }
    ReferenceGroupedGemm(a, w, offsets, n, k, &dh, &abs_sum);
    const std::vector<__nv_bfloat16> stored = StoredWeights(std::move(w_bf), experts, n, k, layout, gap_rows);
    d_a = std::make_unique<DeviceBuffer<__nv_bfloat16>>(a_bf.size());
    d_w = std::make_unique<DeviceBuffer<__nv_bfloat16>>(stored.size());
    d_ab = std::make_unique<DeviceBuffer<__nv_bfloat16>>(out_elems);
    d_off = std::make_unique<DeviceBuffer<int32_t>>(offsets.size());
    ok = d_a->get() && d_w->get() && d_ab->get() && d_off->get() && d_a->Upload(a_bf) == cudaSuccess &&
         d_w->Upload(stored) == cudaSuccess && d_ab->Upload(ab_bf) == cudaSuccess &&
         d_off->Upload(offsets) == cudaSuccess;
    const bool mn = layout == GemmWeightLayout::kMnMajor;
    args.a = d_a->get();
    args.w = d_w->get();
    args.expert_offsets = d_off->get();
    args.total_rows = total_rows;
    args.num_experts = experts;
    args.n = n;
    args.k = k;
    args.out_type = GemmOutType::kBF16;
    args.w_layout = layout;
    args.w_expert_rows = gap_rows > 0 ? (mn ? k : n) + gap_rows : 0;
  }
  int n, k, experts, routed = 0, total_rows = 0;
  size_t out_elems = 0;
  std::vector<int32_t> offsets;
  std::vector<__nv_bfloat16> ab_bf;
  std::vector<double> ab, dh, abs_sum;
  std::unique_ptr<DeviceBuffer<__nv_bfloat16>> d_a, d_w, d_ab;
  std::unique_ptr<DeviceBuffer<int32_t>> d_off;
  GroupedGemmArgs args;
  bool ok = false;  // allocated and uploaded
};

// The SwiGLU backward epilogue (GroupedGemmArgs::swiglu_bwd_ab): C = [da |
// db] from dh = the GEMM's fp32 result and the forward's [a | b] rows.
//
// Against the double reference of (A W, then the SwiGLU backward), per
// element: 2^-8 |ref| for the one bf16 rounding of da / db (2^-9 relative)
// with as much again for the fp32 arithmetic of the sigmoid and products
// (~1e-6 relative) plus 1e-5 of the factors' magnitude (silu'(g) crosses
// zero near g = -1.28, where the relative error is unbounded but the
// absolute one is not: swiglu_test's bound), plus dh's fp32 accumulation
// error (CheckCase's 2 k 2^-23 sum |a w|) times the factor that multiplies
// dh (|u silu'(g)| for da, |silu(g)| for db).
//
// Against the unfused path (the GEMM to bf16 dh, then SwiGluBackwardPacked):
// that path rounds dh to bf16 once more (2^-9 relative, carried linearly
// into da and db), and each output is rounded on both sides, so they may
// sit up to one rounding apart (2 x 2^-9) on top of that: 3 x 2^-9 < 2^-7
// of |ref|, plus both sides' accumulation error and the same 1e-5 slack.
// The gates a are scaled to [-6, 6] to span silu's curved range.
void CheckSwiGluEpilogueCase(const std::vector<int>& counts, int n, int k, int extra_rows,
                             int gap_rows = 0, GemmWeightLayout layout = GemmWeightLayout::kMnMajor) {
  const bool mn = layout == GemmWeightLayout::kMnMajor;
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("SwiGLU epilogue seed " + std::to_string(seed) + " n=" + std::to_string(n) +
               " k=" + std::to_string(k) + (mn ? " MN-major" : " K-major") +
               " gap_rows=" + std::to_string(gap_rows));
  std::mt19937_64 rng(seed);
  SwiGluBwdInputs in(counts, n, k, extra_rows, gap_rows, layout, rng);
  ASSERT_TRUE(in.ok);
  const int routed = in.routed;
  const size_t out_elems = in.out_elems;
  const std::vector<double>& ab = in.ab;
  const std::vector<double>& dh = in.dh;
  const std::vector<double>& abs_sum = in.abs_sum;
  DeviceBuffer<__nv_bfloat16> d_c(out_elems), d_dh(out_elems / 2), d_unfused(out_elems);
  ASSERT_TRUE(d_c.get() && d_dh.get() && d_unfused.get());
  const __nv_bfloat16* d_ab = in.d_ab->get();
  GroupedGemmArgs args = in.args;

  // The unfused path, on kAuto: dh to bf16, then SwiGluBackwardPacked.
  args.c = d_dh.get();
  ASSERT_TRUE(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).ok());
  ASSERT_TRUE(SwiGluBackwardPacked(d_dh.get(), d_ab, d_unfused.get(), routed, n, nullptr).ok());
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> unfused;
  GROVE_CUDA_OK(d_unfused.Download(&unfused));

  args.c = d_c.get();
  args.swiglu_bwd_ab = d_ab;
  for (GroupedGemmImpl impl : kAllImpls) {
    SCOPED_TRACE(GroupedGemmImplName(impl));
    const bool fuses = impl == GroupedGemmImpl::kAuto || impl == GroupedGemmImpl::kWgmmaStaged ||
                       impl == GroupedGemmImpl::kMmaSync;
    if (!fuses) {
      const Status s = GroupedGemm(args, impl, nullptr);
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
      continue;
    }
    if (impl == GroupedGemmImpl::kWgmmaStaged && !IsHopper()) continue;
    // Poison: 0xFF bytes are bf16 NaN.
    GROVE_CUDA_OK(cudaMemset(d_c.get(), 0xFF, out_elems * 2));
    const Status s = GroupedGemm(args, impl, nullptr);
    ASSERT_TRUE(s.ok()) << s;
    GROVE_CUDA_OK(cudaDeviceSynchronize());
    std::vector<__nv_bfloat16> got;
    GROVE_CUDA_OK(d_c.Download(&got));

    size_t poisoned_tail = 0;
    for (size_t i = static_cast<size_t>(routed) * 2 * n; i < got.size(); ++i)
      poisoned_tail += std::isnan(__bfloat162float(got[i])) ? 1 : 0;
    EXPECT_EQ(poisoned_tail, static_cast<size_t>(extra_rows) * 2 * n)
        << "rows past the last expert were written";

    size_t bad_ref = 0, bad_unfused = 0, differ = 0, first_bad = 0;
    std::vector<double> got_d, ref_d;
    for (int r = 0; r < routed; ++r) {
      for (int j = 0; j < n; ++j) {
        const size_t o = static_cast<size_t>(r) * n + j, ia = static_cast<size_t>(r) * 2 * n + j,
                     ib = ia + n;
        const double g = ab[ia], u = ab[ib], sig = 1.0 / (1.0 + std::exp(-g));
        const double dsilu = sig * (1.0 + g * (1.0 - sig)), silu = g * sig;
        const double acc_err = 2.0 * k * std::ldexp(1.0, -23) * abs_sum[o];
        const double want[2] = {dh[o] * u * dsilu, dh[o] * silu};
        const double factor[2] = {std::fabs(u * dsilu), std::fabs(silu)};
        const double scale[2] = {std::fabs(dh[o] * u), std::fabs(dh[o] * g)};
        const size_t at[2] = {ia, ib};
        for (int h = 0; h < 2; ++h) {
          const double x = __bfloat162float(got[at[h]]), y = __bfloat162float(unfused[at[h]]);
          got_d.push_back(x);
          ref_d.push_back(want[h]);
          const double ref_bound = std::ldexp(1.0, -8) * std::fabs(want[h]) + factor[h] * acc_err +
                                   1e-5 * scale[h] + 1e-30;
          if (!(std::fabs(x - want[h]) <= ref_bound)) {
            if (bad_ref == 0) first_bad = at[h];
            ++bad_ref;
          }
          const double unfused_bound = std::ldexp(1.0, -7) * std::fabs(want[h]) +
                                       2.0 * factor[h] * acc_err + 2e-5 * scale[h] + 1e-30;
          if (!(std::fabs(x - y) <= unfused_bound)) ++bad_unfused;
          differ += x != y ? 1 : 0;
        }
      }
    }
    const double rel = RelativeError(got_d, ref_d);
    EXPECT_LT(rel, 5e-3);
    EXPECT_EQ(bad_ref, 0u) << "first bad element row " << first_bad / (2 * n) << " col "
                           << first_bad % (2 * n) << ": got " << __bfloat162float(got[first_bad])
                           << " (rel err " << rel << ")";
    EXPECT_EQ(bad_unfused, 0u) << "beyond one rounding from GEMM + SwiGluBackwardPacked";
    // Informative: how often dh's extra rounding changes the bf16 result.
    std::printf("  %s: %zu of %zu outputs differ from the unfused path's, rel err %.2e\n",
                GroupedGemmImplName(impl), differ, got_d.size(), rel);
  }
}

// The gated SwiGLU backward in the w2 dX epilogue (swiglu_bwd_slot_of_row
// and the rest) against a double reference: dh = A W^T exact, each row's
// gate from a random slot permutation, then da, db of gate * dh, gate * h
// and, through SwiGluGateGradFromPartials, <dh, h> per slot. Bounds: one
// bf16 rounding (2^-8 of the value) plus the fp32 accumulation of dh
// (2 k 2^-23 of its terms' absolute sum, times the output's factor) and
// the fast sigmoid (1e-5 of the operands' scale); the gate's gradient
// within 1e-5 of sum |dh h| plus the dh errors times |h|.
void CheckGatedSwiGluEpilogueCase(const std::vector<int>& counts, int n, int k, int extra_rows, int gap_rows,
                                  GemmWeightLayout layout) {
  const bool mn = layout == GemmWeightLayout::kMnMajor;
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("gated SwiGLU epilogue seed " + std::to_string(seed) + " n=" + std::to_string(n) +
               " k=" + std::to_string(k) + (mn ? " MN-major" : " K-major"));
  std::mt19937_64 rng(seed);
  SwiGluBwdInputs in(counts, n, k, extra_rows, gap_rows, layout, rng);
  ASSERT_TRUE(in.ok);
  const int routed = in.routed, total_rows = in.total_rows;
  const size_t out_elems = in.out_elems;
  const std::vector<double>& ab = in.ab;
  const std::vector<double>& dh = in.dh;
  const std::vector<double>& abs_sum = in.abs_sum;
  const int parts = SwiGluGatePartials(n);
  std::vector<int32_t> slot_of_row(routed);
  std::iota(slot_of_row.begin(), slot_of_row.end(), 0);
  std::shuffle(slot_of_row.begin(), slot_of_row.end(), rng);
  std::uniform_real_distribution<float> gate_dist(0.05f, 1.f);
  std::vector<float> slot_gates(std::max(routed, 1));
  for (float& g : slot_gates) g = gate_dist(rng);
  DeviceBuffer<__nv_bfloat16> d_c(out_elems), d_hg(static_cast<size_t>(total_rows) * n);
  DeviceBuffer<int32_t> d_slots(std::max(routed, 1));
  DeviceBuffer<float> d_gates(slot_gates.size()), d_partial(static_cast<size_t>(total_rows) * parts),
      d_dgate(slot_gates.size());
  if (routed > 0) {
    GROVE_CUDA_OK(d_slots.Upload(slot_of_row));
  }
  GROVE_CUDA_OK(d_gates.Upload(slot_gates));

  GroupedGemmArgs args = in.args;
  args.c = d_c.get();
  args.swiglu_bwd_ab = in.d_ab->get();
  args.swiglu_bwd_slot_of_row = d_slots.get();
  args.swiglu_bwd_slot_gates = d_gates.get();
  args.swiglu_bwd_h_gated = d_hg.get();
  args.swiglu_bwd_dgate_partial = d_partial.get();
  for (GroupedGemmImpl impl : kAllImpls) {
    if (impl == GroupedGemmImpl::kAuto || impl == GroupedGemmImpl::kWgmmaStaged) continue;
    EXPECT_EQ(GroupedGemm(args, impl, nullptr).code(), StatusCode::kInvalidArgument) << GroupedGemmImplName(impl);
  }
  if (!IsHopper()) {
    EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kFailedPrecondition);
    return;
  }
  GROVE_CUDA_OK(cudaMemset(d_c.get(), 0xFF, out_elems * 2));  // bf16 NaN
  GROVE_CUDA_OK(cudaMemset(d_hg.get(), 0xFF, static_cast<size_t>(total_rows) * n * 2));
  ASSERT_TRUE(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).ok());
  ASSERT_TRUE(
      SwiGluGateGradFromPartials(d_partial.get(), parts, d_slots.get(), d_dgate.get(), routed, nullptr).ok());
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> got, hg;
  std::vector<float> dgate;
  GROVE_CUDA_OK(d_c.Download(&got));
  GROVE_CUDA_OK(d_hg.Download(&hg));
  GROVE_CUDA_OK(d_dgate.Download(&dgate));
  size_t tail_written = 0;
  for (size_t i = static_cast<size_t>(routed) * 2 * n; i < got.size(); ++i)
    tail_written += std::isnan(__bfloat162float(got[i])) ? 0 : 1;
  for (size_t i = static_cast<size_t>(routed) * n; i < hg.size(); ++i)
    tail_written += std::isnan(__bfloat162float(hg[i])) ? 0 : 1;
  EXPECT_EQ(tail_written, 0u) << "rows past the last expert were written";
  size_t bad = 0, bad_gate = 0;
  for (int r = 0; r < routed; ++r) {
    const double gate = slot_gates[slot_of_row[r]];
    double dot = 0, dot_bound = 0;
    for (int j = 0; j < n; ++j) {
      const size_t o = static_cast<size_t>(r) * n + j, ia = static_cast<size_t>(r) * 2 * n + j, ib = ia + n;
      const double g = ab[ia], u = ab[ib], sig = 1.0 / (1.0 + std::exp(-g));
      const double dsilu = sig * (1.0 + g * (1.0 - sig)), silu = g * sig, h = silu * u;
      const double acc_err = 2.0 * k * std::ldexp(1.0, -23) * abs_sum[o];
      const double want[3] = {gate * dh[o] * u * dsilu, gate * dh[o] * silu, gate * h};
      const double factor[3] = {gate * std::fabs(u * dsilu), gate * std::fabs(silu), 0.0};
      const double scale[3] = {gate * std::fabs(dh[o] * u), gate * std::fabs(dh[o] * g), gate * std::fabs(g * u)};
      const double x[3] = {__bfloat162float(got[ia]), __bfloat162float(got[ib]), __bfloat162float(hg[o])};
      for (int t = 0; t < 3; ++t) {
        const double bound = std::ldexp(1.0, -8) * std::fabs(want[t]) + factor[t] * acc_err + 1e-5 * scale[t] + 1e-30;
        if (!(std::fabs(x[t] - want[t]) <= bound) && ++bad <= 5)
          ADD_FAILURE() << "row " << r << " col " << j << " output " << t << ": got " << x[t] << ", want "
                        << want[t] << " (bound " << bound << ")";
      }
      dot += dh[o] * h;
      dot_bound += 1e-5 * std::fabs(dh[o] * h) + std::fabs(h) * acc_err;
    }
    const double g_got = dgate[slot_of_row[r]];
    if (!(std::fabs(g_got - dot) <= dot_bound + 1e-30) && ++bad_gate <= 5)
      ADD_FAILURE() << "row " << r << " dgate " << g_got << ", want " << dot << " (bound " << dot_bound << ")";
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(bad_gate, 0u);
}

TEST(GroupedGemmTest, GatedSwiGluEpilogueRaggedWithEmptyExpertsAndTails) {
  GROVE_SKIP_WITHOUT_GPU();
  // n = 264: a last 128-column block of 8 columns (3 partials a row).
  CheckGatedSwiGluEpilogueCase({0, 1, 127, 128, 129, 300, 0, 45}, 264, 200, 7, 0, GemmWeightLayout::kMnMajor);
  CheckGatedSwiGluEpilogueCase({70, 0, 5}, 64, 72, 3, 56, GemmWeightLayout::kMnMajor);
  // The model's w2 shape (n = F = 512, k = H = 1024, MN-major in place), fewer rows.
  CheckGatedSwiGluEpilogueCase({200, 0, 333, 1, 129, 256, 90, 64}, 512, 1024, 5, 2 * 1024,
                               GemmWeightLayout::kMnMajor);
}

// 64 experts of 0..48 rows each (two of them empty): the gpu-ref layer's
// expert count with fewer tokens than a step, so the CPU reference stays
// fast.
std::vector<int> GpuRefExpertCounts() {
  std::mt19937_64 rng(testing::FreshSeed());
  std::uniform_int_distribution<int> count(0, 48);
  std::vector<int> counts(64);
  for (int& c : counts) c = count(rng);
  counts[17] = 0;
  counts[63] = 0;
  return counts;
}

TEST(GroupedGemmTest, SwiGluEpilogueRaggedWithEmptyExpertsAndTails) {
  GROVE_SKIP_WITHOUT_GPU();
  // Empty experts, rows around the 128-row tile, n = 264 (a partial column
  // tile: 8 columns past 256), k = 200 (a partial k block), 7 NaN-poisoned
  // rows past the last expert; both weight layouts.
  CheckSwiGluEpilogueCase({0, 1, 127, 128, 129, 300, 0, 45}, 264, 200, 7);
  CheckSwiGluEpilogueCase({0, 1, 127, 128, 129, 300, 0, 45}, 264, 200, 7, 0, GemmWeightLayout::kKMajor);
  CheckSwiGluEpilogueCase({70, 0, 5}, 64, 72, 3, 56);
}

// The model's call: dey [Pn, H] through w2 read MN-major in the parameter
// layout (B = W2 [H, F] every 3H rows of F), E = 64, H = 1024, F = 512;
// fewer tokens than a step so the CPU reference stays fast.
TEST(GroupedGemmTest, SwiGluEpilogueGpuRefShapeInTheParameterLayout) {
  GROVE_SKIP_WITHOUT_GPU();
  const int H = 1024, F = 512;
  const std::vector<int> counts = GpuRefExpertCounts();
  CheckSwiGluEpilogueCase(counts, F, H, 5, 3 * H - H);
}

// The SwiGLU forward epilogue (GroupedGemmArgs::swiglu_out): each
// expert's 2f weight rows are w1 then w3; C = [a | b] and h = silu(a) * b.
// The contract is bit equality with the unfused path (the same GEMM
// without the epilogue, then SwiGluForwardPacked on its bf16 [a | b]), so
// both are compared bit for bit (a tolerance would hide a tile that holds
// a and b of different features: its h is still a plausible number). C is
// also checked against the double reference (CheckCase's norm-wise 5e-3
// for bf16 output), so that a broken unfused path cannot make both agree.
// Rows of A past the last expert are NaN: a partial tile computes them,
// and nothing may store them (C and h start NaN-poisoned there and must
// stay so; every routed row must be finite).
void CheckSwiGluForwardCase(const std::vector<int>& counts, int f, int k, int extra_rows,
                            int gap_rows = 0) {
  const int n = 2 * f;
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("SwiGLU forward seed " + std::to_string(seed) + " f=" + std::to_string(f) +
               " k=" + std::to_string(k) + " gap_rows=" + std::to_string(gap_rows));
  std::mt19937_64 rng(seed);
  const int experts = static_cast<int>(counts.size());
  std::vector<int32_t> offsets(experts + 1, 0);
  for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int routed = offsets.back();
  const int total_rows = routed + extra_rows;
  const size_t c_elems = static_cast<size_t>(total_rows) * n, h_elems = c_elems / 2;

  std::vector<__nv_bfloat16> a_bf, w_bf;
  std::vector<double> a, w;
  testing::RandomBf16(rng, static_cast<size_t>(total_rows) * k, &a_bf, &a);
  testing::RandomBf16(rng, static_cast<size_t>(experts) * n * k, &w_bf, &w);
  __nv_bfloat16_raw nan_bits;
  nan_bits.x = 0x7FC0;
  for (size_t i = static_cast<size_t>(routed) * k; i < a_bf.size(); ++i) a_bf[i] = nan_bits;
  std::vector<double> ref, abs_sum;
  a.resize(static_cast<size_t>(routed) * k);
  ReferenceGroupedGemm(a, w, offsets, n, k, &ref, &abs_sum);

  const std::vector<__nv_bfloat16> stored =
      StoredWeights(std::move(w_bf), experts, n, k, GemmWeightLayout::kKMajor, gap_rows);
  DeviceBuffer<__nv_bfloat16> d_a(a_bf.size()), d_w(stored.size()), d_c_ref(c_elems),
      d_h_ref(h_elems), d_c(c_elems), d_h(h_elems);
  DeviceBuffer<int32_t> d_off(offsets.size());
  ASSERT_TRUE(d_a.get() && d_w.get() && d_c.get() && d_h.get() && d_off.get());
  GROVE_CUDA_OK(d_a.Upload(a_bf));
  GROVE_CUDA_OK(d_w.Upload(stored));
  GROVE_CUDA_OK(d_off.Upload(offsets));

  GroupedGemmArgs args;
  args.a = d_a.get();
  args.w = d_w.get();
  args.expert_offsets = d_off.get();
  args.total_rows = total_rows;
  args.num_experts = experts;
  args.n = n;
  args.k = k;
  args.out_type = GemmOutType::kBF16;
  args.w_expert_rows = gap_rows > 0 ? n + gap_rows : 0;

  // The unfused path: the GEMM (kAuto), then SwiGluForwardPacked.
  args.c = d_c_ref.get();
  ASSERT_TRUE(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).ok());
  ASSERT_TRUE(SwiGluForwardPacked(d_c_ref.get(), d_h_ref.get(), routed, f, nullptr).ok());
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> c_ref, h_ref;
  GROVE_CUDA_OK(d_c_ref.Download(&c_ref));
  GROVE_CUDA_OK(d_h_ref.Download(&h_ref));
  {
    std::vector<double> got(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) got[i] = __bfloat162float(c_ref[i]);
    EXPECT_LT(RelativeError(got, ref), 5e-3) << "the unfused GEMM disagrees with the reference";
  }

  args.c = d_c.get();
  args.swiglu_out = d_h.get();
  for (GroupedGemmImpl impl : kAllImpls) {
    SCOPED_TRACE(GroupedGemmImplName(impl));
    if (impl != GroupedGemmImpl::kAuto && impl != GroupedGemmImpl::kWgmmaStaged) {
      const Status s = GroupedGemm(args, impl, nullptr);
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
      continue;
    }
    if (!IsHopper()) {
      EXPECT_EQ(GroupedGemm(args, impl, nullptr).code(), StatusCode::kFailedPrecondition);
      continue;
    }
    GROVE_CUDA_OK(cudaMemset(d_c.get(), 0xFF, c_elems * 2));  // bf16 NaN
    GROVE_CUDA_OK(cudaMemset(d_h.get(), 0xFF, h_elems * 2));
    const Status s = GroupedGemm(args, impl, nullptr);
    ASSERT_TRUE(s.ok()) << s;
    GROVE_CUDA_OK(cudaDeviceSynchronize());
    std::vector<__nv_bfloat16> c_got, h_got;
    GROVE_CUDA_OK(d_c.Download(&c_got));
    GROVE_CUDA_OK(d_h.Download(&h_got));
    auto bits = [](__nv_bfloat16 x) { return static_cast<__nv_bfloat16_raw>(x).x; };
    auto check = [&](const std::vector<__nv_bfloat16>& got, const std::vector<__nv_bfloat16>& want,
                     int width, const char* what) {
      size_t differ = 0, not_finite = 0, first = 0, tail_written = 0;
      const size_t routed_elems = static_cast<size_t>(routed) * width;
      for (size_t i = 0; i < routed_elems; ++i) {
        if (bits(got[i]) != bits(want[i])) {
          if (differ == 0) first = i;
          ++differ;
        }
        not_finite += std::isfinite(__bfloat162float(got[i])) ? 0 : 1;
      }
      for (size_t i = routed_elems; i < got.size(); ++i) tail_written += bits(got[i]) != 0xFFFF;
      EXPECT_EQ(differ, 0u) << what << ": first differing element row " << first / width << " col "
                            << first % width << ": got " << __bfloat162float(got[first])
                            << ", unfused " << __bfloat162float(want[first]);
      EXPECT_EQ(not_finite, 0u) << what << " has non-finite routed elements";
      EXPECT_EQ(tail_written, 0u) << what << ": rows past the last expert were written";
    };
    check(c_got, c_ref, n, "[a | b]");
    check(h_got, h_ref, f, "h");
  }
}

TEST(GroupedGemmTest, SwiGluForwardRaggedWithEmptyExpertsAndTails) {
  GROVE_SKIP_WITHOUT_GPU();
  // Empty experts, rows around the 128-row tile, f = 136 (a partial
  // feature block: 8 features past 128), k = 200 (a partial k block), 7
  // NaN rows of A past the last expert.
  CheckSwiGluForwardCase({0, 1, 127, 128, 129, 300, 0, 45}, 136, 200, 7);
  // f = 64 < the 128-feature block, the experts' weights n + 56 rows
  // apart with NaN between: the w3 box of a block reads the gap into
  // accumulator columns that must never be stored.
  CheckSwiGluForwardCase({70, 0, 5, 131}, 64, 72, 3, 56);
  // Several feature blocks, the last partial, k = 1024 (kAuto's unfused
  // GEMM picks a different kernel below n = 1024).
  CheckSwiGluForwardCase({33, 0, 260}, 264, 1024, 2, 8);
}

// The model's call: xe [Pn, H] through w1|w3 read K-major in the parameter
// layout (each expert's w1, w3, w2: 3F rows of H apart), E = 64, H = 1024,
// F = 512; fewer tokens than a step so the CPU reference stays fast.
TEST(GroupedGemmTest, SwiGluForwardGpuRefShapeInTheParameterLayout) {
  GROVE_SKIP_WITHOUT_GPU();
  const int H = 1024, F = 512;
  const std::vector<int> counts = GpuRefExpertCounts();
  CheckSwiGluForwardCase(counts, F, H, 5, 3 * F - 2 * F);
}

TEST(GroupedGemmTest, ManyExpertsMostlyEmpty) {
  GROVE_SKIP_WITHOUT_GPU();
  // More experts than a warp's scan chunk (the tile table is built 32 at a time).
  std::mt19937_64 rng(testing::FreshSeed());
  std::vector<int> counts(100, 0);
  for (int i = 0; i < 100; i += 7) counts[i] = 1 + static_cast<int>(rng() % 150);
  CheckCase(counts, 64, 128, 5);
}

TEST(GroupedGemmTest, NoRowsAtAllIsANoOp) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckCase({0, 0, 0}, 64, 64, 0);
}

// Argument checks happen before any device work: these run without a GPU.
TEST(GroupedGemmTest, RejectsBadShapes) {
  GroupedGemmArgs args;
  alignas(16) static __nv_bfloat16 dummy[64];
  static int32_t offsets[3];
  args.a = dummy;
  args.w = dummy;
  args.c = dummy;
  args.expert_offsets = offsets;
  args.total_rows = 4;
  args.num_experts = 2;
  args.n = 12;  // not a multiple of 8
  args.k = 64;
  Status s = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  args.n = 64;
  args.num_experts = 0;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(),
            StatusCode::kInvalidArgument);
  args.num_experts = kGroupedGemmMaxExperts + 1;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(),
            StatusCode::kInvalidArgument);
  args.num_experts = 2;
  args.a = reinterpret_cast<const __nv_bfloat16*>(reinterpret_cast<const char*>(dummy) + 2);
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(),
            StatusCode::kInvalidArgument);
  args.a = dummy;
  args.w_expert_rows = 63;  // fewer rows than n = 64: experts' weights would overlap
  Status overlap = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
  EXPECT_EQ(overlap.code(), StatusCode::kInvalidArgument) << overlap;
  EXPECT_NE(overlap.message().find("w_expert_rows"), std::string::npos) << overlap;
  // MN-major: w_expert_rows counts rows of n, at least k of them.
  args.w_layout = GemmWeightLayout::kMnMajor;
  args.n = 128;
  args.w_expert_rows = 64;  // k = 64: fits, though < n
  Status mn_ok = GroupedGemm(args, GroupedGemmImpl::kWmma, nullptr);  // refused for the layout
  EXPECT_EQ(mn_ok.code(), StatusCode::kInvalidArgument) << mn_ok;
  EXPECT_NE(mn_ok.message().find("MN-major"), std::string::npos) << mn_ok;
  args.w_expert_rows = 56;  // < k
  Status mn_overlap = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
  EXPECT_EQ(mn_overlap.code(), StatusCode::kInvalidArgument) << mn_overlap;
  EXPECT_NE(mn_overlap.message().find("k = 64"), std::string::npos) << mn_overlap;
  for (GroupedGemmImpl impl : {GroupedGemmImpl::kWgmmaBn256Bk32, GroupedGemmImpl::kWgmmaCluster,
                               GroupedGemmImpl::kWmma}) {
    args.w_expert_rows = 0;
    EXPECT_EQ(GroupedGemm(args, impl, nullptr).code(), StatusCode::kInvalidArgument)
        << GroupedGemmImplName(impl);
  }
  args.w_layout = GemmWeightLayout::kKMajor;
  args.n = 64;
  args.w_expert_rows = 0;
  // The SwiGLU epilogue: bf16 out only, an aligned ab, and only the
  // implementations that have it.
  args.swiglu_bwd_ab = dummy;
  args.out_type = GemmOutType::kF32;
  Status f32 = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
  EXPECT_EQ(f32.code(), StatusCode::kInvalidArgument) << f32;
  EXPECT_NE(f32.message().find("SwiGLU"), std::string::npos) << f32;
  args.out_type = GemmOutType::kBF16;
  args.swiglu_bwd_ab = dummy + 1;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.swiglu_bwd_ab = dummy;
  for (GroupedGemmImpl impl : {GroupedGemmImpl::kWgmmaBn128, GroupedGemmImpl::kWgmmaBn256,
                               GroupedGemmImpl::kWgmmaBn256Bk32, GroupedGemmImpl::kWgmmaPingpong,
                               GroupedGemmImpl::kWgmmaCluster, GroupedGemmImpl::kWmma}) {
    Status refused = GroupedGemm(args, impl, nullptr);
    EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << GroupedGemmImplName(impl);
    EXPECT_NE(refused.message().find("SwiGLU"), std::string::npos) << refused;
  }
  args.swiglu_bwd_ab = nullptr;
  // The SwiGLU forward epilogue: bf16 out, K-major, n % 16 == 0, an
  // aligned output, not with the backward one, kAuto or kWgmmaStaged only.
  args.swiglu_out = dummy;
  args.out_type = GemmOutType::kF32;
  Status fwd_f32 = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
  EXPECT_EQ(fwd_f32.code(), StatusCode::kInvalidArgument) << fwd_f32;
  EXPECT_NE(fwd_f32.message().find("SwiGLU forward"), std::string::npos) << fwd_f32;
  args.out_type = GemmOutType::kBF16;
  args.n = 24;  // a multiple of 8, not of 16
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.n = 64;
  args.w_layout = GemmWeightLayout::kMnMajor;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.w_layout = GemmWeightLayout::kKMajor;
  args.swiglu_bwd_ab = dummy;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.swiglu_bwd_ab = nullptr;
  args.swiglu_out = dummy + 1;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.swiglu_out = dummy;
  for (GroupedGemmImpl impl : {GroupedGemmImpl::kWgmmaBn128, GroupedGemmImpl::kWgmmaBn256,
                               GroupedGemmImpl::kWgmmaBn256Bk32, GroupedGemmImpl::kWgmmaPingpong,
                               GroupedGemmImpl::kWgmmaCluster, GroupedGemmImpl::kMmaSync,
                               GroupedGemmImpl::kWmma}) {
    Status refused = GroupedGemm(args, impl, nullptr);
    EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << GroupedGemmImplName(impl);
    EXPECT_NE(refused.message().find("SwiGLU forward"), std::string::npos) << refused;
  }
  args.swiglu_out = nullptr;
  args.out_type = GemmOutType::kF32;
  args.expert_offsets = nullptr;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
