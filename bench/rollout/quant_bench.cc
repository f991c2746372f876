// Weight formats of the rollout worker on the CPU: for the default model and
// configs/model/tiny.toml (random init), and --checkpoint's trained model,
// each of int8, int4
// and the precision plan at 4.5 / 5 / 6 bits: bits per weight (FFN units and
// whole model), mismatch against full precision (mean KL per token from the
// full log-softmax, and the share of tokens whose routed experts differ) on
// a calibration batch of task prompts the plan never saw, and the time to
// quantize and to make the plan.
//
//   build/bench/quant_bench [--checkpoint=run/checkpoints/latest/model.safetensors]
#include <chrono>
#include <cstdio>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "base/config.h"
#include "model/checkpoint.h"
#include "model/prompt_format.h"
#include "model/tokenizer.h"
#include "reward/task.h"
#include "rollout/policy_quantizer.h"

DEFINE_string(checkpoint, "", "also a model loaded from this checkpoint (trained weights)");
DEFINE_int32(sequences, 8, "calibration prompts (plan) and held-out prompts (mismatch)");
DEFINE_int32(max_new_tokens, 32, "completion tokens sampled per prompt");
DEFINE_string(plan_bits, "4.5,5,6", "plan budgets to measure, comma-separated");
DEFINE_bool(units, false, "print every unit of each plan: rows seen, error per format, choice");
DEFINE_string(task, "arithmetic", "task the prompts come from");

namespace grove::rollout {
namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int Run() {
  const char* root = std::getenv("GROVE_SOURCE_DIR");
  const std::string src = root ? root : ".";
  model::CharTokenizer tok;
  auto task = reward::MakeTask(FLAGS_task, Config());
  if (!task.ok()) { std::fprintf(stderr, "%s\n", task.status().ToString().c_str()); return 1; }
  std::vector<std::vector<int32_t>> plan_prompts, test_prompts;
  for (int i = 0; i < 2 * FLAGS_sequences; ++i) {
    auto p = model::EncodePrompt(tok, (*task)->Generate(reward::Split::kTrain, uint64_t(i)).prompt);
    if (!p.ok()) { std::fprintf(stderr, "%s\n", p.status().ToString().c_str()); return 1; }
    (i < FLAGS_sequences ? plan_prompts : test_prompts).push_back(*p);
  }
  struct Named { std::string name; std::unique_ptr<model::Model> m; };
  std::vector<Named> models;
  {
    auto cfg = Config::LoadFile(src + "/configs/default.toml");
    auto mc = cfg.ok() ? model::ModelConfig::FromConfig(cfg->Section("model")) : Result<model::ModelConfig>(cfg.status());
    if (!mc.ok()) { std::fprintf(stderr, "%s\n", mc.status().ToString().c_str()); return 1; }
    models.push_back({"default", std::move(*model::Model::Create(*mc, 1))});
    auto tc = model::ModelConfig::LoadFile(src + "/configs/model/tiny.toml");
    if (!tc.ok()) { std::fprintf(stderr, "%s\n", tc.status().ToString().c_str()); return 1; }
    models.push_back({"tiny", std::move(*model::Model::Create(*tc, 1))});
    if (!FLAGS_checkpoint.empty()) {  // trained weights, with the file's own config
      auto m = model::LoadModel(FLAGS_checkpoint);
      if (!m.ok()) { std::fprintf(stderr, "%s\n", m.status().ToString().c_str()); return 1; }
      models.push_back({"checkpoint", std::move(*m)});
    }
  }
  std::printf("%-13s %-9s %8s %8s %11s %9s %10s %9s\n", "model", "format", "ffn b/w", "all b/w", "KL/token",
              "routes%", "quant ms", "plan s");
  for (Named& nm : models) {
    model::Model& m = *nm.m;
    std::vector<actors::TensorSpec> specs;
    for (const auto& t : m.layout().tensors()) specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
    const std::vector<float> full(m.params().begin(), m.params().end());
    auto held_out = CalibrationBatch(m, test_prompts, FLAGS_max_new_tokens, tok.eos_id(), 12345);
    if (!held_out.ok()) { std::fprintf(stderr, "%s\n", held_out.status().ToString().c_str()); return 1; }
    struct Row { std::string name; QuantizeMode mode; double bits; };
    std::vector<Row> rows = {{"int8", QuantizeMode::kInt8, 0}, {"int4", QuantizeMode::kInt4, 0}};
    for (size_t at = 0; at < FLAGS_plan_bits.size();) {
      const size_t comma = std::min(FLAGS_plan_bits.find(',', at), FLAGS_plan_bits.size());
      const std::string b = FLAGS_plan_bits.substr(at, comma - at);
      rows.push_back({"plan " + b, QuantizeMode::kPlan, std::atof(b.c_str())});
      at = comma + 1;
    }
    for (const Row& row : rows) {
      QuantizeSettings s;
      s.mode = row.mode;
      if (row.bits > 0) s.plan_bits = row.bits;
      s.plan_max_new_tokens = FLAGS_max_new_tokens;
      PolicyQuantizer q(s, plan_prompts, tok.eos_id());
      std::vector<float> flat = full;
      Status st = q.Install(1, specs, flat, m);
      if (!st.ok()) { std::fprintf(stderr, "%s %s: %s\n", nm.name.c_str(), row.name.c_str(), st.ToString().c_str()); return 1; }
      // Quantize time: a second install of the same weights (plan mode:
      // the plan is not due again, so this is the quantization alone).
      flat = full;
      const auto t0 = std::chrono::steady_clock::now();
      st = q.Install(2, specs, flat, m);
      const double quant_ms = 1e3 * Seconds(t0);
      if (!st.ok() || q.plans_made() > 1) { std::fprintf(stderr, "second install: %s\n", st.ToString().c_str()); return 1; }
      double ffn_bits = 0;
      if (q.plan()) {
        ffn_bits = q.plan()->bits_per_weight();
      } else {
        PrecisionPlan uniform{0, PlanUnits(m.config())};
        for (PlanUnit& u : uniform.units) u.format = row.mode == QuantizeMode::kInt8 ? PrecisionFormat::kInt8 : PrecisionFormat::kInt4;
        ffn_bits = uniform.bits_per_weight();
      }
      auto mm = MeasureMismatch(m, full, *held_out);
      if (!mm.ok()) { std::fprintf(stderr, "%s\n", mm.status().ToString().c_str()); return 1; }
      char plan_s[16] = "-";
      if (q.plan()) std::snprintf(plan_s, sizeof plan_s, "%.3f", q.plan_seconds());
      std::printf("%-13s %-9s %8.3f %8.3f %11.3e %8.2f%% %10.1f %9s\n", nm.name.c_str(), row.name.c_str(), ffn_bits,
                  q.report().bits_per_weight, mm->mean_kl, 100 * mm->routes_differ, quant_ms, plan_s);
      if (q.plan()) std::printf("%-13s %-9s   %s\n", "", "", q.plan()->Summary().c_str());
      if (q.plan() && FLAGS_units)
        for (const PlanUnit& u : q.plan()->units)
          std::printf("    %-28s rows %5lld  err int4 %.3e int8 %.3e bf16 %.3e  -> %s\n", u.name.c_str(),
                      static_cast<long long>(u.rows_seen), u.error[0], u.error[1], u.error[2],
                      std::string(FormatName(u.format)).c_str());
    }
    std::copy(full.begin(), full.end(), m.params().begin());
  }
  return 0;
}

}  // namespace
}  // namespace grove::rollout

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  FLAGS_minloglevel = 1;  // the plan's INFO line repeats the table
  google::InitGoogleLogging(argv[0]);
  return grove::rollout::Run();
}
