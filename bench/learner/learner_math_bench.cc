// Throughput of the learner's math on one core: the policy loss over a batch
// of tokens, an AdamW step and the global-norm clip over a flat buffer.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "learner/adamw.h"
#include "learner/grpo_loss.h"

namespace grove::learner {
namespace {

void BM_PolicyLoss(benchmark::State& state) {
  const int seqs = 64, len = static_cast<int>(state.range(0));
  const bool sequence_ratio = state.range(1) != 0;
  std::mt19937 rng(1);
  std::normal_distribution<float> gauss(0.f, 1.f);
  std::vector<int64_t> offsets{0};
  std::vector<float> logp, old, ref, roll, adv;
  std::vector<uint8_t> mask;
  for (int i = 0; i < seqs; ++i) {
    for (int t = 0; t < len; ++t) {
      const float o = -1.f - std::abs(gauss(rng));
      old.push_back(o);
      logp.push_back(o + 0.1f * gauss(rng));
      ref.push_back(o + 0.1f * gauss(rng));
      roll.push_back(o + 0.1f * gauss(rng));
      mask.push_back(1);
    }
    offsets.push_back(offsets.back() + len);
    adv.push_back(gauss(rng));
  }
  PolicyLossConfig c;
  c.beta = 0.04;
  c.tis_cap = 2.0;
  c.ratio_level = sequence_ratio ? RatioLevel::kSequence : RatioLevel::kToken;
  PolicyBatch b{offsets, logp, old, ref, roll, mask, adv};
  for (auto _ : state) {
    auto out = ComputePolicyLoss(b, c);
    benchmark::DoNotOptimize(out);
  }
  state.SetItemsProcessed(state.iterations() * seqs * len);
}
BENCHMARK(BM_PolicyLoss)->Args({512, 0})->Args({512, 1})->Unit(benchmark::kMicrosecond);

void BM_AdamWStep(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<float> p(n, 0.1f), g(n);
  std::mt19937 rng(2);
  std::normal_distribution<float> gauss(0.f, 1.f);
  for (float& x : g) x = gauss(rng);
  auto opt = AdamW::Create(n, {});
  for (auto _ : state) {
    benchmark::DoNotOptimize(opt->Step(p, g, 1e-4));
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(n));
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(n) * 5 * 4);  // p,g,m,v read; p,m,v written
}
BENCHMARK(BM_AdamWStep)->Arg(1 << 20)->Arg(16 << 20)->Unit(benchmark::kMillisecond);

void BM_ClipGradNorm(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<float> g(n, 0.01f);
  for (auto _ : state) benchmark::DoNotOptimize(ClipGradNorm(g, 1e9));
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(n));
}
BENCHMARK(BM_ClipGradNorm)->Arg(16 << 20)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace grove::learner

BENCHMARK_MAIN();
