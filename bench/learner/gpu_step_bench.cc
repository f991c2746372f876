// The whole GRPO training step of a model on one GPU, timed by part:
// policy forward (GpuTransformer::Score, activations kept), the GRPO loss
// (learner::ComputePolicyLoss on the host, over the downloaded log-probs),
// backward (GpuTransformer::Backward), and the optimizer (GpuGrpoStep::Update:
// global norm, clipping, fused AdamW, bf16 copies repacked).
//
// Batch: synthetic groups of random tokens, --batch sequences of --prompt +
// --completion tokens, routing replay of the model's own routes (one scoring
// pass before the timed steps), rollout log-probs = the model's own (ratio 1),
// beta 0 (no reference forward; --reference times one separately).
//
// Throughput counts every token of the batch (batch * (prompt + completion)).
// MFU = FLOPs/token * tokens/s / 989.4 TFLOP/s (H100 SXM dense bf16), with
// FLOPs/token = 6 * N_matmul + 6 * layers * heads * head_dim * L (causal
// attention, forward + backward) and N_matmul the weights one token
// multiplies: attention projections, the dense or routed (top_k) + shared
// expert SwiGLUs, the router, and the lm_head; not the embedding lookup.
//
// The loss runs on the device (GpuGrpoStep::LossAndBackward, kernels::
// GrpoLoss) unless --host_loss (learner::ComputePolicyLoss over downloaded
// log-probs, then Backward from the host's gradients).
//
// GROVE_GPU_PROFILE=1 in the environment adds a per-phase table (CUDA events
// on the model's stream, model/gpu_transformer_profile.h): ms per step, share
// of the step, and TFLOP/s for the matrix products. GROVE_EXPERT_DW_STREAMS=N
// runs the experts' weight-gradient GEMMs on N side streams overlapping the
// rest of the backward (default 0: in order on the model's stream).
// GROVE_EXPERT_DW=grouped|mma_sync|wgmma|wgmma_n256 runs them as two
// kernels::GroupedWeightGrad launches per MoE layer instead (default cublas).
//
// --fast_init fills the weights with the model's init distribution on all
// cores (N(0, init_std), output projections scaled, norms 1, router bias 0)
// instead of Model::Create's single-threaded seeded stream: the same
// distribution, different values, ~1 min less on the device machine.
//
// --save_checkpoint PATH writes the initial parameters as model/'s
// safetensors checkpoint (for the PyTorch baseline to load the same weights).
#include <cuda_runtime.h>
#include <gflags/gflags.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "bench/support/fast_init.h"
#include "learner/advantages.h"
#include "learner/gpu_step.h"
#include "learner/grpo_loss.h"
#include "learner/grpo_trainer.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/gpu_transformer.h"
#include "model/transformer.h"
#include "bench/support/bench_util.h"

DEFINE_string(config, "configs/model/gpu-ref.toml", "model config (its [model] section)");
DEFINE_int32(batch, 32, "sequences per step");
DEFINE_int32(micro_batch, 0,
             "sequences per forward + backward (0: the whole batch); a step accumulates the gradients of "
             "batch / micro_batch of them before its one update, as GrpoTrainer's micro-batches do");
DEFINE_int32(group, 8, "completions per prompt");
DEFINE_int32(prompt, 128, "prompt tokens");
DEFINE_int32(completion, 896, "completion tokens");
DEFINE_int32(steps, 5, "timed steps (after one warm-up step)");
DEFINE_bool(reference, false, "also time one reference forward (beta > 0 needs it)");
DEFINE_string(save_checkpoint, "", "write the initial parameters here (safetensors)");
DEFINE_uint64(seed, 1, "init and token seed");
DEFINE_bool(fast_init, true, "fill the weights on all cores (same distribution as Model::Create)");
DEFINE_string(adam_moments, "fp32", "AdamW's moments: fp32 | bf16 (stochastically rounded, as DeepSeek-V3 keeps them)");
DEFINE_bool(host_loss, false, "GRPO loss on the host (downloaded log-probs) instead of on the device");

namespace grove::learner {
namespace {

using bench::Clock;
using bench::Since;

// The weights one token multiplies (see the header).
double MatmulParamsPerToken(const model::ModelConfig& c) {
  const double H = double(c.hidden), qd = double(c.heads * c.head_dim), kd = double(c.kv_heads * c.head_dim);
  double n = 0;
  for (int64_t l = 0; l < c.layers; ++l) {
    n += 2 * H * qd + 2 * H * kd;
    if (c.is_moe_layer(l))
      n += double(c.experts) * H + double(c.top_k + c.shared_experts) * 3 * H * double(c.expert_hidden);
    else
      n += 3 * H * double(c.dense_hidden);
  }
  return n + double(c.vocab_size) * H;
}

int Run() {
  auto mc = model::ModelConfig::LoadFile(FLAGS_config);
  GROVE_BENCH_CHECK_OK(mc.status());
  const model::ModelConfig& c = *mc;
  const int L = FLAGS_prompt + FLAGS_completion, B = FLAGS_batch;
  const int MB = FLAGS_micro_batch > 0 ? FLAGS_micro_batch : B;
  if (L > c.max_seq_len || B % FLAGS_group != 0 || FLAGS_prompt < 1 || FLAGS_completion < 1 || B % MB != 0 ||
      (FLAGS_host_loss && MB != B)) {
    std::fprintf(stderr,
                 "bad shape: prompt + completion <= max_seq_len %lld, batch a multiple of group and of micro_batch "
                 "(--host_loss: one micro-batch)\n",
                 (long long)c.max_seq_len);
    return 2;
  }
  auto t0 = Clock::now();
  auto host = model::Model::Create(c, FLAGS_seed, /*random_init=*/!FLAGS_fast_init);
  GROVE_BENCH_CHECK_OK(host.status());
  if (FLAGS_fast_init) bench::FastInit(**host, FLAGS_seed);
  std::printf("model %s: %lld parameters, init %.1f s\n", FLAGS_config.c_str(),
              (long long)(*host)->layout().total(), Since(t0));
  if (!FLAGS_save_checkpoint.empty()) {
    t0 = Clock::now();
    GROVE_BENCH_CHECK_OK(model::SaveModel(FLAGS_save_checkpoint, **host, {{"seed", std::to_string(FLAGS_seed)}}));
    std::printf("saved the initial parameters to %s (%.1f s)\n", FLAGS_save_checkpoint.c_str(), Since(t0));
  }
  t0 = Clock::now();
  AdamWOptions adam;
  adam.beta2 = 0.95;
  adam.weight_decay = 0.1;
  auto moments = ParseMomentPrecision(FLAGS_adam_moments);
  GROVE_BENCH_CHECK_OK(moments.status());
  adam.moments = *moments;
  auto step = GpuGrpoStep::Create(**host, **host, adam, NoDecayRanges((*host)->layout()));
  GROVE_BENCH_CHECK_OK(step.status());
  std::printf("uploaded to the GPU in %.1f s\n", Since(t0));
  model::GpuTransformer& policy = (*step)->policy();

  // Synthetic groups; routes and rollout log-probs from the model itself.
  std::mt19937_64 rng(FLAGS_seed);
  std::uniform_int_distribution<int> tok(0, int(c.vocab_size) - 1);
  std::vector<model::ScoreRequest> batch(B);
  std::vector<float> rewards(B);
  std::vector<int64_t> group_sizes(B / FLAGS_group, FLAGS_group);
  for (int g = 0; g < B / FLAGS_group; ++g) {
    std::vector<int32_t> prompt(FLAGS_prompt);
    for (int32_t& t : prompt) t = tok(rng);
    for (int s = 0; s < FLAGS_group; ++s) {
      model::ScoreRequest& r = batch[g * FLAGS_group + s];
      r.tokens = prompt;
      for (int t = 0; t < FLAGS_completion; ++t) r.tokens.push_back(tok(rng));
      r.score_from = FLAGS_prompt;
      rewards[g * FLAGS_group + s] = float(s % 2);
    }
  }
  t0 = Clock::now();
  std::vector<float> rollout;
  std::vector<int64_t> offsets{0};
  // The micro-batches' requests, and each one's offsets into rollout from 0.
  std::vector<std::vector<model::ScoreRequest>> micro(B / MB);
  std::vector<std::vector<int64_t>> micro_offsets(B / MB);
  for (int m = 0; m < B / MB; ++m) {
    micro[m].assign(std::make_move_iterator(batch.begin() + m * MB),
                    std::make_move_iterator(batch.begin() + (m + 1) * MB));
    auto own = policy.Score(micro[m], false);
    GROVE_BENCH_CHECK_OK(own.status());
    micro_offsets[m].push_back(0);
    for (int i = 0; i < MB; ++i) {
      micro[m][i].replay_routes = std::move(own->routes[i]);
      rollout.insert(rollout.end(), own->logprobs[i].begin(), own->logprobs[i].end());
      offsets.push_back(int64_t(rollout.size()));
      micro_offsets[m].push_back(offsets.back() - offsets[m * MB]);
    }
  }
  std::printf("routing pass (forward without keep) %.3f s\n", Since(t0));
  auto adv = GroupAdvantages(rewards, group_sizes, AdvantageOptions{});
  GROVE_BENCH_CHECK_OK(adv.status());
  PolicyLossConfig loss_cfg;
  loss_cfg.beta = 0;
  loss_cfg.tis_cap = 2.0;
  if (FLAGS_reference) {
    t0 = Clock::now();
    for (const auto& requests : micro)
      GROVE_BENCH_CHECK_OK((*step)->reference().Score(requests, false, /*return_routes=*/false).status());
    std::printf("reference forward %.3f s (%zu micro-batch(es))\n", Since(t0), micro.size());
  }

  const double flops_per_token =
      6 * MatmulParamsPerToken(c) + 6.0 * double(c.layers * c.heads * c.head_dim) * double(L);
  const double tokens = double(B) * L;
  std::printf("batch %d x %d tokens (prompt %d + completion %d) in %d micro-batch(es), N_matmul %.4g, FLOPs/token "
              "%.4g\n",
              B, L, FLAGS_prompt, FLAGS_completion, B / MB, MatmulParamsPerToken(c), flops_per_token);
  std::printf("AdamW moments: %s\n", MomentPrecisionName(adam.moments));
  std::printf("GRPO loss on the %s; expert dW streams: %s; expert dW: %s\n", FLAGS_host_loss ? "host" : "device",
              std::getenv("GROVE_EXPERT_DW_STREAMS") ? std::getenv("GROVE_EXPERT_DW_STREAMS")
                                                     : "default (0, in order)",
              std::getenv("GROVE_EXPERT_DW") ? std::getenv("GROVE_EXPERT_DW")
                                            : "default (grouped on sm_90, else cublas)");
  std::printf("%-6s %9s %9s %9s %9s %9s %11s %7s\n", "step", "fwd s", "loss s", "bwd s", "optim s", "total s",
              "tokens/s", "MFU");
  std::vector<double> totals, fwds, bwds, opts, losses;
  std::vector<model::PhaseTime> phases;  // summed over the timed steps, in first-seen order
  for (int it = 0; it <= FLAGS_steps; ++it) {
    const auto s0 = Clock::now();
    GROVE_BENCH_CHECK_OK(policy.ZeroGrad());
    double t_fwd = 0, t_loss = 0, t_bwd = 0;
    for (int m = 0; m < B / MB; ++m) {
      auto sm = Clock::now();
      auto cur = policy.Score(micro[m], true, /*return_routes=*/false);  // as GrpoTrainer's step
      GROVE_BENCH_CHECK_OK(cur.status());
      t_fwd += Since(sm);
      const auto s1 = Clock::now();
      const int64_t first = offsets[m * MB], scored = offsets[(m + 1) * MB] - first;
      PolicyBatch pb;
      pb.seq_offsets = micro_offsets[m];
      pb.rollout_logp = std::span<const float>(rollout).subspan(first, scored);
      pb.advantages = std::span<const float>(*adv).subspan(m * MB, MB);
      pb.total_tokens = offsets.back();  // the loss normalizes over the whole step's batch
      pb.total_sequences = B;
      if (FLAGS_host_loss) {
        std::vector<float> logp;
        for (const auto& lp : cur->logprobs) logp.insert(logp.end(), lp.begin(), lp.end());
        pb.logp = logp;
        auto out = ComputePolicyLoss(pb, loss_cfg);
        GROVE_BENCH_CHECK_OK(out.status());
        std::vector<std::vector<float>> dlogp;
        for (int i = 0; i < B; ++i)
          dlogp.emplace_back(out->grad_logp.begin() + offsets[i], out->grad_logp.begin() + offsets[i + 1]);
        t_loss += Since(s1);
        const auto s2 = Clock::now();
        GROVE_BENCH_CHECK_OK(policy.Backward(dlogp));
        t_bwd += Since(s2);
      } else {  // loss and backward in one call; the loss's share is in the profile table
        GROVE_BENCH_CHECK_OK((*step)->LossAndBackward(pb, loss_cfg).status());
        t_bwd += Since(s1);
      }
    }
    const auto s3 = Clock::now();
    auto rep = (*step)->Update(1e-6, 1.0);
    GROVE_BENCH_CHECK_OK(rep.status());
    const double t_opt = Since(s3), total = Since(s0);
    std::printf("%-6s %9.3f %9.3f %9.3f %9.3f %9.3f %11.0f %6.1f%%\n", it == 0 ? "warmup" : std::to_string(it).c_str(),
                t_fwd, t_loss, t_bwd, t_opt, total, tokens / total, 100.0 * flops_per_token * tokens / total / 989.4e12);
    auto prof = policy.profiler().Take();
    GROVE_BENCH_CHECK_OK(prof.status());
    if (it > 0)
      for (const model::PhaseTime& p : *prof) {
        auto at = std::find_if(phases.begin(), phases.end(), [&](const model::PhaseTime& q) { return q.phase == p.phase; });
        if (at == phases.end()) {
          phases.push_back(p);
        } else {
          at->ms += p.ms; at->flops += p.flops; at->laps += p.laps;
        }
      }
    if (it > 0) {
      totals.push_back(total); fwds.push_back(t_fwd); bwds.push_back(t_bwd); opts.push_back(t_opt);
      losses.push_back(t_loss);
    }
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double tm = median(totals);
  std::printf("median: forward %.3f s, loss %.3f s, backward %.3f s, optimizer %.3f s, step %.3f s\n", median(fwds),
              median(losses), median(bwds), median(opts), tm);
  std::printf("RESULT tokens/s %.0f  MFU %.1f%%  (step %.3f s, %d x %d tokens)\n", tokens / tm,
              100.0 * flops_per_token * tokens / tm / 989.4e12, tm, B, L);
  if (!phases.empty()) {
    double sum = 0;
    for (const auto& p : phases) sum += p.ms;
    std::printf("\nper-phase GPU time (CUDA events on the model's stream), mean of %d steps; timed phases sum to "
                "%.1f ms/step\n%-44s %9s %7s %9s %8s\n", FLAGS_steps, sum / FLAGS_steps, "phase", "ms/step",
                "% step", "TFLOP/s", "laps");
    std::vector<model::PhaseTime> sorted = phases;
    std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.ms > b.ms; });
    for (const auto& p : sorted) {
      char tf[32] = "";
      if (p.flops > 0) std::snprintf(tf, sizeof tf, "%.0f", p.flops / (p.ms * 1e-3) / 1e12);
      std::printf("%-44s %9.2f %6.1f%% %9s %8lld\n", p.phase.c_str(), p.ms / FLAGS_steps, 100 * p.ms / sum, tf,
                  (long long)(p.laps / FLAGS_steps));
    }
  }
  t0 = Clock::now();
  GROVE_BENCH_CHECK_OK(policy.DownloadParams((*host)->params()));
  std::printf("weights to the host for publishing: %.3f s\n", Since(t0));
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  std::printf("GPU memory in use: %.1f GiB of %.1f GiB\n", double(total_b - free_b) / (1 << 30),
              double(total_b) / (1 << 30));
  return 0;
}

}  // namespace
}  // namespace grove::learner

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  return grove::learner::Run();
}
