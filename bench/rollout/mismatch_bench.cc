// How far the GPU rollout engine's samples are from the learner's policy, per
// precision (issue 9, "staying on-policy"): for each weight plan the engine
// (rollout/gpu_generator.h) samples --prompts random prompts at temperature
// 1 with weights quantized as a rollout worker's PolicyQuantizer chooses
// (bf16 = quantize "none": the engine's bf16; int8; int4 = FFN int4, the
// rest bf16; plan = the per-expert plan at --plan_bits, calibrated as a GPU
// worker does: completions sampled by the engine, errors measured on the
// GPU by GpuPlanMeasurer, gpu_precision_plan.h; --plan_on_cpu: on the CPU
// model, minutes on gpu-ref); the learner's model::GpuTransformer (fp32 master,
// bf16 compute: what the GPU learner scores with) scores the same tokens.
// Reported over the sampled tokens (rollout/sampled_mismatch.h):
//   KL k1     mean(rollout log-prob - learner log-prob): the sampled-token
//             estimate of KL(rollout || learner)
//   mean d^2  mean squared difference (2x the k2 estimate)
//   max |d|
//   routes    share of tokens whose routed-expert set differs in >= 1 layer
// Random weights (bench::FastInit) unless --checkpoint: a trained model's
// sharper distributions give larger, more telling numbers.
//
// Default: the GPU reference model, 32 prompts of 64 tokens, 128 new tokens.
// --quick: 16 prompts, 64 new tokens (with --plan_on_cpu, the plan
// calibrated on 2 x 8 tokens).
#include <gflags/gflags.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/support/fast_init.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/gpu_transformer.h"
#include "model/transformer.h"
#include "rollout/gpu_generator.h"
#include "rollout/gpu_precision_plan.h"
#include "rollout/policy_quantizer.h"
#include "rollout/sampled_mismatch.h"
#include "bench/support/bench_util.h"

DEFINE_string(config, "configs/model/gpu-ref.toml", "model config (its [model] section)");
DEFINE_string(checkpoint, "", "grove safetensors weights (default: random, bench::FastInit)");
DEFINE_string(plans, "bf16,int8,int4,plan", "weight plans: bf16, int8, int4, plan");
DEFINE_double(plan_bits, 5.0, "plan: average bits per FFN weight");
DEFINE_int32(plan_sequences, 8, "plan: calibration prompts");
DEFINE_int32(plan_new_tokens, 32, "plan: tokens sampled per calibration prompt");
DEFINE_int32(prompts, 32, "sequences sampled per plan");
DEFINE_int32(prompt, 64, "prompt tokens");
DEFINE_int32(new_tokens, 128, "tokens sampled per sequence");
DEFINE_bool(plan_on_cpu, false, "plan: calibrate and measure on the CPU model (the reference path)");
DEFINE_bool(quick, false, "16 prompts, 64 new tokens (--plan_on_cpu: plan calibrated on 2 x 8 tokens)");
DEFINE_uint64(seed, 1, "weights, prompts and sampling seed");

namespace grove::rollout {
namespace {

using bench::Clock;
using bench::Since;

Result<QuantizeMode> ModeOf(const std::string& plan) {
  if (plan == "bf16") return QuantizeMode::kNone;  // nullopt everywhere: the engine's bf16
  if (plan == "int8") return QuantizeMode::kInt8;
  if (plan == "int4") return QuantizeMode::kInt4;
  if (plan == "plan") return QuantizeMode::kPlan;
  return Status::InvalidArgument("unknown plan '" + plan + "' (bf16, int8, int4, plan)");
}

int Run() {
  auto mc = model::ModelConfig::LoadFile(FLAGS_config);
  GROVE_BENCH_CHECK_OK(mc.status());
  const model::ModelConfig& c = *mc;
  const int prompts_n = FLAGS_quick ? 16 : FLAGS_prompts;
  const int new_tokens = FLAGS_quick ? 64 : FLAGS_new_tokens;
  // --quick shrinks the plan's calibration only where it runs on the CPU.
  const int plan_sequences = FLAGS_quick && FLAGS_plan_on_cpu ? 2 : FLAGS_plan_sequences;
  const int plan_new_tokens = FLAGS_quick && FLAGS_plan_on_cpu ? 8 : FLAGS_plan_new_tokens;
  if (FLAGS_prompt < 1 || prompts_n < 1 || new_tokens < 1 || FLAGS_prompt + new_tokens > c.max_seq_len) {
    std::fprintf(stderr, "mismatch_bench: need positive sizes and --prompt + new tokens <= max_seq_len\n");
    return 2;
  }
  std::vector<std::string> plans = bench::SplitCommaList(FLAGS_plans);
  for (const std::string& p : plans) GROVE_BENCH_CHECK_OK(ModeOf(p).status());
  if (GpuGenerator::DeviceCount() == 0) {
    std::printf("mismatch_bench: no CUDA device, nothing to measure\n");
    return 0;
  }

  auto t0 = Clock::now();
  auto host = model::Model::Create(c, FLAGS_seed, /*random_init=*/false);
  GROVE_BENCH_CHECK_OK(host.status());
  if (FLAGS_checkpoint.empty()) {
    bench::FastInit(**host, FLAGS_seed);
  } else {
    GROVE_BENCH_CHECK_OK(model::LoadParams(FLAGS_checkpoint, host->get()));
  }
  (*host)->set_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  const std::vector<float> full((*host)->params().begin(), (*host)->params().end());
  std::vector<actors::TensorSpec> specs;
  for (const model::TensorInfo& t : (*host)->layout().tensors())
    specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  std::printf("model %s: %lld parameters (%s), init %.1f s; %d prompts of %d tokens, %d new tokens, temperature 1\n",
              FLAGS_config.c_str(), (long long)(*host)->layout().total(),
              FLAGS_checkpoint.empty() ? "random" : FLAGS_checkpoint.c_str(), Since(t0), prompts_n, FLAGS_prompt,
              new_tokens);

  // The learner's view first (its memory before the engine sizes its KV pages).
  auto learner = model::GpuTransformer::Create(c, 0, /*trainable=*/false);
  GROVE_BENCH_CHECK_OK(learner.status());
  GROVE_BENCH_CHECK_OK((*learner)->UploadParams(full));
  GpuGeneratorOptions o;
  o.max_batch = std::max(prompts_n, plan_sequences);
  o.kv_memory_fraction = 0.3;
  auto engine = GpuGenerator::Create(c, o);
  GROVE_BENCH_CHECK_OK(engine.status());

  std::mt19937_64 rng(FLAGS_seed);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size) - 1);
  std::vector<std::vector<int32_t>> prompts(prompts_n, std::vector<int32_t>(FLAGS_prompt));
  for (auto& p : prompts)
    for (int32_t& t : p) t = tok(rng);
  std::vector<std::vector<int32_t>> calibration(plan_sequences, std::vector<int32_t>(FLAGS_prompt));
  for (auto& p : calibration)
    for (int32_t& t : p) t = tok(rng);

  std::printf("\n| plan | engine b/w | tokens | KL k1 | mean d^2 | max abs d | routes differ | load s | sample s | "
              "score s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const std::string& plan : plans) {
    QuantizeSettings qs;
    qs.mode = *ModeOf(plan);
    qs.plan_bits = FLAGS_plan_bits;
    qs.plan_sequences = plan_sequences;
    qs.plan_max_new_tokens = plan_new_tokens;
    // Stop token 0: any id is as good on random prompts (a calibration
    // completion that draws it just ends early).
    PolicyQuantizer quantizer(qs, calibration, /*stop_token=*/0);
    GpuPlanMeasurer* on_gpu = nullptr;
    if (qs.mode == QuantizeMode::kPlan && !FLAGS_plan_on_cpu) {
      GpuGenerator* gen = engine->get();
      auto m = GpuPlanMeasurer::Create(
          c, 0,
          [gen](const float*, std::span<const float> w, const std::vector<std::vector<int32_t>>& ps,
                const model::SamplingOptions& so) -> Result<std::vector<model::Completion<float>>> {
            GROVE_RETURN_IF_ERROR(gen->LoadWeights(w, nullptr).status());
            return gen->Generate(ps, so);
          });
      GROVE_BENCH_CHECK_OK(m.status());
      on_gpu = m->get();
      quantizer.set_measurer(std::move(*m));
    }
    auto tp = Clock::now();
    auto choose = quantizer.Formats(1, c, specs, full, host->get());
    GROVE_BENCH_CHECK_OK(choose.status());
    if (qs.mode == QuantizeMode::kPlan) {
      std::printf("plan: %s, made in %.2f s on %s (%zu calibration sequences of %d prompt + <= %d sampled tokens)",
                  quantizer.plan()->Summary().c_str(), quantizer.plan_seconds(),
                  on_gpu ? on_gpu->where().c_str() : "the CPU", (size_t)plan_sequences, FLAGS_prompt,
                  plan_new_tokens);
      if (on_gpu)
        std::printf(": sampling %.2f s, kept forward %.3f s, local errors %.3f s, per-layer KL %.3f s",
                    on_gpu->sample_seconds(), on_gpu->timing().forward_s, on_gpu->timing().local_s,
                    on_gpu->timing().kl_s);
      std::printf("; with its mismatch measured %.2f s in all. Exact KL on its calibration batch %.3e, routes "
                  "differ %.1f%%\n",
                  Since(tp), quantizer.mismatch().mean_kl, 100 * quantizer.mismatch().routes_differ);
    }
    // Storage as the engine holds it: what the chooser leaves (nullopt) is
    // bf16 there for every 2-D weight but the embedding table.
    const double bits = StorageReport(specs, [&](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
                          const std::optional<PrecisionFormat> f = (*choose)(t);
                          if (f || t.name == "embed") return f;
                          return PrecisionFormat::kBF16;
                        }).bits_per_weight;
    auto load = (*engine)->LoadWeights(full, *choose);
    GROVE_BENCH_CHECK_OK(load.status());

    model::SamplingOptions so;
    so.temperature = 1.0;
    so.seed = FLAGS_seed;
    so.max_new_tokens = new_tokens;
    auto ts = Clock::now();
    auto completions = (*engine)->Generate(prompts, so);
    GROVE_BENCH_CHECK_OK(completions.status());
    const double sample_s = Since(ts);
    auto reqs = ScoreRequestsFor(prompts, *completions);
    GROVE_BENCH_CHECK_OK(reqs.status());
    auto tq = Clock::now();
    auto score = (*learner)->Score(*reqs, /*keep_for_backward=*/false);
    GROVE_BENCH_CHECK_OK(score.status());
    const double score_s = Since(tq);
    auto m = CompareSampledTokens(prompts, *completions, *score, c.moe_layers(), c.top_k);
    GROVE_BENCH_CHECK_OK(m.status());
    std::printf("| %s | %.2f | %lld | %.3e | %.3e | %.3e | %.2f%% | %.2f | %.2f | %.2f |\n", plan.c_str(), bits,
                (long long)m->tokens, m->mean_diff, m->mean_sq_diff, m->max_abs_diff, 100 * m->routes_differ, *load,
                sample_s, score_s);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace grove::rollout

int main(int argc, char** argv) {
  gflags::SetUsageMessage("mismatch_bench: rollout engine vs learner log-probs and routes, per precision");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  return grove::rollout::Run();
}
