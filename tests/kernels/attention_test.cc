// Causal grouped-query flash attention, forward and backward, against a
// double-precision CPU loop on fresh random bf16 inputs: ragged batches,
// length-1 sequences, lengths off the 64-row tile, head_dim 32, 64 and 128,
// query groups of 1, 2, 4 and 6 heads per KV head. AttentionForward runs
// the wgmma kernel at head_dim 128 on sm_90 (kAuto), the mma.sync one
// elsewhere; AttentionWgmmaForwardTest below checks the wgmma forward alone
// and against the mma.sync one.
//
// Tolerances. The reference sees the kernels' bf16 inputs exactly, so only
// the kernels' own roundings remain: scores and sums in fp32 (relative
// ~1e-6 at these sizes, with ex2.approx ~2 ulp), and four bf16 roundings
// of 2^-9 = 2e-3 relative each: P before P.V (and P^T before P^T.dO), dS
// before dS.K / dS^T.Q, every output, and O itself, which the backward's
// rowsum(dO o O) reads rounded. These are independent per element, so the
// norm-wise error of each output is a few times 2^-9 at most: O is held to
// 1e-2 norm-wise and 3e-2 in every (token, head) row (the worst of
// thousands of rows), dQ/dK/dV to 2e-2 norm-wise (dS = P (dP - rowsum)
// loses digits to cancellation where dP ~ rowsum, hence the wider bound),
// and the fp32 log-sum-exp to 1e-4 absolute (a relative 1e-6 of scores ~10).
//
// Every case also runs with q, k, v (and dq, dk, dv) in strided rows: the
// arithmetic is the same, so O, lse, dK and dV must equal the packed run's
// bit for bit; dQ's fp32 atomics add in a run-dependent order, so dQ is held
// to the reference as above. Columns outside the tensors hold NaN and must
// be neither read (a NaN would reach the outputs) nor written.
#include "kernels/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kernels/attention_internal.h"
#include "kernels/rope.h"
#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

struct Case {
  std::vector<int> lens;
  int heads, kv_heads, head_dim;
  int max_seqlen_slack = 0;  // max_seqlen passed above the longest length (a looser bound)
  // Bound on dQ's and dK's relative L2 error. 2e-2 in general. Sequences of
  // 1-2 tokens need more: there dS = P (dP - D) is a difference of nearly
  // equal terms (exactly 0 for one token, whose dQ and dK are 0), and the
  // kernel's D comes from the bf16-rounded O (2^-9 relative), so dQ's and
  // dK's relative error is that rounding amplified by |D| / |dS|; measured
  // up to 2.2e-2 over fresh seeds on an H100 (2026-11-23).
  double dqk_tolerance = 2e-2;
};

std::string Describe(const Case& c) {
  std::string s = "D=" + std::to_string(c.head_dim) + " H=" + std::to_string(c.heads) +
                  " Hkv=" + std::to_string(c.kv_heads) + " lens";
  for (int l : c.lens) s += " " + std::to_string(l);
  return s;
}

// Double-precision causal GQA attention of one batch, forward and (unless
// !backward) backward.
struct Reference {
  std::vector<double> o, lse, dq, dk, dv;
};

Reference RunReference(const Case& c, const std::vector<int>& cu, const std::vector<double>& q,
                       const std::vector<double>& k, const std::vector<double>& v,
                       const std::vector<double>& dout, double scale, bool backward = true) {
  const int H = c.heads, Hk = c.kv_heads, D = c.head_dim, T = cu.back();
  Reference r;
  r.o.assign(size_t(T) * H * D, 0);
  r.lse.assign(size_t(H) * T, 0);
  r.dq.assign(size_t(T) * H * D, 0);
  r.dk.assign(size_t(T) * Hk * D, 0);
  r.dv.assign(size_t(T) * Hk * D, 0);
  auto qi = [&](int t, int h) { return (size_t(t) * H + h) * D; };
  auto ki = [&](int t, int h) { return (size_t(t) * Hk + h) * D; };
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    const int s0 = cu[b], len = cu[b + 1] - cu[b];
    for (int h = 0; h < H; ++h) {
      const int kh = h / (H / Hk);
      std::vector<double> p(size_t(len) * len, 0.0);
      for (int i = 0; i < len; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j <= i; ++j) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += q[qi(s0 + i, h) + d] * k[ki(s0 + j, kh) + d];
          p[size_t(i) * len + j] = s * scale;
          mx = std::max(mx, s * scale);
        }
        double sum = 0;
        for (int j = 0; j <= i; ++j) sum += std::exp(p[size_t(i) * len + j] - mx);
        r.lse[size_t(h) * T + s0 + i] = mx + std::log(sum);
        for (int j = 0; j <= i; ++j) {
          double& pij = p[size_t(i) * len + j];
          pij = std::exp(pij - mx) / sum;
          for (int d = 0; d < D; ++d) r.o[qi(s0 + i, h) + d] += pij * v[ki(s0 + j, kh) + d];
        }
      }
      for (int i = 0; i < len && backward; ++i) {
        double rowdot = 0;
        for (int d = 0; d < D; ++d) rowdot += dout[qi(s0 + i, h) + d] * r.o[qi(s0 + i, h) + d];
        for (int j = 0; j <= i; ++j) {
          const double pij = p[size_t(i) * len + j];
          double dp = 0;
          for (int d = 0; d < D; ++d) {
            dp += dout[qi(s0 + i, h) + d] * v[ki(s0 + j, kh) + d];
            r.dv[ki(s0 + j, kh) + d] += pij * dout[qi(s0 + i, h) + d];
          }
          const double ds = pij * (dp - rowdot) * scale;
          for (int d = 0; d < D; ++d) {
            r.dq[qi(s0 + i, h) + d] += ds * k[ki(s0 + j, kh) + d];
            r.dk[ki(s0 + j, kh) + d] += ds * q[qi(s0 + i, h) + d];
          }
        }
      }
    }
  }
  return r;
}

std::vector<double> ToDouble(const std::vector<__nv_bfloat16>& x) {
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = __bfloat162float(x[i]);
  return out;
}

// Elements whose bits differ (sizes must match).
template <typename T>
size_t BitDiffs(const std::vector<T>& a, const std::vector<T>& b) {
  EXPECT_EQ(a.size(), b.size());
  size_t n = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) n += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return n;
}

// A bf16 NaN, all bits set: what cudaMemset(0xFF) writes.
__nv_bfloat16 NanBf16() {
  __nv_bfloat16_raw raw;
  raw.x = 0xFFFF;
  return raw;
}

// Where q, k, v lie (elements, in one buffer of `total`), and dq, dk, dv in a
// second buffer placed alike. fused: [q | k | v | pad] in each row, one
// stride for all, as GpuTransformer's projection output. Otherwise q in rows
// [q | pad] and, after all of them, k and v in rows [k | v | pad] of another
// stride (different from q's even when q and [k | v] are as wide).
struct Placement {
  size_t q = 0, k = 0, v = 0, total = 0;
  int64_t q_rs = 0, kv_rs = 0;
};

Placement Place(bool fused, int T, int64_t qw, int64_t kw) {
  constexpr int64_t kPad = 8;  // keeps rows 16-byte aligned
  Placement p;
  if (fused) {
    p.q_rs = p.kv_rs = qw + 2 * kw + kPad;
    p.k = size_t(qw);
    p.v = size_t(qw + kw);
    p.total = size_t(T) * p.q_rs;
  } else {
    p.q_rs = qw + kPad;
    p.kv_rs = 2 * kw + 2 * kPad;
    p.k = size_t(T) * p.q_rs;
    p.v = p.k + size_t(kw);
    p.total = p.k + size_t(T) * p.kv_rs;
  }
  return p;
}

// Copies packed [T, width] rows to (to_strided) or from strided rows at
// buf + at (stride elements apart); copying out replaces the source with NaN
// bits, so that what is left of buf afterwards is what no tensor covers.
void Move(std::vector<__nv_bfloat16>& packed, std::vector<__nv_bfloat16>& buf, size_t at, int64_t stride,
          int64_t width, int T, bool to_strided) {
  packed.resize(size_t(T) * width);
  for (int t = 0; t < T; ++t)
    for (int64_t c = 0; c < width; ++c) {
      __nv_bfloat16& strided = buf[at + size_t(t) * stride + c];
      __nv_bfloat16& dense = packed[size_t(t) * width + c];
      if (to_strided) {
        strided = dense;
      } else {
        dense = strided;
        strided = NanBf16();
      }
    }
}

// The packed run's results CheckStrided compares against.
struct PackedRun {
  std::vector<__nv_bfloat16> q, k, v, dout, o, dk, dv;
  std::vector<float> lse;
};

void CheckStrided(const Case& c, AttentionShape shape, bool fused, const PackedRun& packed,
                  const Reference& ref) {
  SCOPED_TRACE(fused ? "fused [q | k | v] rows" : "q rows and [k | v] rows of different strides");
  const int T = shape.total_tokens;
  const int64_t qw = int64_t(c.heads) * c.head_dim, kw = int64_t(c.kv_heads) * c.head_dim;
  const Placement at = Place(fused, T, qw, kw);
  const __nv_bfloat16 nan = NanBf16();
  std::vector<__nv_bfloat16> in(at.total, nan);
  std::vector<__nv_bfloat16> q = packed.q, k = packed.k, v = packed.v;
  Move(q, in, at.q, at.q_rs, qw, T, true);
  Move(k, in, at.k, at.kv_rs, kw, T, true);
  Move(v, in, at.v, at.kv_rs, kw, T, true);
  DeviceBuffer<__nv_bfloat16> d_in(in.size()), d_grad(in.size()), d_do(packed.dout.size()),
      d_o(packed.o.size());
  DeviceBuffer<float> d_lse(packed.lse.size());
  DeviceBuffer<char> ws(AttentionBackwardWorkspaceBytes(shape));  // strides do not change it
  GROVE_CUDA_OK(d_in.Upload(in));
  GROVE_CUDA_OK(d_do.Upload(packed.dout));
  GROVE_CUDA_OK(cudaMemset(d_grad.get(), 0xFF, d_grad.count() * 2));
  GROVE_CUDA_OK(cudaMemset(d_o.get(), 0xFF, d_o.count() * 2));
  GROVE_CUDA_OK(cudaMemset(d_lse.get(), 0xFF, d_lse.count() * 4));
  GROVE_CUDA_OK(cudaMemset(ws.get(), 0xFF, ws.count()));
  shape.q_row_stride = at.q_rs;
  shape.kv_row_stride = at.kv_rs;
  const __nv_bfloat16* base = d_in.get();
  __nv_bfloat16* grad = d_grad.get();
  Status st = AttentionForward(shape, base + at.q, base + at.k, base + at.v, d_o.get(), d_lse.get(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  st = AttentionBackward(shape, base + at.q, base + at.k, base + at.v, d_o.get(), d_do.get(), d_lse.get(),
                         grad + at.q, grad + at.k, grad + at.v, ws.get(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  GROVE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> o, grads, dq, dk, dv;
  std::vector<float> lse;
  GROVE_CUDA_OK(d_o.Download(&o));
  GROVE_CUDA_OK(d_lse.Download(&lse));
  GROVE_CUDA_OK(d_grad.Download(&grads));
  Move(dq, grads, at.q, at.q_rs, qw, T, false);
  Move(dk, grads, at.k, at.kv_rs, kw, T, false);
  Move(dv, grads, at.v, at.kv_rs, kw, T, false);
  EXPECT_EQ(BitDiffs(o, packed.o), 0u);
  EXPECT_EQ(BitDiffs(lse, packed.lse), 0u);
  EXPECT_EQ(BitDiffs(dk, packed.dk), 0u);
  EXPECT_EQ(BitDiffs(dv, packed.dv), 0u);
  EXPECT_LE(testing::RelativeError(ToDouble(dq), ref.dq), c.dqk_tolerance);
  EXPECT_EQ(BitDiffs(grads, std::vector<__nv_bfloat16>(grads.size(), nan)), 0u)
      << "elements outside dq, dk, dv written";
}

void CheckAttention(const Case& c) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " " + Describe(c));
  std::mt19937_64 rng(seed);
  const int H = c.heads, Hk = c.kv_heads, D = c.head_dim;
  std::vector<int> cu{0};
  for (int l : c.lens) cu.push_back(cu.back() + l);
  const int T = cu.back();
  std::vector<__nv_bfloat16> q_bf, k_bf, v_bf, do_bf;
  std::vector<double> q, k, v, dout;
  testing::RandomBf16(rng, size_t(T) * H * D, &q_bf, &q);
  testing::RandomBf16(rng, size_t(T) * Hk * D, &k_bf, &k);
  testing::RandomBf16(rng, size_t(T) * Hk * D, &v_bf, &v);
  testing::RandomBf16(rng, size_t(T) * H * D, &do_bf, &dout);
  // Queries in [-6, 6]: scores of standard deviation ~2, so softmax rows are
  // peaked (max-subtraction and rescaling matter), not near-uniform.
  for (size_t i = 0; i < q.size(); ++i) {
    q_bf[i] = __float2bfloat16(6.f * __bfloat162float(q_bf[i]));
    q[i] = __bfloat162float(q_bf[i]);
  }
  const double scale = 1.0 / std::sqrt(double(D));

  DeviceBuffer<int32_t> d_cu(cu.size());
  DeviceBuffer<__nv_bfloat16> d_q(q.size()), d_k(k.size()), d_v(v.size()), d_do(dout.size()),
      d_o(q.size()), d_dq(q.size()), d_dk(k.size()), d_dv(v.size());
  DeviceBuffer<float> d_lse(size_t(H) * T);
  GROVE_CUDA_OK(d_cu.Upload(std::vector<int32_t>(cu.begin(), cu.end())));
  GROVE_CUDA_OK(d_q.Upload(q_bf));
  GROVE_CUDA_OK(d_k.Upload(k_bf));
  GROVE_CUDA_OK(d_v.Upload(v_bf));
  GROVE_CUDA_OK(d_do.Upload(do_bf));
  for (auto* b : {&d_o, &d_dq, &d_dk, &d_dv})
    GROVE_CUDA_OK(cudaMemset(b->get(), 0xFF, b->count() * 2));  // NaN
  GROVE_CUDA_OK(cudaMemset(d_lse.get(), 0xFF, d_lse.count() * 4));

  AttentionShape shape;
  shape.cu_seqlens = d_cu.get();
  shape.batch = int(c.lens.size());
  shape.max_seqlen = *std::max_element(c.lens.begin(), c.lens.end()) + c.max_seqlen_slack;
  shape.total_tokens = T;
  shape.num_heads = H;
  shape.num_kv_heads = Hk;
  shape.head_dim = D;
  DeviceBuffer<char> ws(AttentionBackwardWorkspaceBytes(shape));
  GROVE_CUDA_OK(cudaMemset(ws.get(), 0xFF, ws.count()));
  Status st = AttentionForward(shape, d_q.get(), d_k.get(), d_v.get(), d_o.get(), d_lse.get(),
                               nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  st = AttentionBackward(shape, d_q.get(), d_k.get(), d_v.get(), d_o.get(), d_do.get(),
                         d_lse.get(), d_dq.get(), d_dk.get(), d_dv.get(), ws.get(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  GROVE_CUDA_OK(cudaDeviceSynchronize());

  std::vector<__nv_bfloat16> o_bf, dq_bf, dk_bf, dv_bf;
  std::vector<float> lse;
  GROVE_CUDA_OK(d_o.Download(&o_bf));
  GROVE_CUDA_OK(d_dq.Download(&dq_bf));
  GROVE_CUDA_OK(d_dk.Download(&dk_bf));
  GROVE_CUDA_OK(d_dv.Download(&dv_bf));
  GROVE_CUDA_OK(d_lse.Download(&lse));
  const Reference ref = RunReference(c, cu, q, k, v, dout, scale);

  const std::vector<double> o = ToDouble(o_bf);
  const double err_o = testing::RelativeError(o, ref.o);
  const double err_dq = testing::RelativeError(ToDouble(dq_bf), ref.dq);
  const double err_dk = testing::RelativeError(ToDouble(dk_bf), ref.dk);
  const double err_dv = testing::RelativeError(ToDouble(dv_bf), ref.dv);
  double err_lse = 0, worst_row = 0;
  for (size_t i = 0; i < lse.size(); ++i)
    err_lse = std::max(err_lse, std::isfinite(lse[i]) ? std::fabs(lse[i] - ref.lse[i]) : INFINITY);
  for (size_t row = 0; row < size_t(T) * H; ++row) {
    std::vector<double> got(o.begin() + row * D, o.begin() + (row + 1) * D);
    std::vector<double> want(ref.o.begin() + row * D, ref.o.begin() + (row + 1) * D);
    worst_row = std::max(worst_row, testing::RelativeError(got, want));
  }
  std::printf("%s: rel err O %.2e (worst row %.2e) dQ %.2e dK %.2e dV %.2e, |lse| %.1e\n",
              Describe(c).c_str(), err_o, worst_row, err_dq, err_dk, err_dv, err_lse);
  EXPECT_LE(err_o, 1e-2);
  EXPECT_LE(worst_row, 3e-2);
  EXPECT_LE(err_lse, 1e-4);
  EXPECT_LE(err_dq, c.dqk_tolerance);
  EXPECT_LE(err_dk, c.dqk_tolerance);
  EXPECT_LE(err_dv, 2e-2);

  const PackedRun packed{q_bf, k_bf, v_bf, do_bf, o_bf, dk_bf, dv_bf, lse};
  for (bool fused : {true, false}) CheckStrided(c, shape, fused, packed, ref);
}

TEST(AttentionTest, RaggedBatchHeadDim128) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckAttention({{1, 17, 64, 65, 130, 200}, 8, 2, 128});
}

TEST(AttentionTest, RaggedBatchHeadDim64) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckAttention({{3, 128, 1, 257, 63}, 8, 2, 64});
}

// head_dim 32 has its own shared-memory swizzle (4 chunks a row, two rows
// to a 128-byte line): ragged lengths across tile edges.
TEST(AttentionTest, RaggedBatchHeadDim32) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckAttention({{3, 128, 1, 257, 63, 64, 65}, 8, 2, 32});
}

// The CPU default model's attention (configs/default.toml: 4 heads, 2 KV
// heads, head_dim 32), at its sequence lengths (max_seq_len 64) and one
// longer batch.
TEST(AttentionTest, DefaultModelShapeHeadDim32) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckAttention({{12, 40, 64, 1, 33, 57, 20, 64}, 4, 2, 32});
  CheckAttention({{300, 129}, 4, 2, 32});
}

TEST(AttentionTest, SingleTokenAndMultiHead) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckAttention({{1}, 4, 4, 128, 0, 5e-2});
  CheckAttention({{1, 1, 2}, 4, 4, 64, 0, 5e-2});
  CheckAttention({{1, 2, 1}, 4, 4, 32, 0, 5e-2});
}

TEST(AttentionTest, LargeQueryGroup) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckAttention({{100, 64, 191}, 6, 1, 64, 300});
  CheckAttention({{320}, 8, 2, 128});
  CheckAttention({{100, 64, 191}, 6, 1, 32, 300});
}

// Many short sequences under a loose max_seqlen: the grid spans several
// chunks of (sequence, head) pairs, the last one partial, and most CTAs
// find their tile past their sequence's end.
TEST(AttentionTest, ManySequencesLooseBound) {
  GROVE_SKIP_WITHOUT_GPU();
  std::vector<int> lens;
  for (int i = 0; i < 23; ++i) lens.push_back(1 + (i * 37) % 150);
  CheckAttention({lens, 4, 2, 64, 1100 - 149});
  CheckAttention({lens, 4, 2, 128, 1100 - 149});
  CheckAttention({lens, 4, 2, 32, 1100 - 149});
}

// ---- The wgmma forward (sm_90, head_dim 128) ----
//
// Against the double reference with the tolerances above (its roundings are
// the mma.sync kernel's: bf16 P before P.V, bf16 O; fp32 scores and sums),
// and against the mma.sync kernel on the same inputs: the two differ only in
// where those roundings fall (128-key tiles instead of 64 move the running
// max at which P is rounded), so O is held to the same 1e-2 norm-wise and
// lse to 1e-4. In strided rows (NaN in every column outside q, k, v) O and
// lse must equal the packed run's bit for bit. Every output starts as NaN:
// a row left unwritten fails the reference check.

struct ForwardRun {
  std::vector<__nv_bfloat16> o;
  std::vector<float> lse;
};

// Place's layouts (fused), or packed q, then k, then v (nullopt).
Placement PlaceOrPack(std::optional<bool> fused, int T, int64_t qw, int64_t kw) {
  if (fused.has_value()) return Place(*fused, T, qw, kw);
  Placement at;
  at.q_rs = qw;
  at.kv_rs = kw;
  at.k = size_t(T) * qw;
  at.v = at.k + size_t(T) * kw;
  at.total = at.v + size_t(T) * kw;
  return at;
}

// One forward with `impl` on packed q, k, v ([T, heads * D] rows), or with
// them in strided rows of a NaN-filled buffer (fused: Place's layouts).
ForwardRun RunForward(AttentionForwardImpl impl, AttentionShape shape, std::optional<bool> fused,
                      const std::vector<__nv_bfloat16>& q, const std::vector<__nv_bfloat16>& k,
                      const std::vector<__nv_bfloat16>& v) {
  const int T = shape.total_tokens;
  const int64_t qw = int64_t(shape.num_heads) * shape.head_dim;
  const int64_t kw = int64_t(shape.num_kv_heads) * shape.head_dim;
  const Placement at = PlaceOrPack(fused, T, qw, kw);
  std::vector<__nv_bfloat16> in(at.total, NanBf16());
  std::vector<__nv_bfloat16> qc = q, kc = k, vc = v;
  Move(qc, in, at.q, at.q_rs, qw, T, true);
  Move(kc, in, at.k, at.kv_rs, kw, T, true);
  Move(vc, in, at.v, at.kv_rs, kw, T, true);
  DeviceBuffer<__nv_bfloat16> d_in(in.size()), d_o(size_t(T) * qw);
  DeviceBuffer<float> d_lse(size_t(shape.num_heads) * T);
  EXPECT_EQ(d_in.Upload(in), cudaSuccess);
  EXPECT_EQ(cudaMemset(d_o.get(), 0xFF, d_o.count() * 2), cudaSuccess);
  EXPECT_EQ(cudaMemset(d_lse.get(), 0xFF, d_lse.count() * 4), cudaSuccess);
  if (fused.has_value()) {
    shape.q_row_stride = at.q_rs;
    shape.kv_row_stride = at.kv_rs;
  }
  const __nv_bfloat16* base = d_in.get();
  const Status st = AttentionForwardWith(impl, shape, base + at.q, base + at.k, base + at.v,
                                         d_o.get(), d_lse.get(), nullptr);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ForwardRun run;
  EXPECT_EQ(d_o.Download(&run.o), cudaSuccess);
  EXPECT_EQ(d_lse.Download(&run.lse), cudaSuccess);
  return run;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<double>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::isfinite(a[i]) ? std::fabs(a[i] - b[i]) : INFINITY);
  return worst;
}

void CheckWgmmaForward(const Case& c) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " " + Describe(c));
  std::mt19937_64 rng(seed);
  const int H = c.heads, Hk = c.kv_heads, D = c.head_dim;
  std::vector<int> cu{0};
  for (int l : c.lens) cu.push_back(cu.back() + l);
  const int T = cu.back();
  std::vector<__nv_bfloat16> q_bf, k_bf, v_bf;
  std::vector<double> q, k, v;
  testing::RandomBf16(rng, size_t(T) * H * D, &q_bf, &q);
  testing::RandomBf16(rng, size_t(T) * Hk * D, &k_bf, &k);
  testing::RandomBf16(rng, size_t(T) * Hk * D, &v_bf, &v);
  for (size_t i = 0; i < q.size(); ++i) {  // peaked softmax rows, as in CheckAttention
    q_bf[i] = __float2bfloat16(6.f * __bfloat162float(q_bf[i]));
    q[i] = __bfloat162float(q_bf[i]);
  }
  DeviceBuffer<int32_t> d_cu(cu.size());
  GROVE_CUDA_OK(d_cu.Upload(std::vector<int32_t>(cu.begin(), cu.end())));
  AttentionShape shape;
  shape.cu_seqlens = d_cu.get();
  shape.batch = int(c.lens.size());
  shape.max_seqlen = *std::max_element(c.lens.begin(), c.lens.end()) + c.max_seqlen_slack;
  shape.total_tokens = T;
  shape.num_heads = H;
  shape.num_kv_heads = Hk;
  shape.head_dim = D;

  const Reference ref = RunReference(c, cu, q, k, v, {}, 1.0 / std::sqrt(double(D)), false);
  const ForwardRun wg = RunForward(AttentionForwardImpl::kWgmma, shape, std::nullopt, q_bf, k_bf, v_bf);
  const ForwardRun mma = RunForward(AttentionForwardImpl::kMmaSync, shape, std::nullopt, q_bf, k_bf, v_bf);
  const std::vector<double> o = ToDouble(wg.o);
  double worst_row = 0;
  for (size_t row = 0; row < size_t(T) * H; ++row) {
    std::vector<double> got(o.begin() + row * D, o.begin() + (row + 1) * D);
    std::vector<double> want(ref.o.begin() + row * D, ref.o.begin() + (row + 1) * D);
    worst_row = std::max(worst_row, testing::RelativeError(got, want));
  }
  const double err_o = testing::RelativeError(o, ref.o);
  const double err_lse = MaxAbsDiff(wg.lse, ref.lse);
  const double vs_mma_o = testing::RelativeError(o, ToDouble(mma.o));
  const double vs_mma_lse = MaxAbsDiff(wg.lse, std::vector<double>(mma.lse.begin(), mma.lse.end()));
  std::printf("wgmma fwd %s: rel err O %.2e (worst row %.2e), |lse| %.1e; vs mma.sync O %.2e, |lse| %.1e\n",
              Describe(c).c_str(), err_o, worst_row, err_lse, vs_mma_o, vs_mma_lse);
  EXPECT_LE(err_o, 1e-2);
  EXPECT_LE(worst_row, 3e-2);
  EXPECT_LE(err_lse, 1e-4);
  EXPECT_LE(vs_mma_o, 1e-2);
  EXPECT_LE(vs_mma_lse, 1e-4);
  for (bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused [q | k | v] rows" : "q rows and [k | v] rows of different strides");
    const ForwardRun strided = RunForward(AttentionForwardImpl::kWgmma, shape, fused, q_bf, k_bf, v_bf);
    EXPECT_EQ(BitDiffs(strided.o, wg.o), 0u);
    EXPECT_EQ(BitDiffs(strided.lse, wg.lse), 0u);
  }
}

#define GROVE_SKIP_WITHOUT_WGMMA_ATTENTION()                                              \
  do {                                                                                    \
    GROVE_SKIP_WITHOUT_GPU();                                                             \
    if (!AttentionForwardWgmmaSupported(128)) GTEST_SKIP() << "no sm_90 GPU for wgmma"; \
  } while (0)

// Ragged lengths: 1, off the 128-row tile on both sides, exact multiples.
TEST(AttentionWgmmaForwardTest, RaggedBatchGqa4) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION();
  CheckWgmmaForward({{1, 17, 64, 65, 127, 128, 129, 200, 255, 256, 257, 384}, 8, 2, 128});
}

TEST(AttentionWgmmaForwardTest, QueryGroupsOf1And8) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION();
  CheckWgmmaForward({{1, 300, 129}, 4, 4, 128});
  CheckWgmmaForward({{383, 5, 700}, 8, 1, 128});
}

// Many short sequences under a loose max_seqlen: most CTAs find their
// query tile past their sequence's end, and many tiles' TMA boxes run into
// the next sequence's rows.
TEST(AttentionWgmmaForwardTest, ManyShortSequencesLooseBound) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION();
  std::vector<int> lens;
  for (int i = 0; i < 41; ++i) lens.push_back(1 + (i * 37) % 150);
  CheckWgmmaForward({lens, 4, 2, 128, 1100 - 149});
}

// The gpu-ref training shape's heads (8 / 2 x 128) at its sequence length,
// two sequences (the reference is a CPU loop).
TEST(AttentionWgmmaForwardTest, TrainingShapeHeads) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION();
  CheckWgmmaForward({{1024, 1024}, 8, 2, 128});
}

// A sequence's last query tile reads key/value rows past its end (the next
// sequence's, in the same tensor). Their probabilities are 0, but 0 * NaN is
// NaN: non-finite values in one sequence must not reach another's outputs.
// Both forwards, lengths off the tile so the shared tile is partial.
TEST(AttentionForwardTest, NonFiniteNextSequenceDoesNotLeak) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int H = 8, Hk = 2, D = 128;
  const std::vector<int32_t> cu = {0, 100, 160, 290};
  const int T = cu.back();
  std::vector<__nv_bfloat16> q, k, v;
  std::vector<double> unused;
  testing::RandomBf16(rng, size_t(T) * H * D, &q, &unused);
  testing::RandomBf16(rng, size_t(T) * Hk * D, &k, &unused);
  testing::RandomBf16(rng, size_t(T) * Hk * D, &v, &unused);
  // Sequence 1 (rows 100..159) poisoned: NaN and inf in its keys and values.
  std::vector<__nv_bfloat16> k_bad = k, v_bad = v;
  for (size_t i = size_t(cu[1]) * Hk * D; i < size_t(cu[2]) * Hk * D; ++i) {
    k_bad[i] = i % 2 ? NanBf16() : __float2bfloat16(INFINITY);
    v_bad[i] = i % 3 ? NanBf16() : __float2bfloat16(-INFINITY);
  }
  DeviceBuffer<int32_t> d_cu(cu.size());
  GROVE_CUDA_OK(d_cu.Upload(cu));
  AttentionShape shape;
  shape.cu_seqlens = d_cu.get();
  shape.batch = 3;
  shape.max_seqlen = 130;
  shape.total_tokens = T;
  shape.num_heads = H;
  shape.num_kv_heads = Hk;
  shape.head_dim = D;
  std::vector<AttentionForwardImpl> impls = {AttentionForwardImpl::kMmaSync};
  if (AttentionForwardWgmmaSupported(D)) impls.push_back(AttentionForwardImpl::kWgmma);
  for (AttentionForwardImpl impl : impls) {
    SCOPED_TRACE(impl == AttentionForwardImpl::kWgmma ? "wgmma" : "mma.sync");
    const ForwardRun clean = RunForward(impl, shape, std::nullopt, q, k, v);
    const ForwardRun poisoned = RunForward(impl, shape, std::nullopt, q, k_bad, v_bad);
    // Sequences 0 and 2: the same bits as with finite neighbours.
    for (int seq : {0, 2}) {
      const size_t lo = size_t(cu[seq]) * H * D, hi = size_t(cu[seq + 1]) * H * D;
      size_t diffs = 0, non_finite = 0;
      for (size_t i = lo; i < hi; ++i) {
        diffs += std::memcmp(&clean.o[i], &poisoned.o[i], sizeof(__nv_bfloat16)) != 0;
        non_finite += !std::isfinite(__bfloat162float(poisoned.o[i]));
      }
      EXPECT_EQ(diffs, 0u) << "sequence " << seq;
      EXPECT_EQ(non_finite, 0u) << "sequence " << seq;
      for (int h = 0; h < H; ++h)
        for (int t = cu[seq]; t < cu[seq + 1]; ++t)
          ASSERT_EQ(clean.lse[size_t(h) * T + t], poisoned.lse[size_t(h) * T + t]) << "sequence " << seq;
    }
  }
}

// ---- The wgmma backward (sm_90, head_dim 128) ----
//
// Its main kernel against the double reference with the backward
// tolerances above (same roundings as the mma.sync kernel: bf16 P^T before
// P^T dO, bf16 dS before dS K and dS^T Q, fp32 everywhere else; P is
// recomputed from lse, so no tile size moves a rounding) and against the
// mma.sync backward on the same forward's O and lse: there only the fp32
// summation order differs, so dQ, dK, dV are held to 1e-2 norm-wise. In
// strided rows (NaN in every column outside q, k, v, and in every gradient
// column outside dq, dk, dv, which must stay NaN) dK and dV must equal the
// packed run's bit for bit; dQ (fp32 atomics in a run-dependent order) is
// held to the reference.

struct BackwardRun {
  std::vector<__nv_bfloat16> dq, dk, dv;
};

// One backward with `impl` (q, k, v and the gradients packed, or in strided
// rows: PlaceOrPack), o, dout and lse packed as always. Checks that nothing
// outside dq, dk, dv was written.
BackwardRun RunBackward(AttentionBackwardImpl impl, AttentionShape shape, std::optional<bool> fused,
                        const std::vector<__nv_bfloat16>& q, const std::vector<__nv_bfloat16>& k,
                        const std::vector<__nv_bfloat16>& v, const std::vector<__nv_bfloat16>& o,
                        const std::vector<__nv_bfloat16>& dout, const std::vector<float>& lse) {
  const int T = shape.total_tokens;
  const int64_t qw = int64_t(shape.num_heads) * shape.head_dim;
  const int64_t kw = int64_t(shape.num_kv_heads) * shape.head_dim;
  const Placement at = PlaceOrPack(fused, T, qw, kw);
  std::vector<__nv_bfloat16> in(at.total, NanBf16());
  std::vector<__nv_bfloat16> qc = q, kc = k, vc = v;
  Move(qc, in, at.q, at.q_rs, qw, T, true);
  Move(kc, in, at.k, at.kv_rs, kw, T, true);
  Move(vc, in, at.v, at.kv_rs, kw, T, true);
  DeviceBuffer<__nv_bfloat16> d_in(in.size()), d_grad(in.size()), d_o(o.size()), d_do(dout.size());
  DeviceBuffer<float> d_lse(lse.size());
  DeviceBuffer<char> ws(AttentionBackwardWorkspaceBytes(shape));
  EXPECT_EQ(d_in.Upload(in), cudaSuccess);
  EXPECT_EQ(d_o.Upload(o), cudaSuccess);
  EXPECT_EQ(d_do.Upload(dout), cudaSuccess);
  EXPECT_EQ(d_lse.Upload(lse), cudaSuccess);
  EXPECT_EQ(cudaMemset(d_grad.get(), 0xFF, d_grad.count() * 2), cudaSuccess);
  EXPECT_EQ(cudaMemset(ws.get(), 0xFF, ws.count()), cudaSuccess);
  shape.q_row_stride = at.q_rs;
  shape.kv_row_stride = at.kv_rs;
  const __nv_bfloat16* base = d_in.get();
  __nv_bfloat16* grad = d_grad.get();
  const Status st = AttentionBackwardWith(impl, shape, base + at.q, base + at.k, base + at.v,
                                          d_o.get(), d_do.get(), d_lse.get(), grad + at.q,
                                          grad + at.k, grad + at.v, ws.get(), nullptr);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<__nv_bfloat16> grads;
  EXPECT_EQ(d_grad.Download(&grads), cudaSuccess);
  BackwardRun run;
  Move(run.dq, grads, at.q, at.q_rs, qw, T, false);
  Move(run.dk, grads, at.k, at.kv_rs, kw, T, false);
  Move(run.dv, grads, at.v, at.kv_rs, kw, T, false);
  EXPECT_EQ(BitDiffs(grads, std::vector<__nv_bfloat16>(grads.size(), NanBf16())), 0u)
      << "elements outside dq, dk, dv written";
  return run;
}

void CheckWgmmaBackward(const Case& c) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " " + Describe(c));
  std::mt19937_64 rng(seed);
  const int H = c.heads, Hk = c.kv_heads, D = c.head_dim;
  std::vector<int> cu{0};
  for (int l : c.lens) cu.push_back(cu.back() + l);
  const int T = cu.back();
  std::vector<__nv_bfloat16> q_bf, k_bf, v_bf, do_bf;
  std::vector<double> q, k, v, dout;
  testing::RandomBf16(rng, size_t(T) * H * D, &q_bf, &q);
  testing::RandomBf16(rng, size_t(T) * Hk * D, &k_bf, &k);
  testing::RandomBf16(rng, size_t(T) * Hk * D, &v_bf, &v);
  testing::RandomBf16(rng, size_t(T) * H * D, &do_bf, &dout);
  for (size_t i = 0; i < q.size(); ++i) {  // peaked softmax rows, as in CheckAttention
    q_bf[i] = __float2bfloat16(6.f * __bfloat162float(q_bf[i]));
    q[i] = __bfloat162float(q_bf[i]);
  }
  DeviceBuffer<int32_t> d_cu(cu.size());
  GROVE_CUDA_OK(d_cu.Upload(std::vector<int32_t>(cu.begin(), cu.end())));
  AttentionShape shape;
  shape.cu_seqlens = d_cu.get();
  shape.batch = int(c.lens.size());
  shape.max_seqlen = *std::max_element(c.lens.begin(), c.lens.end()) + c.max_seqlen_slack;
  shape.total_tokens = T;
  shape.num_heads = H;
  shape.num_kv_heads = Hk;
  shape.head_dim = D;

  const ForwardRun fwd =
      RunForward(AttentionForwardImpl::kMmaSync, shape, std::nullopt, q_bf, k_bf, v_bf);
  const Reference ref = RunReference(c, cu, q, k, v, dout, 1.0 / std::sqrt(double(D)));
  const BackwardRun wg = RunBackward(AttentionBackwardImpl::kWgmma, shape, std::nullopt, q_bf, k_bf,
                                     v_bf, fwd.o, do_bf, fwd.lse);
  const BackwardRun mma = RunBackward(AttentionBackwardImpl::kMmaSync, shape, std::nullopt, q_bf,
                                      k_bf, v_bf, fwd.o, do_bf, fwd.lse);
  const double err_dq = testing::RelativeError(ToDouble(wg.dq), ref.dq);
  const double err_dk = testing::RelativeError(ToDouble(wg.dk), ref.dk);
  const double err_dv = testing::RelativeError(ToDouble(wg.dv), ref.dv);
  const double vs_dq = testing::RelativeError(ToDouble(wg.dq), ToDouble(mma.dq));
  const double vs_dk = testing::RelativeError(ToDouble(wg.dk), ToDouble(mma.dk));
  const double vs_dv = testing::RelativeError(ToDouble(wg.dv), ToDouble(mma.dv));
  std::printf("wgmma bwd %s: rel err dQ %.2e dK %.2e dV %.2e; vs mma.sync dQ %.2e dK %.2e dV %.2e\n",
              Describe(c).c_str(), err_dq, err_dk, err_dv, vs_dq, vs_dk, vs_dv);
  EXPECT_LE(err_dq, c.dqk_tolerance);
  EXPECT_LE(err_dk, c.dqk_tolerance);
  EXPECT_LE(err_dv, 2e-2);
  EXPECT_LE(vs_dq, 1e-2);
  EXPECT_LE(vs_dk, 1e-2);
  EXPECT_LE(vs_dv, 1e-2);
  for (bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused [q | k | v] rows" : "q rows and [k | v] rows of different strides");
    const BackwardRun strided = RunBackward(AttentionBackwardImpl::kWgmma, shape, fused, q_bf, k_bf,
                                            v_bf, fwd.o, do_bf, fwd.lse);
    EXPECT_EQ(BitDiffs(strided.dk, wg.dk), 0u);
    EXPECT_EQ(BitDiffs(strided.dv, wg.dv), 0u);
    EXPECT_LE(testing::RelativeError(ToDouble(strided.dq), ref.dq), c.dqk_tolerance);
  }
}

#define GROVE_SKIP_WITHOUT_WGMMA_ATTENTION_BWD()                                          \
  do {                                                                                    \
    GROVE_SKIP_WITHOUT_GPU();                                                             \
    if (!AttentionForwardWgmmaSupported(128)) GTEST_SKIP() << "no sm_90 GPU for wgmma"; \
  } while (0)

// Ragged lengths: 1, off the 64-query and 128-key tiles on both sides,
// exact multiples.
TEST(AttentionWgmmaBackwardTest, RaggedBatchGqa4) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION_BWD();
  CheckWgmmaBackward({{1, 17, 63, 64, 65, 127, 128, 129, 200, 255, 256, 257, 384}, 8, 2, 128});
}

TEST(AttentionWgmmaBackwardTest, QueryGroupsOf1And8) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION_BWD();
  CheckWgmmaBackward({{1, 300, 129}, 4, 4, 128});
  CheckWgmmaBackward({{383, 5, 700}, 8, 1, 128});
}

// Many short sequences under a loose max_seqlen: most CTAs find their key
// tile past their sequence's end, and most tiles' TMA boxes run into the
// next sequence's rows.
TEST(AttentionWgmmaBackwardTest, ManyShortSequencesLooseBound) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION_BWD();
  std::vector<int> lens;
  for (int i = 0; i < 41; ++i) lens.push_back(1 + (i * 37) % 150);
  CheckWgmmaBackward({lens, 4, 2, 128, 1100 - 149});
}

// The gpu-ref training shape's heads (8 / 2 x 128) at its sequence length.
TEST(AttentionWgmmaBackwardTest, TrainingShapeHeads) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION_BWD();
  CheckWgmmaBackward({{1024, 300}, 8, 2, 128});
}

// Random bf16 q, k, v and dO rows of packed sequences `cu` (H query heads,
// Hk KV heads of head_dim D), the offsets on the device and the shape over
// them: the backward tests' common inputs.
struct PackedBackwardInputs {
  PackedBackwardInputs(std::mt19937_64& rng, const std::vector<int32_t>& offsets, int H, int Hk, int D,
                       int max_seqlen)
      : cu(offsets.size()) {
    const int T = offsets.back();
    std::vector<double> unused;
    testing::RandomBf16(rng, size_t(T) * H * D, &q, &unused);
    testing::RandomBf16(rng, size_t(T) * Hk * D, &k, &unused);
    testing::RandomBf16(rng, size_t(T) * Hk * D, &v, &unused);
    testing::RandomBf16(rng, size_t(T) * H * D, &dout, &unused);
    EXPECT_EQ(cu.Upload(offsets), cudaSuccess);
    shape.cu_seqlens = cu.get();
    shape.batch = int(offsets.size()) - 1;
    shape.max_seqlen = max_seqlen;
    shape.total_tokens = T;
    shape.num_heads = H;
    shape.num_kv_heads = Hk;
    shape.head_dim = D;
  }
  std::vector<__nv_bfloat16> q, k, v, dout;
  DeviceBuffer<int32_t> cu;
  AttentionShape shape;
};

// dQ reaches the fp32 workspace by TMA reductions (default) or by float2
// atomics (GROVE_ATTENTION_BWD_DQ=atomic): the same dK, dV bits (that path
// does not change), dQ equal up to the order of the additions (bf16 dQ: a
// rounding flip in some elements, far below 1e-3 relative). Ragged lengths
// put every sequence's last query tile past its end.
TEST(AttentionWgmmaBackwardTest, DqByAtomicsMatchesDqByTma) {
  GROVE_SKIP_WITHOUT_WGMMA_ATTENTION_BWD();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const PackedBackwardInputs in(rng, {0, 1, 66, 195, 495, 1519}, /*H=*/8, /*Hk=*/2, /*D=*/128, /*max_seqlen=*/1024);
  const AttentionShape& shape = in.shape;
  const std::vector<__nv_bfloat16>&q = in.q, &k = in.k, &v = in.v, &dout = in.dout;
  const ForwardRun fwd = RunForward(AttentionForwardImpl::kMmaSync, shape, std::nullopt, q, k, v);
  const char* previous = std::getenv("GROVE_ATTENTION_BWD_DQ");
  const std::string saved = previous ? previous : "";
  auto run_with = [&](const char* dq_path) {
    setenv("GROVE_ATTENTION_BWD_DQ", dq_path, 1);
    return RunBackward(AttentionBackwardImpl::kWgmma, shape, std::nullopt, q, k, v, fwd.o, dout,
                       fwd.lse);
  };
  const BackwardRun by_tma = run_with("tma");
  const BackwardRun by_atomics = run_with("atomic");
  if (previous) setenv("GROVE_ATTENTION_BWD_DQ", saved.c_str(), 1);
  else unsetenv("GROVE_ATTENTION_BWD_DQ");
  EXPECT_EQ(BitDiffs(by_tma.dk, by_atomics.dk), 0u);
  EXPECT_EQ(BitDiffs(by_tma.dv, by_atomics.dv), 0u);
  const double vs_dq = testing::RelativeError(ToDouble(by_tma.dq), ToDouble(by_atomics.dq));
  std::printf("wgmma bwd dQ by TMA vs by atomics: rel diff %.2e\n", vs_dq);
  EXPECT_LE(vs_dq, 1e-3);
}

// AttentionShape::rope_table: dq and dk come out as RopeBackward would
// leave the plain backward's, bit for bit, dv untouched; both backwards
// (wgmma where it runs: its dK stores rotate; mma.sync: a pass after), the
// gradients in the fused qkv layout the learner uses.
TEST(AttentionBackwardTest, RopeInTheStoresGivesRopeBackwardsBits) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const std::vector<int32_t> offsets = {0, 1, 66, 195, 495};
  const PackedBackwardInputs in(rng, offsets, /*H=*/8, /*Hk=*/2, /*D=*/128, /*max_seqlen=*/300);
  const int T = offsets.back(), H = 8, Hk = 2, D = 128;
  std::vector<int32_t> pos(T);
  for (size_t b = 0; b + 1 < offsets.size(); ++b)
    for (int t = offsets[b]; t < offsets[b + 1]; ++t) pos[t] = t - offsets[b];
  DeviceBuffer<int32_t> d_pos(T);
  DeviceBuffer<float2> d_table(size_t(300) * D / 2);
  GROVE_CUDA_OK(d_pos.Upload(pos));
  ASSERT_TRUE(RopeCosSinTable(d_table.get(), 300, D, 10000.0, nullptr).ok());
  const ForwardRun fwd = RunForward(AttentionForwardImpl::kMmaSync, in.shape, std::nullopt, in.q, in.k, in.v);
  // RopeBackward on the device over one gradient ([T, heads, D] packed).
  auto rotate_back = [&](std::vector<__nv_bfloat16> g, int heads) {
    DeviceBuffer<__nv_bfloat16> d(g.size());
    EXPECT_EQ(d.Upload(g), cudaSuccess);
    EXPECT_TRUE(RopeBackward(d.get(), d_pos.get(), T, heads, D, 10000.0, nullptr).ok());
    EXPECT_EQ(d.Download(&g), cudaSuccess);
    return g;
  };
  for (AttentionBackwardImpl impl : {AttentionBackwardImpl::kMmaSync, AttentionBackwardImpl::kWgmma}) {
    if (impl == AttentionBackwardImpl::kWgmma && !AttentionForwardWgmmaSupported(D)) continue;
    SCOPED_TRACE(impl == AttentionBackwardImpl::kWgmma ? "wgmma" : "mma.sync");
    const BackwardRun plain = RunBackward(impl, in.shape, true, in.q, in.k, in.v, fwd.o, in.dout, fwd.lse);
    AttentionShape with_rope = in.shape;
    with_rope.rope_table = d_table.get();
    with_rope.rope_positions = d_pos.get();
    const BackwardRun fused = RunBackward(impl, with_rope, true, in.q, in.k, in.v, fwd.o, in.dout, fwd.lse);
    // dQ's fp32 sums run in a run-dependent order (TMA / atomics), so the
    // plain run's bf16 dq may differ from the fused run's input to the
    // rotation in a last bit: compare dq within that, dk and dv bit for bit.
    EXPECT_EQ(BitDiffs(fused.dk, rotate_back(plain.dk, Hk)), 0u);
    EXPECT_EQ(BitDiffs(fused.dv, plain.dv), 0u);
    const double dq_diff = testing::RelativeError(ToDouble(fused.dq), ToDouble(rotate_back(plain.dq, H)));
    EXPECT_LE(dq_diff, 1e-3);
    EXPECT_GT(testing::RelativeError(ToDouble(fused.dq), ToDouble(plain.dq)), 0.1) << "dq was not rotated";
  }
  AttentionShape half = in.shape;
  half.rope_table = d_table.get();  // without positions
  EXPECT_EQ(AttentionBackwardWith(AttentionBackwardImpl::kMmaSync, half, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  nullptr, nullptr, nullptr, nullptr, nullptr, nullptr)
                .code(),
            StatusCode::kInvalidArgument);
}

// The backward's last query and key tiles of a sequence read q, k, v, dO
// rows past its end (the next sequence's). Non-finite values there (and in
// that sequence's O, lse) must not reach another sequence's gradients: dK,
// dV of sequences 0 and 2 bit-equal to a run with finite neighbours, dQ
// finite and equal up to the atomics' order. Both backwards.
TEST(AttentionBackwardTest, NonFiniteNextSequenceDoesNotLeak) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int H = 8, Hk = 2, D = 128;
  const std::vector<int32_t> cu = {0, 100, 160, 290};
  const int T = cu.back();
  const PackedBackwardInputs in(rng, cu, H, Hk, D, /*max_seqlen=*/130);
  const AttentionShape& shape = in.shape;
  const std::vector<__nv_bfloat16>&q = in.q, &k = in.k, &v = in.v, &dout = in.dout;
  const ForwardRun fwd = RunForward(AttentionForwardImpl::kMmaSync, shape, std::nullopt, q, k, v);
  // Sequence 1 (rows 100..159) poisoned: NaN and inf in every input row.
  std::vector<__nv_bfloat16> q_bad = q, k_bad = k, v_bad = v, do_bad = dout, o_bad = fwd.o;
  std::vector<float> lse_bad = fwd.lse;
  auto poison = [&](std::vector<__nv_bfloat16>& x, int width) {
    for (size_t i = size_t(cu[1]) * width; i < size_t(cu[2]) * width; ++i)
      x[i] = i % 2 ? NanBf16() : __float2bfloat16(i % 3 ? INFINITY : -INFINITY);
  };
  poison(q_bad, H * D);
  poison(k_bad, Hk * D);
  poison(v_bad, Hk * D);
  poison(do_bad, H * D);
  poison(o_bad, H * D);
  for (int h = 0; h < H; ++h)
    for (int t = cu[1]; t < cu[2]; ++t) lse_bad[size_t(h) * T + t] = t % 2 ? NAN : INFINITY;
  std::vector<AttentionBackwardImpl> impls = {AttentionBackwardImpl::kMmaSync};
  if (AttentionForwardWgmmaSupported(D)) impls.push_back(AttentionBackwardImpl::kWgmma);
  for (AttentionBackwardImpl impl : impls) {
    SCOPED_TRACE(impl == AttentionBackwardImpl::kWgmma ? "wgmma" : "mma.sync");
    const BackwardRun clean = RunBackward(impl, shape, std::nullopt, q, k, v, fwd.o, dout, fwd.lse);
    const BackwardRun poisoned =
        RunBackward(impl, shape, std::nullopt, q_bad, k_bad, v_bad, o_bad, do_bad, lse_bad);
    for (int seq : {0, 2}) {
      SCOPED_TRACE("sequence " + std::to_string(seq));
      auto rows = [&](const std::vector<__nv_bfloat16>& x, int width) {
        return std::vector<__nv_bfloat16>(x.begin() + size_t(cu[seq]) * width,
                                          x.begin() + size_t(cu[seq + 1]) * width);
      };
      EXPECT_EQ(BitDiffs(rows(poisoned.dk, Hk * D), rows(clean.dk, Hk * D)), 0u);
      EXPECT_EQ(BitDiffs(rows(poisoned.dv, Hk * D), rows(clean.dv, Hk * D)), 0u);
      const std::vector<double> dq_bad = ToDouble(rows(poisoned.dq, H * D));
      size_t non_finite = 0;
      for (double x : dq_bad) non_finite += !std::isfinite(x);
      EXPECT_EQ(non_finite, 0u);
      EXPECT_LE(testing::RelativeError(dq_bad, ToDouble(rows(clean.dq, H * D))), 1e-3);
    }
  }
}

TEST(AttentionWgmmaBackwardTest, RefusedWhereItCannotRun) {
  GROVE_SKIP_WITHOUT_GPU();
  alignas(16) static __nv_bfloat16 buf[64];
  alignas(16) static float lse[64];
  alignas(16) static int32_t cu[2] = {0, 4};
  AttentionShape s;
  s.cu_seqlens = cu;
  s.batch = 1;
  s.max_seqlen = 4;
  s.total_tokens = 4;
  s.num_heads = 2;
  s.num_kv_heads = 1;
  s.head_dim = 64;
  EXPECT_EQ(AttentionBackwardWith(AttentionBackwardImpl::kWgmma, s, buf, buf, buf, buf, buf, lse,
                                  buf, buf, buf, buf, nullptr)
                .code(),
            StatusCode::kFailedPrecondition);
}

TEST(AttentionWgmmaForwardTest, RefusedWhereItCannotRun) {
  GROVE_SKIP_WITHOUT_GPU();
  alignas(16) static __nv_bfloat16 buf[64];
  alignas(16) static float lse[64];
  alignas(16) static int32_t cu[2] = {0, 4};
  AttentionShape s;
  s.cu_seqlens = cu;
  s.batch = 1;
  s.max_seqlen = 4;
  s.total_tokens = 4;
  s.num_heads = 2;
  s.num_kv_heads = 1;
  s.head_dim = 64;
  EXPECT_EQ(AttentionForwardWith(AttentionForwardImpl::kWgmma, s, buf, buf, buf, buf, lse, nullptr)
                .code(),
            StatusCode::kFailedPrecondition);
}

TEST(AttentionTest, RejectsBadShapes) {
  alignas(16) static __nv_bfloat16 buf[64];
  alignas(16) static float lse[64];
  alignas(16) static int32_t cu[2] = {0, 4};
  AttentionShape s;
  s.cu_seqlens = cu;
  s.batch = 1;
  s.max_seqlen = 4;
  s.total_tokens = 4;
  s.num_heads = 8;
  s.num_kv_heads = 2;
  s.head_dim = 96;
  EXPECT_EQ(AttentionForward(s, buf, buf, buf, buf, lse, nullptr).code(),
            StatusCode::kInvalidArgument);
  s.head_dim = 16;
  EXPECT_EQ(AttentionForward(s, buf, buf, buf, buf, lse, nullptr).code(),
            StatusCode::kInvalidArgument);
  s.head_dim = 64;
  s.num_kv_heads = 3;
  EXPECT_EQ(AttentionForward(s, buf, buf, buf, buf, lse, nullptr).code(),
            StatusCode::kInvalidArgument);
  s.num_kv_heads = 2;
  s.max_seqlen = 0;
  EXPECT_EQ(AttentionForward(s, buf, buf, buf, buf, lse, nullptr).code(),
            StatusCode::kInvalidArgument);
  s.max_seqlen = 4;
  s.softmax_scale = -1.f;
  EXPECT_EQ(AttentionForward(s, buf, buf, buf, buf, lse, nullptr).code(),
            StatusCode::kInvalidArgument);
  s.softmax_scale = 0.f;
  EXPECT_EQ(AttentionForward(s, nullptr, buf, buf, buf, lse, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(AttentionForward(s, buf + 1, buf, buf, buf, lse, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(AttentionBackward(s, buf, buf, buf, buf, buf, lse, buf, buf, buf, nullptr, nullptr)
                .code(),
            StatusCode::kInvalidArgument);
  // Row strides: below the heads' width, not a multiple of 8, or negative
  // (q: 8 heads x 64 = 512 elements, k and v: 2 x 64 = 128).
  auto expect_refused = [&](const char* which, int64_t stride) {
    EXPECT_EQ(AttentionForward(s, buf, buf, buf, buf, lse, nullptr).code(), StatusCode::kInvalidArgument)
        << which << " " << stride;
    EXPECT_EQ(AttentionBackward(s, buf, buf, buf, buf, buf, lse, buf, buf, buf, buf, nullptr).code(),
              StatusCode::kInvalidArgument)
        << which << " " << stride;
  };
  for (int64_t bad_q : {int64_t{504}, int64_t{516}, int64_t{-8}}) {
    s.q_row_stride = bad_q;
    expect_refused("q", bad_q);
  }
  s.q_row_stride = 0;
  for (int64_t bad_kv : {int64_t{120}, int64_t{132}, int64_t{-128}}) {
    s.kv_row_stride = bad_kv;
    expect_refused("kv", bad_kv);
  }
  s.kv_row_stride = 0;
  s.batch = 0;  // nothing to do, after the shape checks: valid strides pass them
  EXPECT_TRUE(AttentionForward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr).ok());
  s.q_row_stride = 512 + 2 * 128;
  s.kv_row_stride = 512 + 2 * 128;
  EXPECT_TRUE(AttentionForward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr).ok());
  s.kv_row_stride = 8;
  EXPECT_EQ(AttentionForward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::kernels
