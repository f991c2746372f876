// Decode throughput of the GPU rollout engine (rollout/gpu_generator.h) on a
// model config (default the GPU reference model), random weights
// (bench::FastInit): for each weight plan (bf16, int8, int4, a mix:
// routed experts alternately int4/int8 by expert id, the rest int8; and
// plan: a precision plan measured on the GPU at --plan_bits, as a GPU
// rollout worker makes it: --plan_sequences random prompts completed by the
// engine, units' errors measured by GpuPlanMeasurer, gpu_precision_plan.h,
// the time it took printed), each
// batch size, CUDA graphs on and off: --batch prompts of --prompt random
// tokens, greedy, --new_tokens tokens each (no stop token).
//
// Columns: decode tokens/s (generated tokens / time in decode steps, the
// per-step sampling and host sync included), ms per decode step, prefill
// tokens/s, and at every batch the bytes of weights one decode step must
// read (attention, router, dense/shared SwiGLU, lm_head, and the routed
// experts the step's rows chose: the distinct ids in each MoE layer of each
// step, averaged, from the completions' routes -- with random weights a
// batch's rows share most of their experts, far below min(experts, batch *
// top_k)) over the step time: the achieved weight bandwidth, against the
// H100's ~3.35 TB/s HBM3 (2.82 TB/s measured read, docs/rollout.md); and
// those experts per MoE layer.
//
// Also printed: the seconds LoadWeights (fp32 from the host) and
// LoadWeightsFromDevice (fp32 already on the GPU: the re-quantization a
// worker pays per policy version) take per plan.
//
// Default run: 4 plans x batches 1, 8, 32, 128 x graphs on/off, 128 new
// tokens; --quick: 32 new tokens and graphs on only.
//
// --profile: instead, the decode step split by phase (GpuGeneratorOptions::
// profile_decode: eager launches with a cudaEvent before each op) for each
// plan of --plans at --profile_batches, 32 new tokens: ms per step per phase
// (rmsnorm, qkv linear, rope + append, attention, wo, router, shared experts,
// MoE route index / up / down / combine, lm head, sampling, host).
//
// --variants: instead, the engine (graphs on) with each decode path of
// GpuGeneratorOptions alone against all of them off (base; then
// fold_shared_experts (SharedExpertFold::kAlways), fold_batch_one
// (kBatchOne), one_launch_moe_index, router_writes_routes,
// gemv_rows_per_warp 1 / 4 (batch 1 only), split_kv = split_kv_attention,
// programmatic_launch, fuse_rmsnorm and fuse_rmsnorm+router_topk (batch 1
// only), default = the options' defaults, default with PDL + the fused norm
// (+ the fused router), default without fuse_append_attention (the RoPE +
// append folded into the split-KV pass), default-short_context (the
// defaults with split_kv_short_context 0), default-split_kv_tiled (the
// split pass's warp-walk chunk kernel), default-fold_batch_one and
// default+fold_always (the defaults with SharedExpertFold::kNever /
// kAlways instead of the default kBatchOne), default+persistent (the
// batch-1 step as one persistent kernel), all = the four older paths;
// --variant_names picks rows) for
// --plans at --variant_batches, 32 new tokens: ms per decode step, the
// speedup over base, the weight bytes read per second (StepWeightBytes /
// step) and their share of the 2.82 TB/s read ceiling. --variant_repeats N
// runs the picked rows (base included) N times in turn, each against its own
// repeat's base, then prints the median ms/step and speedup of each cell
// (and, where the default row is picked, the median speedup over it): run
// to run a cell moves by up to ~2%, as much as some paths gain.
#include <cuda_runtime_api.h>
#include <gflags/gflags.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/support/fast_init.h"
#include "kernels/quant_linear.h"
#include "model/config.h"
#include "model/transformer.h"
#include "rollout/gpu_generator.h"
#include "rollout/gpu_precision_plan.h"
#include "rollout/precision_format.h"
#include "bench/support/bench_util.h"

DEFINE_string(config, "configs/model/gpu-ref.toml", "model config (its [model] section)");
DEFINE_string(batches, "1,8,32,128", "batch sizes (comma-separated)");
DEFINE_string(plans, "bf16,int8,int4,mixed,plan", "weight plans: bf16, int8, int4, mixed, plan");
DEFINE_double(plan_bits, 5.0, "plan: average bits per FFN weight");
DEFINE_int32(plan_sequences, 8, "plan: calibration prompts (of --prompt random tokens)");
DEFINE_int32(plan_new_tokens, 32, "plan: tokens sampled per calibration prompt");
DEFINE_int32(prompt, 64, "prompt tokens (>= 2)");
DEFINE_int32(new_tokens, 128, "tokens generated per sequence");
DEFINE_bool(graphs_off, true, "also time without CUDA graphs");
DEFINE_bool(quick, false, "32 new tokens, graphs on only");
DEFINE_uint64(seed, 1, "weights and prompts seed");
DEFINE_bool(profile, false, "print the eager decode step's time per phase instead of the throughput table");
DEFINE_string(profile_batches, "1,32", "batch sizes of --profile");
DEFINE_bool(variants, false, "print ms/step of each opt-in decode path off/on instead of the throughput table");
DEFINE_string(variant_batches, "1,8,32", "batch sizes of --variants");
DEFINE_string(variant_names, "", "--variants: only the rows whose name contains one of these (comma-separated; "
              "=name: exactly that row); the base row always runs (the speedups' reference)");
DEFINE_bool(step_stages, false,
            "print the persistent batch-1 step's time per stage (kernels::DecodeStage, from its stage clock) "
            "instead of the throughput table");
DEFINE_int32(variant_repeats, 1, "--variants: run the rows this many times in turn and add a table of medians");

namespace grove::rollout {
namespace {

using bench::Clock;
using bench::Since;

bool IsAttentionOrRouter(const std::string& name) {
  return name.find("attn.") != std::string::npos || name.find("router") != std::string::npos;
}

// The measured plan's chooser (MeasurePlan; "plan" in --plans).
FormatChooser measured_plan;

// The chooser of a plan (the engine keeps attention and router bf16 anyway).
FormatChooser Plan(const std::string& plan) {
  if (plan == "bf16") return nullptr;
  if (plan == "plan") return measured_plan;
  const PrecisionFormat all = plan == "int4" ? PrecisionFormat::kInt4 : PrecisionFormat::kInt8;
  const bool mixed = plan == "mixed";
  return [all, mixed](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
    if (IsAttentionOrRouter(t.name)) return std::nullopt;
    const size_t at = t.name.find("moe.experts.");
    if (mixed && at != std::string::npos) {
      const int e = std::stoi(t.name.substr(at + 12));
      return e % 2 == 0 ? PrecisionFormat::kInt4 : PrecisionFormat::kInt8;
    }
    return all;
  };
}

kernels::QuantFormat ToQuant(std::optional<PrecisionFormat> f) {
  if (!f || *f == PrecisionFormat::kBF16) return kernels::QuantFormat::kBF16;
  return *f == PrecisionFormat::kInt8 ? kernels::QuantFormat::kInt8 : kernels::QuantFormat::kInt4;
}

// Bytes of weights (data + scales) a decode step reads whose MoE layers
// touch `touched` routed experts each (on average).
double StepWeightBytes(const model::Model& m, const FormatChooser& choose, double touched) {
  const model::ModelConfig& c = m.config();
  double bytes = 0;
  for (const model::TensorInfo& t : m.layout().tensors()) {
    if (t.shape.size() != 2 || t.name == "embed") continue;
    actors::TensorSpec spec{t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)};
    const kernels::QuantFormat f =
        IsAttentionOrRouter(t.name) || !choose ? kernels::QuantFormat::kBF16 : ToQuant(choose(spec));
    double b = double(kernels::QuantDataBytes(f, t.shape[0], t.shape[1])) +
               4.0 * double(kernels::QuantScaleCount(f, t.shape[0], t.shape[1]));
    if (t.name.find("moe.experts.") != std::string::npos) b *= touched / double(c.experts);
    bytes += b;
  }
  return bytes;
}

// One timed Generate of `b` random prompts after a short warm-up one (which
// captures the bucket's graph); the stats accumulated by the timed call.
struct Timed {
  GpuGenerator::Stats delta;
  double decode_tokens = 0;
  // Routed experts a decode step's MoE layer touched, on average over the
  // steps and layers: the distinct ids the step's rows chose (from the
  // completions' routes). Random weights route the rows of a batch to
  // far fewer experts than batch * top_k, so the weight bytes a step reads
  // come from the routes, not from that bound.
  double touched_experts = 0;
};

// The mean over decode steps and MoE layers of the number of distinct
// routed experts the step's rows chose. Decode step d of a sequence with a
// P-token prompt feeds its completion token d: routes row P + d.
double TouchedExperts(const model::ModelConfig& c, const std::vector<std::vector<int32_t>>& prompts,
                      const std::vector<model::Completion<float>>& done) {
  const int64_t L = c.moe_layers(), K = c.top_k;
  if (L == 0 || done.empty()) return 0;
  size_t steps = 0;
  for (const auto& d : done) steps = std::max(steps, d.tokens.size() > 0 ? d.tokens.size() - 1 : 0);
  double sum = 0;
  int64_t count = 0;
  std::vector<char> seen(size_t(c.experts));
  for (size_t d = 0; d < steps; ++d)
    for (int64_t l = 0; l < L; ++l) {
      std::fill(seen.begin(), seen.end(), 0);
      int distinct = 0, rows = 0;
      for (size_t s = 0; s < done.size(); ++s) {
        const size_t row = prompts[s].size() + d;
        if ((row + 1) * L * K > done[s].routes.size()) continue;  // finished before step d
        ++rows;
        for (int64_t j = 0; j < K; ++j) {
          const uint16_t e = done[s].routes[(row * L + l) * K + j];
          if (e < c.experts && !seen[e]) {
            seen[e] = 1;
            ++distinct;
          }
        }
      }
      if (rows == 0) continue;
      sum += distinct;
      ++count;
    }
  return count > 0 ? sum / double(count) : 0;
}
Timed TimeGenerate(GpuGenerator& gen, const model::ModelConfig& c, int b, int prompt_len, int new_tokens,
                   std::mt19937_64& rng) {
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size) - 1);
  std::vector<std::vector<int32_t>> prompts(b, std::vector<int32_t>(prompt_len));
  for (auto& p : prompts)
    for (int32_t& t : p) t = tok(rng);
  model::SamplingOptions so;
  so.temperature = 0;
  so.max_new_tokens = 4;
  std::vector<std::vector<int32_t>> warm(b, std::vector<int32_t>(prompts[0].begin(), prompts[0].begin() + 2));
  GROVE_BENCH_CHECK_OK(gen.Generate(warm, so).status());
  const GpuGenerator::Stats before = gen.stats();
  so.max_new_tokens = new_tokens;
  auto done = gen.Generate(prompts, so);
  GROVE_BENCH_CHECK_OK(done.status());
  const GpuGenerator::Stats& after = gen.stats();
  Timed t;
  t.touched_experts = TouchedExperts(c, prompts, *done);
  t.delta.decode_seconds = after.decode_seconds - before.decode_seconds;
  t.delta.decode_steps = after.decode_steps - before.decode_steps;
  t.delta.prefill_seconds = after.prefill_seconds - before.prefill_seconds;
  t.delta.prefill_tokens = after.prefill_tokens - before.prefill_tokens;
  t.delta.generated_tokens = after.generated_tokens - before.generated_tokens;
  for (int i = 0; i < kDecodePhases; ++i)
    t.delta.decode_phase_seconds[i] = after.decode_phase_seconds[i] - before.decode_phase_seconds[i];
  // Tokens from decode steps: all but each sequence's first (sampled after its prefill).
  t.decode_tokens = double(t.delta.generated_tokens) - b;
  return t;
}

// A ms-per-step table: one column per head, one row per name (names[i]
// with values cols[c][first + i]), a "sum of <what>" row over every row
// shown, then the extra rows (label, one value per column).
void PrintStepTable(const char* what, const std::vector<std::string>& heads, const std::vector<std::string>& names,
                    int first, const std::vector<std::vector<double>>& cols,
                    const std::vector<std::pair<std::string, std::vector<double>>>& extra) {
  std::printf("| %s |", what);
  for (const std::string& h : heads) std::printf(" %s |", h.c_str());
  std::printf("\n| --- |");
  for (size_t i = 0; i < heads.size(); ++i) std::printf(" --- |");
  std::printf("\n");
  for (size_t r = 0; r < names.size(); ++r) {
    std::printf("| %s |", names[r].c_str());
    for (const auto& col : cols) std::printf(" %.3f |", col[first + r]);
    std::printf("\n");
  }
  std::printf("| sum of %ss |", what);
  for (const auto& col : cols) {
    double sum = 0;
    for (size_t r = 0; r < names.size(); ++r) sum += col[first + r];
    std::printf(" %.3f |", sum);
  }
  std::printf("\n");
  for (const auto& [label, values] : extra) {
    std::printf("| %s |", label.c_str());
    for (double v : values) std::printf(" %.3f |", v);
    std::printf("\n");
  }
}

// --step_stages: the persistent batch-1 step (graph) with its stage clock,
// one column per plan, ms per step per stage (block 0's view: a stage ends
// when block 0 leaves its grid barrier), with the step's wall time.
int RunStepStages(const model::ModelConfig& c, const model::Model& host) {
  GpuGeneratorOptions o;
  o.max_batch = 1;
  o.kv_memory_fraction = 0.3;
  o.persistent_decode = true;
  o.persistent_stage_clock = true;
  auto gen = GpuGenerator::Create(c, o);
  GROVE_BENCH_CHECK_OK(gen.status());
  std::mt19937_64 rng(FLAGS_seed);
  constexpr int kStages = int(kernels::DecodeStage::kCount);
  std::vector<std::string> heads;
  std::vector<std::vector<double>> cols;
  std::vector<double> walls;
  for (const std::string& plan : bench::SplitCommaList(FLAGS_plans)) {
    GROVE_BENCH_CHECK_OK((*gen)->LoadWeights(host.params(), Plan(plan)).status());
    const auto before = (*gen)->stats().persistent_stage_seconds;
    const Timed t = TimeGenerate(**gen, c, 1, FLAGS_prompt, 32, rng);
    const auto& after = (*gen)->stats().persistent_stage_seconds;
    const double steps = double(std::max<int64_t>(1, t.delta.decode_steps));
    std::vector<double> ms(kStages);
    for (int i = 0; i < kStages; ++i) ms[i] = (after[i] - before[i]) / steps * 1e3;
    heads.push_back(plan);
    cols.push_back(ms);
    walls.push_back(t.delta.decode_seconds / steps * 1e3);
  }
  std::printf("\npersistent batch-1 step by stage, ms per step (stage clock; %d-token prompts, 32 new)\n",
              FLAGS_prompt);
  std::vector<std::string> names;
  for (int st = 1; st < kStages; ++st) names.push_back(kernels::DecodeStageName(kernels::DecodeStage(st)));
  PrintStepTable("stage", heads, names, 1, cols, {{"step wall time (with the clock's copy)", walls}});
  return 0;
}

// --profile: one column per (plan, batch), one row per phase, ms per step.
int RunProfile(const model::ModelConfig& c, const model::Model& host) {
  const std::vector<int> batches = bench::ParseIntList(FLAGS_profile_batches);
  int max_batch = 1;
  for (int b : batches) max_batch = std::max(max_batch, b);
  std::mt19937_64 rng(FLAGS_seed);
  std::vector<std::string> heads;
  std::vector<std::vector<double>> cols;
  std::vector<double> totals, graph_totals;
  // Profiled (eager + events), then the same steps as a graph for reference.
  for (bool profiled : {true, false}) {
    GpuGeneratorOptions o;
    o.max_batch = max_batch;
    o.kv_memory_fraction = 0.3;
    o.profile_decode = profiled;
    auto gen = GpuGenerator::Create(c, o);
    GROVE_BENCH_CHECK_OK(gen.status());
    for (const std::string& plan : bench::SplitCommaList(FLAGS_plans)) {
      GROVE_BENCH_CHECK_OK((*gen)->LoadWeights(host.params(), Plan(plan)).status());
      for (int b : batches) {
        const Timed t = TimeGenerate(**gen, c, b, FLAGS_prompt, 32, rng);
        const double steps = double(std::max<int64_t>(1, t.delta.decode_steps));
        if (!profiled) {
          graph_totals.push_back(t.delta.decode_seconds / steps * 1e3);
          continue;
        }
        std::vector<double> ms(kDecodePhases);
        for (int i = 0; i < kDecodePhases; ++i) ms[i] = t.delta.decode_phase_seconds[i] / steps * 1e3;
        heads.push_back(plan + " b" + std::to_string(b));
        cols.push_back(ms);
        totals.push_back(t.delta.decode_seconds / steps * 1e3);
      }
    }
  }
  std::printf("\neager decode step by phase, ms per step (cudaEvents; a phase includes launch gaps before it)\n");
  std::vector<std::string> names;
  for (int p = 0; p < kDecodePhases; ++p) names.push_back(DecodePhaseName(DecodePhase(p)));
  PrintStepTable("phase", heads, names, 0, cols,
                 {{"step wall time (eager, profiled)", totals}, {"step wall time (graph, not profiled)", graph_totals}});
  return 0;
}

// The H100's measured weight-read ceiling, the yardstick of issue #9's 75%
// aim at batch 1: 3.03 TB/s, 1 GiB read by bulk copies (`quant_linear_bench`
// (a), session 23); 16-byte loads reach 2.83, the figure used before.
constexpr double kReadCeilingTBs = 3.03;

// The opt-in decode paths of GpuGeneratorOptions, each alone, then all.
struct Variant {
  const char* name;
  void (*set)(GpuGeneratorOptions&);
};
const Variant kVariants[] = {
    {"base (all off)", [](GpuGeneratorOptions&) {}},
    {"fold_shared_experts", [](GpuGeneratorOptions& o) { o.fold_shared_experts = SharedExpertFold::kAlways; }},
    {"fold_batch_one", [](GpuGeneratorOptions& o) { o.fold_shared_experts = SharedExpertFold::kBatchOne; }},
    {"one_launch_moe_index", [](GpuGeneratorOptions& o) { o.one_launch_moe_index = true; }},
    {"router_writes_routes", [](GpuGeneratorOptions& o) { o.router_writes_routes = true; }},
    {"gemv_rows_per_warp=1", [](GpuGeneratorOptions& o) { o.gemv_rows_per_warp = 1; }},
    {"gemv_rows_per_warp=4", [](GpuGeneratorOptions& o) { o.gemv_rows_per_warp = 4; }},
    {"split_kv", [](GpuGeneratorOptions& o) { o.split_kv_attention = true; }},
    {"programmatic_launch", [](GpuGeneratorOptions& o) { o.programmatic_launch = true; }},
    {"fuse_rmsnorm", [](GpuGeneratorOptions& o) { o.fuse_rmsnorm = true; }},
    {"fuse_rmsnorm+router_topk", [](GpuGeneratorOptions& o) {
       o.fuse_rmsnorm = true;
       o.fuse_router_topk = true;
     }},
    {"default", [](GpuGeneratorOptions& o) { o = GpuGeneratorOptions{}; }},
    {"programmatic_launch+fuse_rmsnorm", [](GpuGeneratorOptions& o) {
       o.programmatic_launch = true;
       o.fuse_rmsnorm = true;
     }},
    {"default+router_topk", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.fuse_router_topk = true;
     }},
    {"default-append_attention", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.fuse_append_attention = false;
     }},
    {"default-cublas", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.cublas_min_rows = 0;
     }},
    {"default+cublas=64", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.cublas_min_rows = 64;
     }},
    {"default+cublas=128", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.cublas_min_rows = 128;
     }},
    {"default-programmatic_launch", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.programmatic_launch = false;
     }},
    {"default-fold_batch_one", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.fold_shared_experts = SharedExpertFold::kNever;
     }},
    {"default-short_context", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.split_kv_short_context = 0;
     }},
    {"default-split_kv_tiled", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.split_kv_tiled = false;
     }},
    {"default+persistent", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.persistent_decode = true;
     }},
    {"default+moe_mma=1", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.moe_mma_min_slots_per_expert = 1;
     }},
    {"default+moe_tiles=1", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.moe_mma_tiles_per_block = 1;
     }},
    {"default+moe_tiles=4", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.moe_mma_tiles_per_block = 4;
     }},
    {"default-moe_paired_up", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.moe_mma_paired_up_max_tokens = 0;
     }},
    {"default+moe_paired_up_always", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.moe_mma_paired_up_max_tokens = 1 << 20;
     }},
    {"default+moe_mma=4", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.moe_mma_min_slots_per_expert = 4;
     }},
    {"default-moe_prefetch", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.moe_prefetch_rows = false;
     }},
    {"default-narrow_tiles", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.moe_mma_tiles_per_block_narrow = 0;
     }},
    {"default-combine_norm", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.fuse_combine_norm = false;
     }},
    {"default-shared_stream", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.shared_experts_stream = false;
     }},
    {"default+fold_always", [](GpuGeneratorOptions& o) {
       o = GpuGeneratorOptions{};
       o.fold_shared_experts = SharedExpertFold::kAlways;
     }},
    {"all", [](GpuGeneratorOptions& o) {
       o.fold_shared_experts = SharedExpertFold::kAlways;
       o.one_launch_moe_index = true;
       o.router_writes_routes = true;
       o.split_kv_attention = true;
     }},
};

// Every variant starts from all opt-in paths off, so each row measures its
// own path against that base whatever the defaults are.
void AllPathsOff(GpuGeneratorOptions& o) {
  o.fold_shared_experts = SharedExpertFold::kNever;
  o.one_launch_moe_index = false;
  o.router_writes_routes = false;
  o.split_kv_attention = false;
  o.programmatic_launch = false;
  o.fuse_rmsnorm = false;
  o.fuse_router_topk = false;
  o.fuse_append_attention = false;
  o.persistent_decode = false;
  o.cublas_min_rows = 0;
  o.shared_experts_stream = false;
  o.moe_prefetch_rows = false;
  o.fuse_combine_norm = false;
  o.moe_mma_tiles_per_block_narrow = 0;
}

// --variants: rows (variant, plan), columns ms/step per batch (x speedup
// over base on the same plan and batch); with --variant_repeats, then the
// medians over the repeats.
int RunVariants(const model::ModelConfig& c, const model::Model& host) {
  const std::vector<int> batches = bench::ParseIntList(FLAGS_variant_batches);
  const std::vector<std::string> plans = bench::SplitCommaList(FLAGS_plans);
  const int repeats = std::max(1, FLAGS_variant_repeats);
  int max_batch = 1;
  for (int b : batches) max_batch = std::max(max_batch, b);
  std::mt19937_64 rng(FLAGS_seed);
  const std::vector<std::string> only = bench::SplitCommaList(FLAGS_variant_names);
  std::vector<const Variant*> picked;
  for (const Variant& v : kVariants) {
    const std::string name = v.name;
    if (&v == &kVariants[0] || only.empty() || std::any_of(only.begin(), only.end(), [&](const std::string& w) {
          return w[0] == '=' ? name == w.substr(1) : name.find(w) != std::string::npos;
        }))
      picked.push_back(&v);
  }
  // ms[variant][plan][batch]: one entry per repeat.
  std::vector<std::vector<std::vector<std::vector<double>>>> ms(
      picked.size(), std::vector<std::vector<std::vector<double>>>(plans.size(),
                                                                  std::vector<std::vector<double>>(batches.size())));
  auto header = [&](const char* what) {
    std::printf("\n%s\n| variant | plan |", what);
    for (int b : batches) std::printf(" b%d |", b);
    std::printf("\n| --- | --- |");
    for (size_t i = 0; i < batches.size(); ++i) std::printf(" --- |");
    std::printf("\n");
  };
  char title[256];
  std::snprintf(title, sizeof(title),
                "decode ms/step (graphs on) per opt-in path (x speedup over base; weight GB/s read = StepWeightBytes / "
                "step, %% of the %.2f TB/s read ceiling)",
                kReadCeilingTBs);
  header(title);
  for (int r = 0; r < repeats; ++r)
    for (size_t vi = 0; vi < picked.size(); ++vi) {
      const Variant& v = *picked[vi];
      GpuGeneratorOptions o;
      AllPathsOff(o);
      v.set(o);
      o.max_batch = max_batch;
      o.kv_memory_fraction = 0.1;
      auto gen = GpuGenerator::Create(c, o);
      GROVE_BENCH_CHECK_OK(gen.status());
      for (size_t p = 0; p < plans.size(); ++p) {
        GROVE_BENCH_CHECK_OK((*gen)->LoadWeights(host.params(), Plan(plans[p])).status());
        std::printf("| %s | %s |", v.name, plans[p].c_str());
        for (size_t i = 0; i < batches.size(); ++i) {
          const Timed t = TimeGenerate(**gen, c, batches[i], FLAGS_prompt, 32, rng);
          const double step_ms = t.delta.decode_seconds / double(std::max<int64_t>(1, t.delta.decode_steps)) * 1e3;
          ms[vi][p][i].push_back(step_ms);
          const double base = ms[0][p][i].back();  // this repeat's base (row 0 runs first)
          const double gbs =
              step_ms > 0 ? StepWeightBytes(host, Plan(plans[p]), t.touched_experts) / (step_ms * 1e-3) / 1e9 : 0;
          std::printf(" %.3f (%.2fx, %.0f GB/s, %.1f%%) |", step_ms, step_ms > 0 ? base / step_ms : 0, gbs,
                      100.0 * gbs / (kReadCeilingTBs * 1e3));
          std::fflush(stdout);
        }
        std::printf("\n");
      }
      if (!(*gen)->stats().graphs_used) std::printf("(%s: graph capture failed, eager)\n", v.name);
    }
  if (repeats == 1) return 0;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  // The defaults' row, where picked: options on top of the defaults are
  // judged against it (each repeat's ratio, then the median).
  size_t defaults = 0;
  for (size_t vi = 0; vi < picked.size(); ++vi)
    if (std::string(picked[vi]->name) == "default") defaults = vi;
  std::snprintf(title, sizeof(title),
                "medians over %d repeats: ms/step (median of each repeat's speedup over its base%s; min-max ms)",
                repeats, defaults ? ", then over its default row" : "");
  header(title);
  for (size_t vi = 0; vi < picked.size(); ++vi)
    for (size_t p = 0; p < plans.size(); ++p) {
      std::printf("| %s | %s |", picked[vi]->name, plans[p].c_str());
      for (size_t i = 0; i < batches.size(); ++i) {
        const std::vector<double>& m = ms[vi][p][i];
        std::vector<double> speedup, over_defaults;
        for (size_t r = 0; r < m.size(); ++r) {
          speedup.push_back(m[r] > 0 ? ms[0][p][i][r] / m[r] : 0);
          over_defaults.push_back(m[r] > 0 ? ms[defaults][p][i][r] / m[r] : 0);
        }
        std::printf(" %.3f (%.3fx", median(m), median(speedup));
        if (defaults) std::printf(", %.3fx", median(over_defaults));
        std::printf("; %.3f-%.3f) |", *std::min_element(m.begin(), m.end()), *std::max_element(m.begin(), m.end()));
      }
      std::printf("\n");
    }
  return 0;
}

// A precision plan for the model's weights, measured as a GPU worker does
// (its own engine and GPU copy of the model, both freed before the timed
// engines are made): the time each phase took printed.
void MeasurePlan(const model::ModelConfig& c, const model::Model& host, std::mt19937_64& rng) {
  auto t0 = Clock::now();
  GpuGeneratorOptions o;
  o.max_batch = FLAGS_plan_sequences;
  o.kv_memory_fraction = 0.1;
  auto gen = GpuGenerator::Create(c, o);
  GROVE_BENCH_CHECK_OK(gen.status());
  GpuGenerator* engine = gen->get();
  auto m = GpuPlanMeasurer::Create(c, 0,
                                   [engine](const float*, std::span<const float> w, const std::vector<std::vector<int32_t>>& ps,
                                            const model::SamplingOptions& so)
                                       -> Result<std::vector<model::Completion<float>>> {
                                     GROVE_RETURN_IF_ERROR(engine->LoadWeights(w, nullptr).status());
                                     return engine->Generate(ps, so);
                                   });
  GROVE_BENCH_CHECK_OK(m.status());
  const double setup_s = Since(t0);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size) - 1);
  std::vector<std::vector<int32_t>> prompts(FLAGS_plan_sequences, std::vector<int32_t>(FLAGS_prompt));
  for (auto& p : prompts)
    for (int32_t& t : p) t = tok(rng);
  auto tc = Clock::now();
  auto calib = (*m)->Calibrate(host.params(), prompts, FLAGS_plan_new_tokens, /*stop_token=*/0, FLAGS_seed);
  GROVE_BENCH_CHECK_OK(calib.status());
  std::vector<PlanUnit> units = PlanUnits(c);
  GROVE_BENCH_CHECK_OK((*m)->MeasureUnitErrors(*calib, units));
  GROVE_BENCH_CHECK_OK(ChooseFormats(FLAGS_plan_bits, units));
  const double plan_s = Since(tc);
  const PrecisionPlan plan{FLAGS_plan_bits, std::move(units)};
  int64_t rows = 0;
  for (const model::ScoreRequest& r : *calib) rows += int64_t(r.tokens.size()) - 1;
  std::printf("measured plan at %.2f b/w: %s in %.2f s on GPU 0 (%zu sequences, %lld rows: sampling %.2f s, kept "
              "forward %.3f s, local errors %.3f s, per-layer KL %.3f s; engine + model copy set up in %.1f s)\n",
              FLAGS_plan_bits, plan.Summary().c_str(), plan_s, calib->size(), (long long)rows,
              (*m)->sample_seconds(), (*m)->timing().forward_s, (*m)->timing().local_s, (*m)->timing().kl_s, setup_s);
  measured_plan = plan.Chooser();
}

int Run() {
  auto mc = model::ModelConfig::LoadFile(FLAGS_config);
  GROVE_BENCH_CHECK_OK(mc.status());
  const model::ModelConfig& c = *mc;
  const int new_tokens = FLAGS_quick ? 32 : FLAGS_new_tokens;
  const bool graphs_off = FLAGS_graphs_off && !FLAGS_quick;
  if (FLAGS_prompt < 2 || FLAGS_prompt + new_tokens > c.max_seq_len) {
    std::fprintf(stderr, "decode_bench: need 2 <= --prompt and --prompt + new tokens <= max_seq_len\n");
    return 2;
  }
  if (GpuGenerator::DeviceCount() == 0) {
    std::printf("decode_bench: no CUDA device, nothing to measure\n");
    return 0;
  }
  auto t0 = Clock::now();
  auto host = model::Model::Create(c, FLAGS_seed, /*random_init=*/false);
  GROVE_BENCH_CHECK_OK(host.status());
  bench::FastInit(**host, FLAGS_seed);
  std::printf("model %s: %lld parameters, init %.1f s; prompt %d, %d new tokens, greedy\n", FLAGS_config.c_str(),
              (long long)(*host)->layout().total(), Since(t0), FLAGS_prompt, new_tokens);
  std::mt19937_64 plan_rng(FLAGS_seed + 1);
  for (const std::string& p : bench::SplitCommaList(FLAGS_plans))
    if (p == "plan" && !measured_plan) MeasurePlan(c, **host, plan_rng);
  // --profile and --variants replace the throughput table (both: both, one model init).
  if (FLAGS_step_stages) return RunStepStages(c, **host);
  if (FLAGS_profile || FLAGS_variants) {
    if (FLAGS_profile) RunProfile(c, **host);
    if (FLAGS_variants) RunVariants(c, **host);
    return 0;
  }
  const std::vector<int> batches = bench::ParseIntList(FLAGS_batches);
  int max_batch = 1;
  for (int b : batches) max_batch = std::max(max_batch, b);
  std::mt19937_64 rng(FLAGS_seed);

  // The fp32 weights on the device too, as a weight receive buffer holds
  // them: LoadWeightsFromDevice's re-quantization time per plan.
  float* dev_params = nullptr;
  const size_t param_bytes = (*host)->params().size() * sizeof(float);
  if (cudaMalloc(reinterpret_cast<void**>(&dev_params), param_bytes) != cudaSuccess ||
      cudaMemcpy(dev_params, (*host)->params().data(), param_bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
    std::fprintf(stderr, "decode_bench: cannot stage the weights on the device\n");
    return 1;
  }
  std::printf(
      "\n| plan | graphs | batch | decode tok/s | ms/step | prefill tok/s | weight GB/step | weight TB/s | experts "
      "/ MoE layer |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  std::vector<std::string> load_lines;
  for (bool graphs : {true, false}) {
    if (!graphs && !graphs_off) continue;
    GpuGeneratorOptions o;
    o.max_batch = max_batch;
    o.kv_memory_fraction = 0.3;
    o.cuda_graphs = graphs;
    auto gen = GpuGenerator::Create(c, o);
    GROVE_BENCH_CHECK_OK(gen.status());
    for (const std::string& plan : bench::SplitCommaList(FLAGS_plans)) {
      const FormatChooser choose = Plan(plan);
      auto secs = (*gen)->LoadWeights((*host)->params(), choose);
      GROVE_BENCH_CHECK_OK(secs.status());
      auto dev_secs = (*gen)->LoadWeightsFromDevice(dev_params, choose);
      GROVE_BENCH_CHECK_OK(dev_secs.status());
      load_lines.push_back("plan " + plan + ": LoadWeights (host fp32) " + std::to_string(*secs) +
                           " s, LoadWeightsFromDevice (re-quantize on the GPU) " + std::to_string(*dev_secs) + " s");
      for (int b : batches) {
        const Timed t = TimeGenerate(**gen, c, b, FLAGS_prompt, new_tokens, rng);
        const double dsec = t.delta.decode_seconds;
        const int64_t steps = t.delta.decode_steps;
        const double dtok = t.decode_tokens;
        const double psec = t.delta.prefill_seconds;
        const double ptok = double(t.delta.prefill_tokens);
        const double step_s = steps > 0 ? dsec / double(steps) : 0;
        const double wbytes = StepWeightBytes(**host, choose, t.touched_experts);
        std::printf("| %s | %s | %d | %.0f | %.3f | %.0f | %.3f | %.2f | %.1f |\n", plan.c_str(), graphs ? "on" : "off",
                    b, dsec > 0 ? dtok / dsec : 0, step_s * 1e3, psec > 0 ? ptok / psec : 0, wbytes / 1e9,
                    step_s > 0 ? wbytes / step_s / 1e12 : 0, t.touched_experts);
        std::fflush(stdout);
      }
    }
    if (graphs && !(*gen)->stats().graphs_used) std::printf("(graph capture failed: the 'on' rows ran eagerly)\n");
    const GpuGenerator::Stats& st = (*gen)->stats();
    std::printf("KV pool: %lld pages, peak %lld\n", (long long)st.kv_pages_total, (long long)st.kv_pages_peak);
  }
  std::printf("\n");
  for (const std::string& l : load_lines) std::printf("%s\n", l.c_str());
  cudaFree(dev_params);
  return 0;
}

}  // namespace
}  // namespace grove::rollout

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  return grove::rollout::Run();
}
