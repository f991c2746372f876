// The fused log-prob head: the lm_head GEMM with the block-statistics
// epilogue (GroupedGemmArgs::logit_block_stats), TokenLogProbFromBlockStats
// and TokenLogProbBackwardFromShifted, against the head computed in double
// from the same bf16 inputs.
//
// Tolerances. z: fp32 accumulation of k bf16 products (exact in fp32) in
// the tensor cores' order; |z - z_ref| <= k 2^-22 sum_i |a_i w_i| (the
// gamma_k bound with the 4x margin grouped_gemm_test.cc allows the tensor
// cores' accumulation), call it zerr (per row, the max over columns). The
// block sums: 128 exp2.approx terms (2^-22 relative) of (z - m) log2(e)
// (rounded: |z - m| 2^-23 relative in the term) summed in fp32, then 256
// blocks merged: < 2^-15 relative, as the unfused head's test. So lse and
// logp get 4e-5 + 2 zerr + 2^-23 |lse| absolute. u = z - m is rounded once
// to bf16: 2^-8 |u| (bf16's unit roundoff, 8 significant bits) + 2 zerr.
// dlogits are rounded once to bf16 (2^-8 relative) on top of |dlogp| p
// (exp(d) - 1), d = |u| 2^-8 + 2 lse_tol the error of p's exponent, the
// bound grouped_gemm.h derives.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/grouped_gemm.h"
#include "kernels/logprob_head.h"
#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;
using testing::IsHopper;


// counts: rows per expert (one expert: the learner's lm_head; several: the
// epilogue is the grouped GEMM's, so ragged experts must work as well).
// scale: the inputs' spread, so logits reach |z| ~ 20 and u matters.
void CheckFusedHead(const std::vector<int>& counts, int vocab, int k, float scale) {
  const uint64_t seed = testing::FreshSeed();
  const int experts = static_cast<int>(counts.size());
  std::vector<int32_t> offsets(experts + 1, 0);
  for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int rows = offsets[experts];
  SCOPED_TRACE("seed " + std::to_string(seed) + " rows " + std::to_string(rows) + " vocab " +
               std::to_string(vocab) + " k " + std::to_string(k) + " experts " + std::to_string(experts));
  std::mt19937_64 rng(seed);
  std::vector<__nv_bfloat16> a_bf, w_bf;
  std::vector<double> a, w;
  testing::RandomBf16(rng, size_t(rows) * k, &a_bf, &a);
  testing::RandomBf16(rng, size_t(experts) * vocab * k, &w_bf, &w);
  // Scale A by a power of two (exact in bf16) for larger logits.
  for (size_t i = 0; i < a_bf.size(); ++i) {
    a[i] *= scale;
    a_bf[i] = __float2bfloat16(static_cast<float>(a[i]));
  }
  std::uniform_int_distribution<int> pick(0, vocab - 1);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<int32_t> targets(rows);
  std::vector<float> dlogp(rows);
  for (int r = 0; r < rows; ++r) {
    targets[r] = r % 7 == 3 ? -1 : (r % 11 == 5 ? vocab : pick(rng));  // some rows skipped
    dlogp[r] = nd(rng);
  }
  const int blocks = LogitBlocks(vocab);
  DeviceBuffer<__nv_bfloat16> d_a(a_bf.size()), d_w(w_bf.size()), d_u(size_t(rows) * vocab);
  DeviceBuffer<int32_t> d_off(offsets.size()), d_targets(rows);
  DeviceBuffer<float2> d_stats(size_t(rows) * blocks);
  DeviceBuffer<float> d_target_logit(rows), d_logp(rows), d_lse(rows), d_dlogp(rows);
  GROVE_CUDA_OK(d_a.Upload(a_bf));
  GROVE_CUDA_OK(d_w.Upload(w_bf));
  GROVE_CUDA_OK(d_off.Upload(offsets));
  GROVE_CUDA_OK(d_targets.Upload(targets));
  GROVE_CUDA_OK(d_dlogp.Upload(dlogp));
  GroupedGemmArgs args;
  args.a = d_a.get();
  args.w = d_w.get();
  args.c = d_u.get();
  args.expert_offsets = d_off.get();
  args.total_rows = rows;
  args.num_experts = experts;
  args.n = vocab;
  args.k = k;
  args.out_type = GemmOutType::kBF16;
  args.logit_block_stats = d_stats.get();
  args.logit_targets = d_targets.get();
  args.logit_target = d_target_logit.get();
  Status s = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  s = TokenLogProbFromBlockStats(d_stats.get(), d_target_logit.get(), d_targets.get(), d_logp.get(), d_lse.get(),
                                 rows, vocab, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<__nv_bfloat16> u;
  GROVE_CUDA_OK(d_u.Download(&u));
  // The gradient in place over u, as the learner runs it.
  s = TokenLogProbBackwardFromShifted(d_u.get(), d_stats.get(), d_targets.get(), d_lse.get(), d_dlogp.get(),
                                      d_u.get(), rows, vocab, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<float> logp, lse;
  std::vector<float2> stats;
  std::vector<__nv_bfloat16> dlogits;
  GROVE_CUDA_OK(d_logp.Download(&logp));
  GROVE_CUDA_OK(d_lse.Download(&lse));
  GROVE_CUDA_OK(d_stats.Download(&stats));
  GROVE_CUDA_OK(d_u.Download(&dlogits));

  size_t bad_u = 0, bad_m = 0, bad_lse = 0, bad_logp = 0, bad_grad = 0;
  std::vector<double> z(vocab), zabs(vocab);
  int e = 0;
  for (int r = 0; r < rows; ++r) {
    while (offsets[e + 1] <= r) ++e;
    double zerr = 0;
    for (int v = 0; v < vocab; ++v) {
      double dot = 0, mag = 0;
      const double* wr = &w[(size_t(e) * vocab + v) * k];
      const double* ar = &a[size_t(r) * k];
      for (int i = 0; i < k; ++i) {
        dot += ar[i] * wr[i];
        mag += std::fabs(ar[i] * wr[i]);
      }
      z[v] = dot;
      zerr = std::max(zerr, k * 0x1p-22 * mag);
    }
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < vocab; ++v) mx = std::max(mx, z[v]);
    for (int v = 0; v < vocab; ++v) sum += std::exp(z[v] - mx);
    const double ref_lse = mx + std::log(sum);
    const double lse_tol = 4e-5 + 2 * zerr + 0x1p-23 * std::fabs(ref_lse);
    const bool valid = targets[r] >= 0 && targets[r] < vocab;
    const double ref_logp = valid ? z[targets[r]] - ref_lse : 0.0;
    if (!(std::fabs(lse[r] - ref_lse) <= lse_tol)) ++bad_lse;
    if (!(std::fabs(logp[r] - ref_logp) <= lse_tol)) ++bad_logp;
    const double g = valid ? dlogp[r] : 0.0;
    for (int j = 0; j < blocks; ++j) {
      double bm = -INFINITY;
      for (int v = j * 128; v < std::min(vocab, (j + 1) * 128); ++v) bm = std::max(bm, z[v]);
      if (!(std::fabs(stats[size_t(r) * blocks + j].x - bm) <= 2 * zerr)) ++bad_m;
      for (int v = j * 128; v < std::min(vocab, (j + 1) * 128); ++v) {
        const double ref_u = z[v] - bm;
        const double got_u = __bfloat162float(u[size_t(r) * vocab + v]);
        if (!(std::fabs(got_u - ref_u) <= 0x1p-8 * std::fabs(ref_u) + 2 * zerr)) ++bad_u;
        const double p = std::exp(z[v] - ref_lse);
        const double ref = g * ((v == targets[r] ? 1.0 : 0.0) - p);
        const double got = __bfloat162float(dlogits[size_t(r) * vocab + v]);
        // p's exponent errs by at most d: exp(d) - 1 relative.
        const double d = 0x1p-8 * std::fabs(ref_u) + 2 * lse_tol;
        const double tol = 0x1p-8 * std::fabs(ref) + std::fabs(g) * p * std::expm1(d);
        if (!(std::fabs(got - ref) <= tol + 1e-30) && bad_grad++ == 0)
          ADD_FAILURE() << "dlogits row " << r << " col " << v << ": got " << got << " want " << ref << " (p " << p
                        << ", u " << ref_u << ", target " << targets[r] << ", zerr " << zerr << ")";
      }
    }
  }
  EXPECT_EQ(bad_u, 0u);
  EXPECT_EQ(bad_m, 0u);
  EXPECT_EQ(bad_lse, 0u);
  EXPECT_EQ(bad_logp, 0u);
  EXPECT_EQ(bad_grad, 0u);
}

TEST(FusedLogProbHeadTest, OneExpertWholeBlocks) {
  GROVE_SKIP_WITHOUT_GPU();
  if (!IsHopper()) GTEST_SKIP() << "the fused head epilogue is sm_90 only";
  CheckFusedHead({300}, 2048, 256, 1.f);
  CheckFusedHead({128}, 4096, 1024, 0.25f);
}

TEST(FusedLogProbHeadTest, LargeLogitsAndPartialLastBlock) {
  GROVE_SKIP_WITHOUT_GPU();
  if (!IsHopper()) GTEST_SKIP() << "the fused head epilogue is sm_90 only";
  // vocab 1000: the last block has 104 columns; the columns past it are
  // computed by the tile and must neither count nor be stored.
  CheckFusedHead({77}, 1000, 128, 4.f);  // |z| up to ~40
  CheckFusedHead({259}, 1032, 64, 2.f);
}

TEST(FusedLogProbHeadTest, RaggedExpertsWithAnEmptyOne) {
  GROVE_SKIP_WITHOUT_GPU();
  if (!IsHopper()) GTEST_SKIP() << "the fused head epilogue is sm_90 only";
  CheckFusedHead({5, 0, 140, 129}, 384, 192, 1.f);
}

TEST(FusedLogProbHeadTest, RejectsWhatTheEpilogueCannotDo) {
  // Argument checks run before any device query.
  __nv_bfloat16* dummy = reinterpret_cast<__nv_bfloat16*>(uintptr_t{256});
  int32_t* offsets = reinterpret_cast<int32_t*>(uintptr_t{512});
  float2* stats = reinterpret_cast<float2*>(uintptr_t{1024});
  GroupedGemmArgs args;
  args.a = dummy;
  args.w = dummy;
  args.c = dummy;
  args.expert_offsets = offsets;
  args.total_rows = 0;
  args.num_experts = 1;
  args.n = 128;
  args.k = 64;
  args.out_type = GemmOutType::kBF16;
  args.logit_block_stats = stats;
  EXPECT_TRUE(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).ok());  // no rows: nothing to do
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kMmaSync, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kWgmmaStaged, nullptr).code(), StatusCode::kInvalidArgument);
  args.out_type = GemmOutType::kF32;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.out_type = GemmOutType::kBF16;
  args.w_layout = GemmWeightLayout::kMnMajor;
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.w_layout = GemmWeightLayout::kKMajor;
  args.logit_targets = offsets;  // without logit_target
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);
  args.logit_block_stats = nullptr;
  args.logit_target = reinterpret_cast<float*>(uintptr_t{2048});  // targets without stats
  EXPECT_EQ(GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr).code(), StatusCode::kInvalidArgument);

  EXPECT_EQ(TokenLogProbFromBlockStats(nullptr, nullptr, nullptr, nullptr, nullptr, 4, 1000, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(TokenLogProbBackwardFromShifted(dummy, nullptr, offsets, reinterpret_cast<float*>(uintptr_t{2048}),
                                            reinterpret_cast<float*>(uintptr_t{4096}), dummy, 4, 1000, nullptr)
                .code(),
            StatusCode::kInvalidArgument);  // null block_stats
  EXPECT_EQ(TokenLogProbBackwardFromShifted(dummy, stats, offsets, nullptr, nullptr, dummy, 4, 1001, nullptr).code(),
            StatusCode::kInvalidArgument);  // vocab not a multiple of 8
}

}  // namespace
}  // namespace grove::kernels
