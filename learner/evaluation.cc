#include "learner/evaluation.h"

#include <algorithm>
#include <chrono>

#include "model/prompt_format.h"
#include "reward/composite_verifier.h"

namespace grove::learner {

Result<EvalResult> EvaluateHeldOut(model::Model& model, const model::Tokenizer& tokenizer,
                                   const reward::Task& task, const reward::VerifierRegistry& registry,
                                   const EvalOptions& options) {
  return EvaluateHeldOut(
      [&model](const std::vector<std::vector<int32_t>>& prompts, const model::SamplingOptions& sampling) {
        return model.Generate(prompts, sampling);
      },
      tokenizer, task, registry, options);
}

Result<EvalResult> EvaluateHeldOut(const GenerateFn& generate, const model::Tokenizer& tokenizer,
                                   const reward::Task& task, const reward::VerifierRegistry& registry,
                                   const EvalOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (options.problems < 1 || options.batch < 1 || options.max_new_tokens < 1)
    return Status::InvalidArgument("eval needs problems, batch and max_new_tokens >= 1");
  GROVE_ASSIGN_OR_RETURN(std::vector<reward::WeightedVerifier> spec,
                         reward::ParseVerifierSpec(task.verifier_spec()));
  if (spec.empty()) return Status::InvalidArgument("task '" + std::string(task.name()) + "' has no verifiers");
  const auto main_it = std::max_element(spec.begin(), spec.end(),
                                        [](const auto& a, const auto& b) { return a.weight < b.weight; });
  EvalResult res;
  res.accuracy_verifier = main_it->name;
  const bool has_format =
      std::any_of(spec.begin(), spec.end(), [](const auto& w) { return w.name == "format"; });
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<reward::Verifier> verifier,
                         reward::MakeCompositeVerifier(registry, spec));

  model::SamplingOptions sampling;
  sampling.temperature = 0;  // greedy: accuracy of the policy's mode
  sampling.max_new_tokens = options.max_new_tokens;
  sampling.stop_tokens = {tokenizer.eos_id()};
  int64_t correct = 0, formatted = 0;
  double reward_sum = 0;
  for (int64_t b = 0; b < options.problems; b += options.batch) {
    const int64_t e = std::min(options.problems, b + options.batch);
    std::vector<reward::Problem> problems;
    std::vector<std::vector<int32_t>> prompts;
    for (int64_t i = b; i < e; ++i) {
      problems.push_back(task.Generate(reward::Split::kEval, static_cast<uint64_t>(i)));
      GROVE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, model::EncodePrompt(tokenizer, problems.back().prompt));
      prompts.push_back(std::move(ids));
    }
    GROVE_ASSIGN_OR_RETURN(auto completions, generate(prompts, sampling));
    if (completions.size() != prompts.size())
      return Status::Internal("eval: " + std::to_string(completions.size()) + " completions for " +
                              std::to_string(prompts.size()) + " prompts");
    for (size_t i = 0; i < completions.size(); ++i) {
      GROVE_ASSIGN_OR_RETURN(std::string text, model::DecodeCompletion(tokenizer, completions[i].tokens));
      reward::VerifyInput in;
      in.prompt = problems[i].prompt;
      in.completion = text;
      in.reference = problems[i].reference;
      in.token_count = static_cast<long long>(completions[i].tokens.size());
      reward::VerifyOutput out = verifier->Verify(in);
      reward_sum += out.reward;
      for (const reward::SubScore& s : out.scores) {
        if (s.name == res.accuracy_verifier && s.value >= 0.999) ++correct;
        if (has_format && s.name == "format" && s.value >= 0.999) ++formatted;
      }
      if (res.samples.size() < 4) res.samples.push_back(problems[i].prompt + " -> " + text);
    }
  }
  res.problems = options.problems;
  res.accuracy = static_cast<double>(correct) / options.problems;
  res.reward_mean = reward_sum / options.problems;
  res.format_rate = static_cast<double>(formatted) / options.problems;
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace grove::learner
