// Paged KV append + paged attention against a CPU reference: ragged
// sequences over pages handed out in shuffled order, a prefill launch (many
// rows per sequence) followed by a decode launch (one row per sequence), a
// padding row, head_dim 32, 64 and 128, GQA groups of 4 (and 8, 2). Every attention launch
// also runs PagedAttentionSplit (the chunk length and kernel its policy picks)
// and PagedAttentionSplitAt at every chunk kernel and length (the warp walk
// at 16 and 64 keys, the tiled kernel at 32, 64 and 128), with and without
// the fused append, on the same q and cache.
#include "kernels/paged_kv.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/paged_kv_internal.h"
#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

float Bf(float x) { return __bfloat162float(__float2bfloat16(x)); }

struct Case {
  int head_dim;
  std::vector<int> lengths;  // tokens per sequence (all appended; the last one by the decode launch)
  // Pages per sequence: max_pos = 16 * max_pages. At most
  // kPagedSplitShortContext (16 pages) the split takes its short chunks at
  // any row count, beyond it the long ones where a launch has many rows.
  int max_pages = 16;
  // Of the 8 query heads: groups of 4 (gpu-ref's), 8 (the kernels' widest:
  // their per-head registers sized for kPagedMaxGroup) or 2.
  int kv_heads = 2;
};

void RunCase(const Case& tc, uint64_t seed) {
  SCOPED_TRACE("head_dim " + std::to_string(tc.head_dim) + " max_pages " + std::to_string(tc.max_pages) +
               " kv_heads " + std::to_string(tc.kv_heads) + " seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int heads = 8, kv_heads = tc.kv_heads, hd = tc.head_dim, half = hd / 2, P = 16, G = heads / kv_heads;
  const int S = int(tc.lengths.size()), max_pages = tc.max_pages, max_pos = P * max_pages;
  const int qd = heads * hd, kd = kv_heads * hd, ld = qd + 2 * kd;
  // Pages: each sequence's in a random order over the pool, plus spare pages.
  std::vector<int> need(S);
  int total_pages = 3;
  for (int s = 0; s < S; ++s) total_pages += need[s] = (tc.lengths[s] + P - 1) / P;
  std::vector<int> ids(total_pages);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> table(size_t(S) * max_pages, -1);
  for (int s = 0, next = 0; s < S; ++s)
    for (int p = 0; p < need[s]; ++p) table[s * max_pages + p] = ids[next++];
  // RoPE tables as model/layers.h builds them (angle in double, fp32 values).
  std::vector<float> cos_t(size_t(max_pos) * half), sin_t(cos_t.size());
  for (int p = 0; p < max_pos; ++p)
    for (int i = 0; i < half; ++i) {
      const double a = double(p) * std::pow(10000.0, -2.0 * i / hd);
      cos_t[p * half + i] = float(std::cos(a));
      sin_t[p * half + i] = float(std::sin(a));
    }
  // Rows: prefill = all but the last token of each sequence (+ one padding
  // row); decode = the last token of each.
  std::vector<int32_t> pre_slot, pre_pos, dec_slot, dec_pos;
  for (int s = 0; s < S; ++s) {
    for (int t = 0; t + 1 < tc.lengths[s]; ++t) { pre_slot.push_back(s); pre_pos.push_back(t); }
    dec_slot.push_back(s);
    dec_pos.push_back(tc.lengths[s] - 1);
  }
  pre_slot.push_back(-1);
  pre_pos.push_back(0);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto random_qkv = [&](size_t rows) {
    std::vector<float> v(rows * ld);
    for (float& x : v) x = nd(rng);
    return v;
  };
  const std::vector<float> pre_qkv = random_qkv(pre_slot.size()), dec_qkv = random_qkv(dec_slot.size());

  DeviceBuffer<__nv_bfloat16> kpool(size_t(total_pages) * P * kd), vpool(kpool.count());
  DeviceBuffer<int32_t> d_table(table.size());
  DeviceBuffer<float> d_cos(cos_t.size()), d_sin(sin_t.size());
  GROVE_CUDA_OK(d_table.Upload(table));
  GROVE_CUDA_OK(d_cos.Upload(cos_t));
  GROVE_CUDA_OK(d_sin.Upload(sin_t));
  PagedKvCache cache{kpool.get(), vpool.get(), d_table.get(), total_pages, P, max_pages, kv_heads, hd};

  struct Launch {
    std::vector<__nv_bfloat16> q, out, split;
    std::vector<std::vector<__nv_bfloat16>> at;  // one per kAtVariants entry
  };
  struct AtVariant {
    int chunk_tokens;
    PagedChunkKernel kernel;
  };
  static constexpr AtVariant kAtVariants[] = {{16, PagedChunkKernel::kWarpWalk},
                                              {64, PagedChunkKernel::kWarpWalk},
                                              {32, PagedChunkKernel::kTiled},
                                              {64, PagedChunkKernel::kTiled},
                                              {128, PagedChunkKernel::kTiled}};
  auto variant_name = [](const AtVariant& v) {
    return std::string(v.kernel == PagedChunkKernel::kTiled ? "tiled " : "warp walk ") + std::to_string(v.chunk_tokens);
  };
  auto launch = [&](const std::vector<int32_t>& slot, const std::vector<int32_t>& pos, const std::vector<float>& qkv,
                    Launch* res) {
    const int rows = int(slot.size());
    DeviceBuffer<int32_t> d_slot(rows), d_pos(rows);
    DeviceBuffer<float> d_qkv(qkv.size());
    DeviceBuffer<__nv_bfloat16> d_q(size_t(rows) * qd), d_out(size_t(rows) * qd), d_split(size_t(rows) * qd);
    GROVE_CUDA_OK(d_slot.Upload(slot));
    GROVE_CUDA_OK(d_pos.Upload(pos));
    GROVE_CUDA_OK(d_qkv.Upload(qkv));
    PagedRows pr{d_slot.get(), d_pos.get(), rows};
    // Decode rows (one per sequence): the split pass with the append folded
    // in (PagedFusedAppend), before anything appended these positions; its
    // output must be the bits of append + split below.
    const bool decode = &qkv == &dec_qkv;
    const size_t fused_ws_bytes = PagedAttentionSplitWorkspaceBytes(cache, rows, heads, max_pos);
    DeviceBuffer<float> d_fused_ws(fused_ws_bytes / sizeof(float));
    DeviceBuffer<__nv_bfloat16> d_fused(size_t(rows) * qd);
    if (decode) {
      const PagedFusedAppend fa{d_qkv.get(), ld, d_cos.get(), d_sin.get()};
      ASSERT_TRUE(PagedAttentionSplit(cache, pr, heads, nullptr, d_fused.get(), 0.f, max_pos, d_fused_ws.get(),
                                      fused_ws_bytes, nullptr, &fa)
                      .ok());
    }
    ASSERT_TRUE(PagedKvAppend(cache, pr, heads, d_qkv.get(), ld, d_cos.get(), d_sin.get(), d_q.get(), nullptr).ok());
    ASSERT_TRUE(PagedAttention(cache, pr, heads, d_q.get(), d_out.get(), 0.f, nullptr).ok());
    ASSERT_EQ(PagedAttentionSplitChunks(cache, max_pos), max_pos / kPagedSplitChunkTokens);
    const size_t ws_bytes = PagedAttentionSplitWorkspaceBytes(cache, rows, heads, max_pos);
    DeviceBuffer<float> d_ws(ws_bytes / sizeof(float));
    // NaN-filled workspace: a partial the combine reads without the split
    // kernel having written it shows up as a NaN output.
    GROVE_CUDA_OK(cudaMemset(d_ws.get(), 0xff, ws_bytes));
    ASSERT_FALSE(PagedAttentionSplit(cache, pr, heads, d_q.get(), d_split.get(), 0.f, max_pos, d_ws.get(),
                                     ws_bytes - 1, nullptr)
                     .ok());
    ASSERT_TRUE(
        PagedAttentionSplit(cache, pr, heads, d_q.get(), d_split.get(), 0.f, max_pos, d_ws.get(), ws_bytes, nullptr)
            .ok());
    // Every (kernel, length): after the append, and (decode rows) with the
    // append folded in again (it rewrites the same bits at the same places).
    for (const AtVariant& v : kAtVariants) {
      SCOPED_TRACE(variant_name(v));
      const size_t at_bytes = PagedAttentionSplitWorkspaceBytesAt(cache, rows, heads, max_pos, v.chunk_tokens);
      DeviceBuffer<float> d_at_ws(at_bytes / sizeof(float));
      DeviceBuffer<__nv_bfloat16> d_at(size_t(rows) * qd), d_at_fused(size_t(rows) * qd);
      GROVE_CUDA_OK(cudaMemset(d_at_ws.get(), 0xff, at_bytes));
      ASSERT_FALSE(PagedAttentionSplitAt(cache, pr, heads, d_q.get(), d_at.get(), 0.f, max_pos, d_at_ws.get(),
                                         at_bytes - 1, nullptr, nullptr, v.chunk_tokens, v.kernel)
                       .ok());
      ASSERT_TRUE(PagedAttentionSplitAt(cache, pr, heads, d_q.get(), d_at.get(), 0.f, max_pos, d_at_ws.get(), at_bytes,
                                        nullptr, nullptr, v.chunk_tokens, v.kernel)
                      .ok());
      res->at.emplace_back();
      GROVE_CUDA_OK(d_at.Download(&res->at.back()));
      if (decode) {
        const PagedFusedAppend fa{d_qkv.get(), ld, d_cos.get(), d_sin.get()};
        ASSERT_TRUE(PagedAttentionSplitAt(cache, pr, heads, nullptr, d_at_fused.get(), 0.f, max_pos, d_at_ws.get(),
                                          at_bytes, nullptr, &fa, v.chunk_tokens, v.kernel)
                        .ok());
        std::vector<__nv_bfloat16> fused;
        GROVE_CUDA_OK(d_at_fused.Download(&fused));
        int differ = 0;
        for (size_t i = 0; i < fused.size(); ++i) differ += std::memcmp(&fused[i], &res->at.back()[i], 2) != 0;
        EXPECT_EQ(differ, 0) << "the append folded in vs append + split";
      }
    }
    GROVE_CUDA_OK(cudaDeviceSynchronize());
    GROVE_CUDA_OK(d_q.Download(&res->q));
    GROVE_CUDA_OK(d_out.Download(&res->out));
    GROVE_CUDA_OK(d_split.Download(&res->split));
    if (decode) {
      std::vector<__nv_bfloat16> fused;
      GROVE_CUDA_OK(d_fused.Download(&fused));
      int differ = 0;
      for (size_t i = 0; i < fused.size(); ++i) differ += std::memcmp(&fused[i], &res->split[i], 2) != 0;
      EXPECT_EQ(differ, 0) << "split pass with the append folded in vs append + split";
    }
  };
  Launch pre, dec;
  launch(pre_slot, pre_pos, pre_qkv, &pre);
  launch(dec_slot, dec_pos, dec_qkv, &dec);
  std::vector<__nv_bfloat16> kh, vh;
  GROVE_CUDA_OK(kpool.Download(&kh));
  GROVE_CUDA_OK(vpool.Download(&vh));

  // Reference K/V/Q per sequence position, fp32 rotation then bf16 rounding.
  // (paged_kv.cu's RopePair rounds each product as the host does, so the fp32 values
  // should agree; the bound still allows FMA contraction.) An FMA moves the fp32
  // result by up to ~2 ulps of the larger term (2^-23 (|a c| + |b s|)); where
  // the two terms cancel that is far more than a bf16 step of the result, so
  // the bound is one bf16 step of the result (the two fp32 values straddle a
  // rounding boundary; a step is up to 2^-7 of the value, just above a power
  // of two) plus twice that fp32 difference.
  std::vector<float> mag(hd);
  auto rotate = [&](const float* x, int p, float* y) {
    for (int i = 0; i < half; ++i) {
      const float c = cos_t[p * half + i], s = sin_t[p * half + i], a = x[i], b = x[i + half];
      y[i] = Bf(a * c - b * s);
      y[i + half] = Bf(a * s + b * c);
      mag[i] = std::fabs(a * c) + std::fabs(b * s);
      mag[i + half] = std::fabs(a * s) + std::fabs(b * c);
    }
  };
  auto near = [](float got, float want, float terms) {
    return std::fabs(got - want) <= std::ldexp(std::fabs(want), -7) + std::ldexp(terms, -22) + 1e-6f;
  };
  auto cache_at = [&](const std::vector<__nv_bfloat16>& pool, int s, int p, int kh_i, int d) {
    const int page = table[s * max_pages + p / P];
    return __bfloat162float(pool[((size_t(page) * P + p % P) * kv_heads + kh_i) * hd + d]);
  };
  std::vector<float> y(hd);
  int bad = 0;
  auto check_row_qkv = [&](const float* row, int s, int p, const std::vector<__nv_bfloat16>& qgot, size_t r) {
    for (int hh = 0; hh < heads; ++hh) {
      rotate(row + hh * hd, p, y.data());
      for (int d = 0; d < hd; ++d) bad += !near(__bfloat162float(qgot[r * qd + hh * hd + d]), y[d], mag[d]);
    }
    for (int g = 0; g < kv_heads; ++g) {
      rotate(row + qd + g * hd, p, y.data());
      for (int d = 0; d < hd; ++d) {
        bad += !near(cache_at(kh, s, p, g, d), y[d], mag[d]);
        bad += cache_at(vh, s, p, g, d) != Bf(row[qd + kd + g * hd + d]);
      }
    }
  };
  for (size_t r = 0; r + 1 < pre_slot.size(); ++r) check_row_qkv(&pre_qkv[r * ld], pre_slot[r], pre_pos[r], pre.q, r);
  for (size_t r = 0; r < dec_slot.size(); ++r) check_row_qkv(&dec_qkv[r * ld], dec_slot[r], dec_pos[r], dec.q, r);
  EXPECT_EQ(bad, 0) << "q/k/v values off by more than one bf16 step";

  // Attention reference in double on the kernel's own bf16 q and cache.
  // Error budget: the output's bf16 rounding (2^-9 relative) plus fp32
  // accumulation over <= 256 keys of values |v| < 6 (~256 * 6 * 2^-24 < 1e-4).
  const double scale = 1.0 / std::sqrt(double(hd));
  double worst = 0;
  auto check_attn = [&](const std::vector<__nv_bfloat16>& qv, const std::vector<__nv_bfloat16>& out, size_t r, int s,
                        int p) {
    for (int hh = 0; hh < heads; ++hh) {
      const int g = hh / G;
      std::vector<double> sc(p + 1);
      double mx = -1e300;
      for (int j = 0; j <= p; ++j) {
        double dot = 0;
        for (int d = 0; d < hd; ++d) dot += double(__bfloat162float(qv[r * qd + hh * hd + d])) * cache_at(kh, s, j, g, d);
        sc[j] = dot * scale;
        mx = std::max(mx, sc[j]);
      }
      double sum = 0;
      for (double& v : sc) sum += v = std::exp(v - mx);
      for (int d = 0; d < hd; ++d) {
        double o = 0;
        for (int j = 0; j <= p; ++j) o += sc[j] * cache_at(vh, s, j, g, d);
        o /= sum;
        const double got = __bfloat162float(out[r * qd + hh * hd + d]);
        const double err = std::fabs(got - o), tol = std::ldexp(std::fabs(o), -8) + 1e-4;
        worst = std::max(worst, std::isnan(got) ? 1e30 : err / tol);  // NaN: an unwritten partial
      }
    }
  };
  for (size_t r = 0; r + 1 < pre_slot.size(); ++r) check_attn(pre.q, pre.out, r, pre_slot[r], pre_pos[r]);
  for (size_t r = 0; r < dec_slot.size(); ++r) check_attn(dec.q, dec.out, r, dec_slot[r], dec_pos[r]);
  EXPECT_LE(worst, 1.0) << "attention error / tolerance";
  worst = 0;
  for (size_t r = 0; r + 1 < pre_slot.size(); ++r) check_attn(pre.q, pre.split, r, pre_slot[r], pre_pos[r]);
  for (size_t r = 0; r < dec_slot.size(); ++r) check_attn(dec.q, dec.split, r, dec_slot[r], dec_pos[r]);
  EXPECT_LE(worst, 1.0) << "split attention error / tolerance";
  for (size_t vi = 0; vi < std::size(kAtVariants); ++vi) {
    worst = 0;
    for (size_t r = 0; r + 1 < pre_slot.size(); ++r) check_attn(pre.q, pre.at[vi], r, pre_slot[r], pre_pos[r]);
    for (size_t r = 0; r < dec_slot.size(); ++r) check_attn(dec.q, dec.at[vi], r, dec_slot[r], dec_pos[r]);
    EXPECT_LE(worst, 1.0) << variant_name(kAtVariants[vi]) << ": attention error / tolerance";
  }
  // Split vs unsplit: the same fp32 math in another summation order, so the
  // fp32 values differ by ~1e-6 relative (accumulation over <= 256 keys);
  // after bf16 rounding that is at most one bf16 step (up to 2^-7 of the
  // value just above a power of two, the two values straddling a rounding
  // boundary) plus the absolute fp32 part.
  int split_bad = 0;
  auto compare_split = [&](const Launch& l, size_t rows) {
    for (size_t i = 0; i < rows * qd; ++i) {
      const float a = __bfloat162float(l.out[i]), b = __bfloat162float(l.split[i]);
      split_bad += !(std::fabs(a - b) <= std::ldexp(std::max(std::fabs(a), std::fabs(b)), -7) + 1e-5f);
    }
  };
  compare_split(pre, pre_slot.size());
  compare_split(dec, dec_slot.size());
  EXPECT_EQ(split_bad, 0) << "split vs unsplit outputs beyond one bf16 step";
  const size_t pad = pre_slot.size() - 1;
  for (int i = 0; i < qd; ++i) ASSERT_EQ(__bfloat162float(pre.out[pad * qd + i]), 0.f) << "padding row";
  for (int i = 0; i < qd; ++i) ASSERT_EQ(__bfloat162float(pre.split[pad * qd + i]), 0.f) << "split padding row";
  for (size_t vi = 0; vi < std::size(kAtVariants); ++vi)
    for (int i = 0; i < qd; ++i)
      ASSERT_EQ(__bfloat162float(pre.at[vi][pad * qd + i]), 0.f) << variant_name(kAtVariants[vi]) << ": padding row";
}

TEST(PagedKv, RaggedPrefillThenDecodeHeadDim128) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({128, {1, 2, 16, 17, 33, 100, 255}}, testing::FreshSeed());
  RunCase({128, {1, 2, 16, 17, 33, 100, 255, 300}, 20}, testing::FreshSeed());  // 64-key chunks
}

// One kv head for all 8 query heads (the kernels' kPagedMaxGroup-wide
// registers) and 4 kv heads (groups of 2).
TEST(PagedKv, RaggedPrefillThenDecodeOtherGroups) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({128, {1, 17, 100, 255, 300}, 20, 1}, testing::FreshSeed());
  RunCase({64, {3, 16, 129, 200}, 16, 4}, testing::FreshSeed());
}

TEST(PagedKv, RaggedPrefillThenDecodeHeadDim64) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({64, {3, 15, 16, 48, 129}}, testing::FreshSeed());
}

// head_dim 32: one element per lane (the configs/default.toml model's shape).
TEST(PagedKv, RaggedPrefillThenDecodeHeadDim32) {
  GROVE_SKIP_WITHOUT_GPU();
  RunCase({32, {1, 3, 16, 17, 40, 64, 129}}, testing::FreshSeed());
}

TEST(PagedKv, RejectsBadShapes) {
  PagedKvCache c;
  c.head_dim = 96;
  PagedRows r;
  EXPECT_FALSE(PagedAttention(c, r, 8, nullptr, nullptr, 0.f, nullptr).ok());
  c.head_dim = 128;
  c.kv_heads = 1;
  EXPECT_FALSE(PagedAttention(c, r, 16, nullptr, nullptr, 0.f, nullptr).ok());  // group 16 > kPagedMaxGroup
  EXPECT_FALSE(PagedAttentionSplit(c, r, 16, nullptr, nullptr, 0.f, 0, nullptr, 0, nullptr).ok());
  c.head_dim = 96;
  EXPECT_FALSE(PagedAttentionSplit(c, r, 8, nullptr, nullptr, 0.f, 0, nullptr, 0, nullptr).ok());
  c.head_dim = 16;
  EXPECT_FALSE(PagedAttention(c, r, 8, nullptr, nullptr, 0.f, nullptr).ok());
  // The tiled kernel holds 32, 64 or 128 keys a chunk; the warp walk any.
  c.head_dim = 128;
  c.kv_heads = 2;
  c.page_tokens = c.max_pages_per_seq = c.num_pages = 1;
  __nv_bfloat16* any = reinterpret_cast<__nv_bfloat16*>(uintptr_t{256});
  c.k = c.v = any;
  c.page_table = reinterpret_cast<const int32_t*>(any);
  for (int bad : {0, 16, 48, 256}) {
    const Status st =
        PagedAttentionSplitAt(c, r, 8, nullptr, nullptr, 0.f, 0, nullptr, 0, nullptr, nullptr, bad, PagedChunkKernel::kTiled);
    EXPECT_FALSE(st.ok()) << bad;
    EXPECT_NE(st.message().find("-key chunks"), std::string::npos) << st.ToString();
  }
  EXPECT_FALSE(
      PagedAttentionSplitAt(c, r, 8, nullptr, nullptr, 0.f, 0, nullptr, 0, nullptr, nullptr, 0, PagedChunkKernel::kWarpWalk)
          .ok());
}

}  // namespace
}  // namespace grove::kernels
