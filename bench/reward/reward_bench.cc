// Scoring throughput: samples per second on one core in-process, for the
// rule set (format+exact on arithmetic) and the GiNaC set (format+symbolic on
// the symbolic task), then through the ScoringPool with 1 and 2 workers.
// Half the completions are the task's demonstration, half have a wrong answer,
// as in early RL. Usage: reward_bench [samples_per_case]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "reward/composite_verifier.h"
#include "reward/scoring_pool.h"
#include "reward/task.h"

namespace {

using namespace grove::reward;
using Clock = std::chrono::steady_clock;

struct Samples {
  std::vector<Problem> problems;
  std::vector<std::string> completions;
  std::vector<VerifyInput> inputs;
};

Samples Make(const std::string& task_name, int n) {
  auto task = MakeTask(task_name, grove::Config());
  if (!task.ok()) {
    std::fprintf(stderr, "%s\n", task.status().ToString().c_str());
    std::exit(1);
  }
  Samples s;
  for (int i = 0; i < n; ++i) {
    s.problems.push_back((*task)->Generate(Split::kTrain, static_cast<uint64_t>(i)));
    std::string c = s.problems.back().demonstration;
    if (i % 2) c.insert(c.find("</answer>"), "+1");
    s.completions.push_back(std::move(c));
  }
  for (int i = 0; i < n; ++i) {
    s.inputs.push_back(VerifyInput{s.problems[i].prompt, s.completions[i], s.problems[i].reference});
  }
  return s;
}

std::shared_ptr<const Verifier> MakeVerifier(const std::string& spec) {
  VerifierRegistry registry;
  auto v = MakeCompositeVerifier(registry, *ParseVerifierSpec(spec));
  if (!v.ok()) std::exit(1);
  return std::shared_ptr<const Verifier>(std::move(*v));
}

double Rate(size_t n, Clock::time_point start) {
  return static_cast<double>(n) / std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 4000;
  struct Case {
    const char* label;
    const char* task;
    const char* spec;
  } cases[] = {
      {"format+exact (arithmetic)", "arithmetic", "format:0.1,exact:1"},
      {"format+symbolic (GiNaC)", "symbolic", "format:0.1,symbolic:1"},
  };
  std::printf("%-28s %16s %16s %16s\n", "verifier set", "in-process/s", "pool 1 worker/s", "pool 2 workers/s");
  for (const Case& c : cases) {
    Samples s = Make(c.task, n);
    auto verifier = MakeVerifier(c.spec);
    double sum = 0;
    auto start = Clock::now();
    for (const VerifyInput& in : s.inputs) sum += verifier->Verify(in).reward;
    double in_process = Rate(s.inputs.size(), start);
    double pooled[2];
    for (int workers = 1; workers <= 2; ++workers) {
      ScoringPoolOptions options;
      options.num_workers = workers;
      auto pool = ScoringPool::Start(verifier, options);
      if (!pool.ok()) return 1;
      (*pool)->Score(std::vector<VerifyInput>(s.inputs.begin(), s.inputs.begin() + 8));  // warm the workers
      start = Clock::now();
      std::vector<VerifyOutput> out = (*pool)->Score(s.inputs);
      pooled[workers - 1] = Rate(out.size(), start);
    }
    std::printf("%-28s %16.0f %16.0f %16.0f   (mean reward %.3f)\n", c.label, in_process, pooled[0], pooled[1],
                sum / static_cast<double>(s.inputs.size()));
  }
  return 0;
}
