// `grove eval`: held-out accuracy of any checkpoint, in this process.
#include <cstdio>
#include <filesystem>

#include "base/config.h"
#include "cluster/cli_flags.h"
#include "cluster/commands.h"
#include "learner/evaluation.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "reward/registry.h"
#include "reward/task.h"

namespace grove::cli {

int CmdEval(int argc, char** argv) {
  std::string checkpoint, task_name, config_path;
  int64_t n = 200, max_new_tokens = 32, batch = 32;
  FlagSet flags("grove eval --checkpoint DIR [--task NAME] [--n N] [--config FILE]",
                "Greedy completions of the task's held-out problems from a checkpoint, scored by the\n"
                "task's verifiers. Prints accuracy (the answer check at full marks), mean reward and\n"
                "the format rate. The task's settings come from --config's [task] section (a run\n"
                "directory's config.toml), else from the task's defaults.");
  flags.String("checkpoint", &checkpoint, "checkpoint directory (holds model.safetensors) or the .safetensors file");
  flags.String("task", &task_name, "task name (default: the config's [task] name, else arithmetic)");
  flags.Int("n", &n, "held-out problems to score");
  flags.String("config", &config_path, "experiment config whose [task] section to use");
  flags.Int("max_new_tokens", &max_new_tokens, "longest completion");
  flags.Int("batch", &batch, "sequences generated together");
  Status parsed = flags.Parse(argc, argv, 2);
  if (flags.help()) {
    std::printf("%s", flags.Usage().c_str());
    return 0;
  }
  auto fail = [](const Status& s) {
    std::fprintf(stderr, "grove eval: %s\n", s.ToString().c_str());
    return 1;
  };
  if (!parsed.ok()) {
    std::fprintf(stderr, "grove eval: %s\n%s", parsed.ToString().c_str(), flags.Usage().c_str());
    return 2;
  }
  if (checkpoint.empty()) {
    std::fprintf(stderr, "grove eval: --checkpoint is required\n%s", flags.Usage().c_str());
    return 2;
  }
  if (n < 1 || max_new_tokens < 1 || batch < 1) return fail(Status::InvalidArgument("--n, --max_new_tokens and --batch must be >= 1"));
  Config config;
  if (!config_path.empty()) {
    Result<Config> c = Config::LoadFile(config_path);
    if (!c.ok()) return fail(c.status());
    config = *c;
  }
  Config task_cfg = config.Section("task");
  if (task_name.empty()) task_name = task_cfg.String("name", "arithmetic").value_or("arithmetic");
  Result<std::unique_ptr<reward::Task>> task = reward::MakeTask(task_name, task_cfg);
  if (!task.ok()) return fail(task.status());
  std::string file = checkpoint;
  if (std::filesystem::is_directory(file)) file += "/model.safetensors";
  Result<std::unique_ptr<model::Model>> m = model::LoadModel(file);
  if (!m.ok()) return fail(m.status());
  model::CharTokenizer tok;
  reward::VerifierRegistry registry;
  learner::EvalOptions opt;
  opt.problems = n;
  opt.max_new_tokens = max_new_tokens;
  opt.batch = batch;
  Result<learner::EvalResult> r = learner::EvaluateHeldOut(**m, tok, **task, registry, opt);
  if (!r.ok()) return fail(r.status());
  std::printf("task %s, %lld held-out problems, checkpoint %s\n", task_name.c_str(),
              static_cast<long long>(r->problems), file.c_str());
  std::printf("accuracy %.3f (%s at full marks)  reward %.3f  format %.3f  (%.1f s)\n", r->accuracy,
              r->accuracy_verifier.c_str(), r->reward_mean, r->format_rate, r->seconds);
  for (const std::string& s : r->samples) std::printf("  %s\n", s.c_str());
  return 0;
}

}  // namespace grove::cli
