// Held-out accuracy: greedy completions of a task's eval split, scored by the
// task's own verifiers in this process. "Correct" means the task's
// highest-weighted verifier (the answer check; format is weighted lower)
// gave full marks. Used by the learner after warm-start and every few steps,
// and by `grove eval` on any checkpoint.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/result.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "reward/registry.h"
#include "reward/task.h"

namespace grove::learner {

struct EvalOptions {
  int64_t problems = 64;        // eval-split problems 0..n-1
  int64_t max_new_tokens = 48;
  int64_t batch = 32;           // sequences generated together
};

struct EvalResult {
  int64_t problems = 0;
  double accuracy = 0;          // fraction fully correct
  double reward_mean = 0;       // the task's composite reward
  double format_rate = 0;       // fraction with the "format" verifier at full marks (when present)
  std::string accuracy_verifier;
  std::vector<std::string> samples;  // the first few "prompt -> completion" lines
  double seconds = 0;
};

// Whatever completes a batch of prompts (the CPU model's Generate, a GPU
// engine's): greedy, as EvaluateHeldOut's options say.
using GenerateFn = std::function<Result<std::vector<model::Completion<float>>>(
    const std::vector<std::vector<int32_t>>& prompts, const model::SamplingOptions& options)>;

Result<EvalResult> EvaluateHeldOut(const GenerateFn& generate, const model::Tokenizer& tokenizer,
                                   const reward::Task& task, const reward::VerifierRegistry& registry,
                                   const EvalOptions& options);
// On the CPU model itself.
Result<EvalResult> EvaluateHeldOut(model::Model& model, const model::Tokenizer& tokenizer,
                                   const reward::Task& task, const reward::VerifierRegistry& registry,
                                   const EvalOptions& options);

}  // namespace grove::learner
