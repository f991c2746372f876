// GPU sampling: greedy tokens and log-probs exactly as model::Sampler and the
// CPU engine define them; sampled tokens' distribution against the expected
// probabilities (chi-square); draws independent of the batch around them.
#include "kernels/sampling.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

struct Drawn {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
};

Drawn Draw(const std::vector<float>& logits, int rows, int vocab, const SamplingParams& p,
          const std::vector<int64_t>& seq, const std::vector<int32_t>& step) {
  DeviceBuffer<float> d_logits(logits.size()), d_lp(rows);
  DeviceBuffer<int64_t> d_seq(rows);
  DeviceBuffer<int32_t> d_step(rows), d_tok(rows);
  EXPECT_EQ(d_logits.Upload(logits), cudaSuccess);
  EXPECT_EQ(d_seq.Upload(seq), cudaSuccess);
  EXPECT_EQ(d_step.Upload(step), cudaSuccess);
  const Status s = SampleTokens(d_logits.get(), rows, vocab, vocab, p, d_seq.get(), d_step.get(), d_tok.get(),
                                d_lp.get(), nullptr);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Drawn d;
  EXPECT_EQ(d_tok.Download(&d.tokens), cudaSuccess);
  EXPECT_EQ(d_lp.Download(&d.logprobs), cudaSuccess);
  return d;
}

TEST(Sampling, GreedyAndLogprobsMatchTheCpuDefinition) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int vocab : {1000, 32768}) {
    const int rows = 9;
    std::vector<float> z(size_t(rows) * vocab);
    std::normal_distribution<float> nd(0.f, 3.f);
    for (float& x : z) x = nd(rng);
    // Row 0: a tie for the max (lowest id wins); row 1: the max at the last id.
    const float top = 100.f;
    z[0 * vocab + 700] = top;
    z[0 * vocab + 5] = top;
    z[1 * vocab + vocab - 1] = top;
    std::vector<int64_t> seq(rows);
    std::iota(seq.begin(), seq.end(), 0);
    const std::vector<int32_t> step(rows, 0);
    SamplingParams greedy;
    greedy.temperature = 0.f;
    const Drawn d = Draw(z, rows, vocab, greedy, seq, step);
    for (int r = 0; r < rows; ++r) {
      const float* zr = &z[size_t(r) * vocab];
      const int want = int(std::max_element(zr, zr + vocab) - zr);  // first max: lowest id
      EXPECT_EQ(d.tokens[r], want) << "row " << r << " vocab " << vocab;
      double mx = *std::max_element(zr, zr + vocab), sum = 0;
      for (int v = 0; v < vocab; ++v) sum += std::exp(double(zr[v]) - mx);
      const double lp = double(zr[want]) - mx - std::log(sum);
      // fp32 log-sum-exp: each exp and partial sum rounds (2^-24 relative,
      // ~100 roundings deep) -> ~1e-5 in lse; 1e-4 leaves a wide margin.
      EXPECT_NEAR(d.logprobs[r], lp, 1e-4) << "row " << r;
    }
  }
}

// Expected probabilities of model::Sampler: softmax at T over the top_k,
// then the smallest most-likely prefix reaching top_p, renormalized.
std::vector<double> Expected(const std::vector<float>& z, double T, int top_k, double top_p) {
  const int V = int(z.size());
  std::vector<int> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] > z[b]; });
  int keep = top_k > 0 && top_k < V ? top_k : V;
  std::vector<double> p(keep);
  double sum = 0;
  for (int i = 0; i < keep; ++i) sum += p[i] = std::exp((z[order[i]] - z[order[0]]) / T);
  if (top_p < 1) {
    double mass = 0;
    int n = 0;
    while (n < keep) {
      mass += p[n++] / sum;
      if (mass >= top_p) break;
    }
    keep = n;
    sum = 0;
    for (int i = 0; i < keep; ++i) sum += p[i];
  }
  std::vector<double> out(V, 0.0);
  for (int i = 0; i < keep; ++i) out[order[i]] = p[i] / sum;
  return out;
}

// Upper tail of chi-square with df degrees of freedom at about 1e-6
// (Wilson-Hilferty with z = 4.75): a correct sampler fails this test about
// once in a million runs per case.
double ChiSquareLimit(int df) {
  const double z = 4.75, a = 2.0 / (9.0 * df);
  return df * std::pow(1 - a + z * std::sqrt(a), 3);
}

void CheckDistribution(double T, int top_k, double top_p, uint64_t seed) {
  SCOPED_TRACE("T " + std::to_string(T) + " top_k " + std::to_string(top_k) + " top_p " + std::to_string(top_p) +
               " seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int vocab = 40, rows = 4096, launches = 5;
  std::vector<float> row(vocab);
  std::normal_distribution<float> nd(0.f, 1.5f);
  for (float& x : row) x = nd(rng);
  const std::vector<double> want = Expected(row, T, top_k, top_p);
  std::vector<float> z;
  for (int r = 0; r < rows; ++r) z.insert(z.end(), row.begin(), row.end());
  SamplingParams p;
  p.temperature = float(T);
  p.top_k = top_k;
  p.top_p = float(top_p);
  p.seed = seed;
  std::vector<int64_t> seq(rows);
  std::iota(seq.begin(), seq.end(), 0);
  std::vector<double> count(vocab, 0.0);
  for (int l = 0; l < launches; ++l) {
    const Drawn d = Draw(z, rows, vocab, p, seq, std::vector<int32_t>(rows, l));
    for (int32_t t : d.tokens) {
      ASSERT_TRUE(t >= 0 && t < vocab);
      ASSERT_GT(want[t], 0.0) << "token " << t << " is outside the top-k/top-p set";
      count[t] += 1;
    }
  }
  const double n = double(rows) * launches;
  double chi2 = 0;
  int df = -1;
  for (int v = 0; v < vocab; ++v)
    if (want[v] > 0) {
      const double e = n * want[v];
      chi2 += (count[v] - e) * (count[v] - e) / e;
      ++df;
    }
  if (df < 1) return;  // a single kept token: the membership check above is the test
  EXPECT_LT(chi2, ChiSquareLimit(df)) << "df " << df;
}

TEST(Sampling, DistributionMatchesExpectedProbabilities) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  CheckDistribution(1.0, 0, 1.0, seed);
  CheckDistribution(0.7, 10, 1.0, seed + 1);
  CheckDistribution(1.3, 0, 0.8, seed + 2);
  CheckDistribution(0.9, 12, 0.7, seed + 3);
}

TEST(Sampling, DrawsDoNotDependOnTheBatch) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  std::mt19937_64 rng(seed);
  const int vocab = 512, rows = 33;
  std::vector<float> z(size_t(rows) * vocab);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (float& x : z) x = nd(rng);
  SamplingParams p;
  p.temperature = 1.f;
  p.top_p = 0.95f;
  p.seed = seed;
  std::vector<int64_t> seq(rows);
  std::vector<int32_t> step(rows);
  for (int r = 0; r < rows; ++r) { seq[r] = 1000 + r; step[r] = r % 7; }
  const Drawn all = Draw(z, rows, vocab, p, seq, step);
  for (int r : {0, 17, 32}) {
    const std::vector<float> one(z.begin() + size_t(r) * vocab, z.begin() + size_t(r + 1) * vocab);
    const Drawn d = Draw(one, 1, vocab, p, {seq[r]}, {step[r]});
    EXPECT_EQ(d.tokens[0], all.tokens[r]) << "row " << r;
    EXPECT_EQ(d.logprobs[0], all.logprobs[r]) << "row " << r;
  }
}

TEST(Sampling, RejectsBadParameters) {
  SamplingParams p;
  p.top_p = 0.f;
  EXPECT_FALSE(SampleTokens(nullptr, 1, 8, 8, p, nullptr, nullptr, nullptr, nullptr, nullptr).ok());
  p.top_p = 1.f;
  p.temperature = -1.f;
  EXPECT_FALSE(SampleTokens(nullptr, 1, 8, 8, p, nullptr, nullptr, nullptr, nullptr, nullptr).ok());
  p.temperature = 1.f;
  EXPECT_FALSE(SampleTokens(nullptr, 1, 8, 4, p, nullptr, nullptr, nullptr, nullptr, nullptr).ok());  // ld < vocab
}

}  // namespace
}  // namespace grove::kernels
