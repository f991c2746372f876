// GpuGenerator against the CPU model (model::Transformer<float>::Generate)
// on the same weights: greedy tokens, log-probs and routes; continuous
// batching against one-by-one generation; int8/int4 weights against the CPU
// model on the round-tripped weights.
//
// Why tokens may legitimately differ: the GPU rounds every matmul input and
// the KV cache to bf16 (2^-9 relative per rounding, ~4 roundings per layer,
// 3 layers: the logits move by ~0.4% of their spread, ~0.01 here). So a
// sequence may diverge only at a step where the CPU's top-2 logit gap is
// below kGapBound (2.5x that), and the comparison of that sequence stops
// there. The test model is built so that most greedy steps have a clear
// winner (lm_head partly tied to a permutation of the embedding, so each
// token strongly suggests a next one while attention and the experts still
// move every logit); TestModelHasClearMargins checks that premise on the CPU
// (it runs without a GPU), so the GPU tests' "most sequences match fully" is
// not vacuous.
#include "rollout/gpu_generator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "model/transformer.h"
#include "rollout/precision_format.h"

namespace grove::rollout {
namespace {

constexpr double kGapBound = 0.05;     // logits: where a bf16-activation engine may pick the runner-up
constexpr double kLogprobTol = 0.05;   // |GPU - CPU| log-prob of the same token (2x the logit error estimate)
constexpr double kRouteMismatch = 0.03;  // fraction of route entries allowed to differ (near-tied router scores)
constexpr int kNewTokens = 32;

model::ModelConfig SmallConfig() {
  model::ModelConfig c;
  c.vocab_size = 512;
  c.hidden = 256;
  c.layers = 3;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 64;
  c.max_seq_len = 160;
  c.dense_layers = 1;
  c.dense_hidden = 512;
  c.experts = 8;
  c.top_k = 2;
  c.shared_experts = 1;
  c.expert_hidden = 128;
  c.score_func = model::ScoreFunc::kSigmoid;
  c.norm_topk = true;
  c.route_scale = 1.0;
  c.init_std = 0.02;
  return c;
}

// Random weights with a clear greedy winner most of the time (see the top),
// every parameter rounded to bf16 so the GPU's bf16/fp32 copies equal the
// CPU model's values.
std::unique_ptr<model::Model> MakeModel(uint64_t seed) {
  const model::ModelConfig c = SmallConfig();
  auto m = model::Model::Create(c, seed);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  model::Model& mm = **m;
  const int64_t V = c.vocab_size, H = c.hidden;
  float* p = mm.params().data();
  float* embed = p + mm.layout().Offset("embed");
  float* head = p + mm.layout().Offset("lm_head");
  std::vector<int64_t> perm(V);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(seed + 1));
  for (int64_t v = 0; v < V; ++v)
    for (int64_t j = 0; j < H; ++j) head[v * H + j] += 3.0f * embed[perm[v] * H + j];
  for (const auto& t : mm.layout().tensors())
    if (t.name.find("moe.experts") != std::string::npos)
      for (int64_t i = 0; i < t.numel; ++i) p[t.offset + i] *= 2.0f;
  for (float& x : mm.params()) x = RoundToBf16(x);
  return std::move(*m);
}

std::vector<std::vector<int32_t>> Prompts(uint64_t seed, int count, int min_len, int max_len) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> len(min_len, max_len), tok(0, int(SmallConfig().vocab_size) - 1);
  std::vector<std::vector<int32_t>> out(count);
  for (auto& p : out) {
    p.resize(len(rng));
    for (int32_t& t : p) t = tok(rng);
  }
  return out;
}

// The CPU's top-2 logit gap before each completion token.
std::vector<double> Gaps(model::Model& m, const std::vector<int32_t>& prompt, const std::vector<int32_t>& completion) {
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), completion.begin(), completion.end());
  auto z = m.FullLogits(all);
  EXPECT_TRUE(z.ok());
  const int64_t V = m.config().vocab_size;
  std::vector<double> gaps;
  for (size_t t = 0; t < completion.size(); ++t) {
    const float* row = z->data() + (prompt.size() - 1 + t) * V;
    std::vector<float> r(row, row + V);
    std::partial_sort(r.begin(), r.begin() + 2, r.end(), std::greater<float>());
    gaps.push_back(double(r[0]) - r[1]);
  }
  return gaps;
}

bool ClearMargins(const std::vector<double>& gaps) {
  return std::all_of(gaps.begin(), gaps.end(), [](double g) { return g >= kGapBound; });
}

struct Comparison {
  int full_matches = 0;
  int clear = 0;  // sequences whose CPU gaps are all >= kGapBound
  int64_t route_entries = 0, route_mismatches = 0;
  double worst_logprob = 0;
};

// want: the CPU's completions; got: the engine's. Checks the divergence
// rule, log-probs and route agreement where tokens agree.
Comparison Compare(model::Model& cpu, const std::vector<std::vector<int32_t>>& prompts,
                   const std::vector<model::Completion<float>>& want, const std::vector<model::Completion<float>>& got) {
  Comparison c;
  const int64_t MK = cpu.config().moe_layers() * cpu.config().top_k;
  EXPECT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    SCOPED_TRACE("sequence " + std::to_string(i));
    const std::vector<double> gaps = Gaps(cpu, prompts[i], want[i].tokens);
    c.clear += ClearMargins(gaps);
    const model::Completion<float>& w = want[i];
    const model::Completion<float>& g = got[i];
    // Well-formed whatever happens.
    EXPECT_EQ(g.logprobs.size(), g.tokens.size());
    EXPECT_EQ(int64_t(g.routes.size()), int64_t(prompts[i].size() + std::max<size_t>(g.tokens.size(), 1) - 1) * MK);
    for (float lp : g.logprobs) EXPECT_TRUE(std::isfinite(lp) && lp <= 1e-6f);
    size_t same = 0;
    while (same < w.tokens.size() && same < g.tokens.size() && w.tokens[same] == g.tokens[same]) ++same;
    if (same == w.tokens.size() && same == g.tokens.size()) {
      ++c.full_matches;
      EXPECT_EQ(int(g.finish), int(w.finish));
    } else {
      if (same >= w.tokens.size()) {
        ADD_FAILURE() << "GPU generated more tokens than the CPU";
        continue;
      }
      EXPECT_LT(gaps[same], kGapBound) << "diverged at token " << same << " where the CPU's top-2 gap is "
                                       << gaps[same];
    }
    for (size_t t = 0; t < std::min(same + 1, std::min(w.tokens.size(), g.tokens.size())); ++t)
      if (t < same) c.worst_logprob = std::max(c.worst_logprob, double(std::fabs(g.logprobs[t] - w.logprobs[t])));
    // Routes: prompt rows, then one row per agreed token that was fed back.
    const size_t rows = prompts[i].size() + (same > 0 ? same - 1 : 0);
    for (size_t j = 0; j < rows * MK && j < g.routes.size() && j < w.routes.size(); ++j) {
      ++c.route_entries;
      c.route_mismatches += g.routes[j] != w.routes[j];
    }
  }
  EXPECT_LE(c.worst_logprob, kLogprobTol);
  EXPECT_LE(double(c.route_mismatches), kRouteMismatch * double(c.route_entries))
      << c.route_mismatches << " of " << c.route_entries << " route entries differ";
  EXPECT_GE(c.full_matches, c.clear) << "every sequence with clear CPU margins must match in full";
  return c;
}

model::SamplingOptions Greedy(int64_t max_new) {
  model::SamplingOptions o;
  o.temperature = 0;
  o.max_new_tokens = max_new;
  return o;
}

bool HaveGpu() { return GpuGenerator::DeviceCount() > 0; }

// Runs without a GPU: the premise that makes the GPU comparison meaningful.
// (1) Most greedy sequences of the test model have clear margins; (2) the
// logprobs depend strongly on attention and on the routed experts (removing
// either moves them by far more than kLogprobTol), so matching log-probs
// checks those paths, not just the embedding.
TEST(GpuGeneratorModel, TestModelHasClearMargins) {
  auto cpu = MakeModel(7);
  const auto prompts = Prompts(11, 8, 3, 24);
  auto want = cpu->Generate(prompts, Greedy(kNewTokens));
  ASSERT_TRUE(want.ok()) << want.status().ToString();
  int clear = 0;
  for (size_t i = 0; i < prompts.size(); ++i) clear += ClearMargins(Gaps(*cpu, prompts[i], (*want)[i].tokens));
  EXPECT_GE(clear, 5) << "of " << prompts.size() << " sequences have all top-2 gaps >= " << kGapBound;
  for (const char* part : {"attn.wo", "moe.experts"}) {
    auto other = MakeModel(7);
    for (const auto& t : other->layout().tensors())
      if (t.name.find(part) != std::string::npos)
        std::fill(other->params().begin() + t.offset, other->params().begin() + t.offset + t.numel, 0.f);
    std::vector<model::ScoreRequest> batch;
    for (size_t i = 0; i < prompts.size(); ++i) {
      model::ScoreRequest r;
      r.tokens = prompts[i];
      r.tokens.insert(r.tokens.end(), (*want)[i].tokens.begin(), (*want)[i].tokens.end());
      r.score_from = int64_t(prompts[i].size());
      batch.push_back(r);
    }
    auto sc = other->Score(batch, false);
    ASSERT_TRUE(sc.ok()) << sc.status().ToString();
    double diff = 0;
    int64_t n = 0;
    for (size_t i = 0; i < prompts.size(); ++i)
      for (size_t t = 0; t < (*want)[i].logprobs.size(); ++t, ++n)
        diff += std::fabs(sc->logprobs[i][t] - (*want)[i].logprobs[t]);
    EXPECT_GE(diff / double(n), 5 * kLogprobTol) << "removing " << part << " barely moves the log-probs";
  }
}

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"

std::unique_ptr<GpuGenerator> MakeEngine(const model::Model& cpu, int max_batch, const FormatChooser& choose) {
  GpuGeneratorOptions o;
  o.max_batch = max_batch;
  o.kv_memory_fraction = 0.05;  // the test model needs little; leave the GPU to others
  auto g = GpuGenerator::Create(cpu.config(), o);
  EXPECT_TRUE(g.ok()) << g.status().ToString();
  if (!g.ok()) return nullptr;
  auto secs = (*g)->LoadWeights(cpu.params(), choose);
  EXPECT_TRUE(secs.ok()) << secs.status().ToString();
  return std::move(*g);
}

TEST(GpuGenerator, GreedyMatchesTheCpuModel) {
  SKIP_WITHOUT_GPU();
  auto cpu = MakeModel(7);
  const auto prompts = Prompts(11, 8, 3, 24);
  auto want = cpu->Generate(prompts, Greedy(kNewTokens));
  ASSERT_TRUE(want.ok());
  auto gen = MakeEngine(*cpu, 16, nullptr);
  ASSERT_TRUE(gen);
  auto got = gen->Generate(prompts, Greedy(kNewTokens));
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  const Comparison c = Compare(*cpu, prompts, *want, *got);
  std::printf("greedy bf16: %d of %zu sequences match in full (%d with clear margins), worst logprob diff %.4f, "
              "%lld of %lld route entries differ\n",
              c.full_matches, prompts.size(), c.clear, c.worst_logprob, (long long)c.route_mismatches,
              (long long)c.route_entries);
  const GpuGenerator::Stats& st = gen->stats();
  EXPECT_GT(st.kv_pages_total, 0);
  EXPECT_GT(st.kv_pages_peak, 0);
  EXPECT_EQ(st.generated_tokens, int64_t(prompts.size()) * kNewTokens);
  int64_t prompt_tokens = 0;
  for (const auto& p : prompts) prompt_tokens += int64_t(p.size());
  EXPECT_EQ(st.prefill_tokens, prompt_tokens);
  EXPECT_TRUE(st.graphs_used) << "CUDA graph capture failed (see the log)";

  // A stop token: the engine's own 6th token of sequence 0. Its rerun must
  // stop there (generation is deterministic), and every sequence must still
  // agree with the CPU run under the same stop token.
  model::SamplingOptions stop = Greedy(kNewTokens);
  const int32_t stop_tok = (*got)[0].tokens[5];
  stop.stop_tokens = {stop_tok};
  auto want_stop = cpu->Generate(prompts, stop);
  auto got_stop = gen->Generate(prompts, stop);
  ASSERT_TRUE(want_stop.ok() && got_stop.ok());
  Compare(*cpu, prompts, *want_stop, *got_stop);
  const std::vector<int32_t>& first = (*got)[0].tokens;
  const size_t upto = size_t(std::find(first.begin(), first.end(), stop_tok) - first.begin()) + 1;
  EXPECT_EQ((*got_stop)[0].tokens, std::vector<int32_t>(first.begin(), first.begin() + upto));
  EXPECT_EQ(int((*got_stop)[0].finish), int(model::FinishReason::kStop));

  // max_new_tokens 0: prompt routes only; and the max_seq_len cap.
  auto none = gen->Generate(prompts, Greedy(0));
  ASSERT_TRUE(none.ok());
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_TRUE((*none)[i].tokens.empty());
    EXPECT_EQ((*none)[i].routes.size(), prompts[i].size() * size_t(cpu->config().moe_layers() * cpu->config().top_k));
  }
  std::vector<std::vector<int32_t>> longp = {std::vector<int32_t>(cpu->config().max_seq_len - 3, 7)};
  auto capped = gen->Generate(longp, Greedy(50));
  ASSERT_TRUE(capped.ok()) << capped.status().ToString();
  EXPECT_LE((*capped)[0].tokens.size(), 3u);
}

TEST(GpuGenerator, ContinuousBatchingMatchesOneByOne) {
  SKIP_WITHOUT_GPU();
  auto cpu = MakeModel(7);
  // More prompts than slots, lengths 1..40: sequences join as others finish.
  auto prompts = Prompts(12, 11, 1, 40);
  model::SamplingOptions o = Greedy(kNewTokens);
  auto gen = MakeEngine(*cpu, 4, nullptr);
  ASSERT_TRUE(gen);
  auto batched = gen->Generate(prompts, o);
  ASSERT_TRUE(batched.ok()) << batched.status().ToString();
  std::vector<model::Completion<float>> alone;
  for (const auto& p : prompts) {
    auto one = gen->Generate({p}, o);
    ASSERT_TRUE(one.ok());
    alone.push_back((*one)[0]);
  }
  // Both against the CPU (same divergence rule), and against each other:
  // where neither diverged from the CPU they must be identical.
  auto want = cpu->Generate(prompts, o);
  ASSERT_TRUE(want.ok());
  const Comparison a = Compare(*cpu, prompts, *want, *batched);
  const Comparison b = Compare(*cpu, prompts, *want, alone);
  std::printf("batched: %d full matches, one by one: %d, of %zu (%d with clear margins)\n", a.full_matches,
              b.full_matches, prompts.size(), a.clear);
  for (size_t i = 0; i < prompts.size(); ++i)
    if ((*batched)[i].tokens == (*want)[i].tokens && alone[i].tokens == (*want)[i].tokens)
      for (size_t t = 0; t < alone[i].logprobs.size(); ++t)
        EXPECT_NEAR((*batched)[i].logprobs[t], alone[i].logprobs[t], kLogprobTol) << "sequence " << i;
  EXPECT_GT(gen->stats().kv_pages_peak, 0);
}

TEST(GpuGenerator, QuantizedWeightsMatchTheCpuOnRoundTrippedWeights) {
  SKIP_WITHOUT_GPU();
  // Routed experts int4, dense/shared SwiGLU int8, lm_head int8; attention
  // and router stay bf16 (the engine never quantizes them).
  const FormatChooser choose = [](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
    if (t.name.find("moe.experts") != std::string::npos) return PrecisionFormat::kInt4;
    if (t.name.find("mlp.") != std::string::npos || t.name.find("shared") != std::string::npos ||
        t.name == "lm_head")
      return PrecisionFormat::kInt8;
    return std::nullopt;
  };
  auto cpu = MakeModel(7);
  auto gen = MakeEngine(*cpu, 8, choose);
  ASSERT_TRUE(gen);
  // The CPU model on the same round trip (weights already bf16-exact).
  std::vector<actors::TensorSpec> specs;
  for (const auto& t : cpu->layout().tensors())
    specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  std::vector<float> flat(cpu->params().begin(), cpu->params().end());
  QuantizeInPlace(specs, flat, choose);
  std::copy(flat.begin(), flat.end(), cpu->params().begin());
  const auto prompts = Prompts(13, 6, 2, 30);
  auto want = cpu->Generate(prompts, Greedy(16));
  auto got = gen->Generate(prompts, Greedy(16));
  ASSERT_TRUE(want.ok() && got.ok()) << got.status().ToString();
  const Comparison c = Compare(*cpu, prompts, *want, *got);
  std::printf("int4/int8: %d of %zu sequences match in full, worst logprob diff %.4f\n", c.full_matches,
              prompts.size(), c.worst_logprob);
  // Sampling path on quantized weights: well-formed, in range, repeatable.
  model::SamplingOptions s;
  s.temperature = 0.8;
  s.top_p = 0.9;
  s.top_k = 50;
  s.seed = 99;
  s.max_new_tokens = 12;
  auto s1 = gen->Generate(prompts, s);
  auto s2 = gen->Generate(prompts, s);
  ASSERT_TRUE(s1.ok() && s2.ok());
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ((*s1)[i].tokens, (*s2)[i].tokens) << "same seed, same tokens";
    EXPECT_EQ((*s1)[i].tokens.size(), 12u);
    for (int32_t t : (*s1)[i].tokens) EXPECT_TRUE(t >= 0 && t < cpu->config().vocab_size);
    // The recorded log-prob is the temperature-1 one: Score of the same tokens on the CPU.
    model::ScoreRequest r;
    r.tokens = prompts[i];
    r.tokens.insert(r.tokens.end(), (*s1)[i].tokens.begin(), (*s1)[i].tokens.end());
    r.score_from = int64_t(prompts[i].size());
    auto sc = cpu->Score({r}, false);
    ASSERT_TRUE(sc.ok());
    for (size_t t = 0; t < (*s1)[i].logprobs.size(); ++t)
      EXPECT_NEAR((*s1)[i].logprobs[t], sc->logprobs[0][t], kLogprobTol) << "sequence " << i << " token " << t;
  }
}

TEST(GpuGenerator, GraphsAndEagerGiveTheSameBits) {
  SKIP_WITHOUT_GPU();
  auto cpu = MakeModel(7);
  const auto prompts = Prompts(14, 5, 2, 20);
  GpuGeneratorOptions o;
  o.max_batch = 8;
  o.kv_memory_fraction = 0.05;
  std::vector<std::vector<model::Completion<float>>> runs;
  for (bool graphs : {true, false}) {
    o.cuda_graphs = graphs;
    auto g = GpuGenerator::Create(cpu->config(), o);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    ASSERT_TRUE((*g)->LoadWeights(cpu->params(), nullptr).ok());
    auto r = (*g)->Generate(prompts, Greedy(12));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ((*g)->stats().graphs_used, graphs);
    runs.push_back(std::move(*r));
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(runs[0][i].tokens, runs[1][i].tokens) << "sequence " << i;
    EXPECT_EQ(runs[0][i].logprobs, runs[1][i].logprobs) << "sequence " << i;
    EXPECT_EQ(runs[0][i].routes, runs[1][i].routes) << "sequence " << i;
  }
}

TEST(GpuGenerator, RejectsBadInput) {
  SKIP_WITHOUT_GPU();
  auto cpu = MakeModel(7);
  auto gen = MakeEngine(*cpu, 4, nullptr);
  ASSERT_TRUE(gen);
  EXPECT_FALSE(gen->Generate({{}}, Greedy(4)).ok());
  EXPECT_FALSE(gen->Generate({{1, 100000}}, Greedy(4)).ok());
  EXPECT_FALSE(gen->LoadWeights(std::span<const float>(cpu->params().data(), 10), nullptr).ok());
  model::ModelConfig bad = cpu->config();
  bad.head_dim = 32;
  bad.heads = 8;
  EXPECT_FALSE(GpuGenerator::Create(bad, GpuGeneratorOptions{}).ok());
}

}  // namespace
}  // namespace grove::rollout
