// learner::EvaluateHeldOut over a generator the test controls (the CPU
// model's and the GPU engine's own generation are tested against each other
// in tests/rollout; here what matters is what the evaluation makes of
// completions): which problems it asks for, with which sampling options and
// batches, how it scores and counts, and its refusals.
#include "learner/evaluation.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "base/config.h"
#include "model/prompt_format.h"
#include "model/tokenizer.h"
#include "reward/registry.h"
#include "reward/task.h"

namespace grove::learner {
namespace {

class EvaluationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto cfg = Config::Parse("seed = 7\nops = \"+-\"\n");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    auto task = reward::MakeTask("arithmetic", *cfg);
    ASSERT_TRUE(task.ok()) << task.status();
    task_ = std::move(*task);
  }

  // A generator answering eval problem i (recognised by its prompt) with
  // answer(i, problem): the demonstration, a wrong answer or text without
  // the format. Records the batch sizes and options it was called with.
  GenerateFn Answering(std::function<std::string(int64_t, const reward::Problem&)> answer, int64_t problems) {
    std::map<std::vector<int32_t>, int64_t> index;
    for (int64_t i = 0; i < problems; ++i) {
      auto ids = model::EncodePrompt(tok_, task_->Generate(reward::Split::kEval, uint64_t(i)).prompt);
      EXPECT_TRUE(ids.ok());
      index[*ids] = i;
    }
    return [this, index, answer](const std::vector<std::vector<int32_t>>& prompts,
                                 const model::SamplingOptions& options)
               -> Result<std::vector<model::Completion<float>>> {
      batches_.push_back(int64_t(prompts.size()));
      options_seen_.push_back(options);
      std::vector<model::Completion<float>> out;
      for (const auto& p : prompts) {
        auto it = index.find(p);
        if (it == index.end()) return Status::InvalidArgument("a prompt that is no eval problem");
        const reward::Problem problem = task_->Generate(reward::Split::kEval, uint64_t(it->second));
        auto ids = model::EncodeCompletion(tok_, answer(it->second, problem));
        if (!ids.ok()) return ids.status();
        model::Completion<float> c;
        c.tokens = *ids;
        out.push_back(std::move(c));
      }
      return out;
    };
  }

  Result<EvalResult> Evaluate(const GenerateFn& generate, int64_t problems, int64_t batch) {
    EvalOptions o;
    o.problems = problems;
    o.batch = batch;
    o.max_new_tokens = 24;
    return EvaluateHeldOut(generate, tok_, *task_, registry_, o);
  }

  model::CharTokenizer tok_;
  reward::VerifierRegistry registry_;
  std::unique_ptr<reward::Task> task_;
  std::vector<int64_t> batches_;
  std::vector<model::SamplingOptions> options_seen_;
};

TEST_F(EvaluationTest, CountsCorrectAndFormattedAnswersOverTheEvalSplitInBatches) {
  // i % 4: 0 and 3 the demonstration, 1 a formatted wrong answer, 2 no format.
  auto answer = [](int64_t i, const reward::Problem& p) -> std::string {
    switch (i % 4) {
      case 1: return "<think>guess</think><answer>1234</answer>";
      case 2: return "1234";
      default: return p.demonstration;
    }
  };
  auto r = Evaluate(Answering(answer, 10), 10, 4);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->problems, 10);
  // Correct: 0, 3, 4, 7, 8 (problems 0-9 with i % 4 in {0, 3}).
  EXPECT_DOUBLE_EQ(r->accuracy, 0.5);
  // Formatted: all but 2 and 6.
  EXPECT_DOUBLE_EQ(r->format_rate, 0.8);
  EXPECT_EQ(r->accuracy_verifier, "exact");
  EXPECT_EQ(batches_, (std::vector<int64_t>{4, 4, 2}));
  for (const model::SamplingOptions& o : options_seen_) {
    EXPECT_EQ(o.temperature, 0.0);  // greedy: the policy's mode
    EXPECT_EQ(o.max_new_tokens, 24);
    EXPECT_EQ(o.stop_tokens, (std::vector<int32_t>{tok_.eos_id()}));
  }
  ASSERT_EQ(r->samples.size(), 4u);
  EXPECT_NE(r->samples[2].find(" -> 1234"), std::string::npos) << r->samples[2];

  // The reward orders all-correct > this mix > nothing formatted.
  auto all = Evaluate(Answering([](int64_t, const reward::Problem& p) { return p.demonstration; }, 10), 10, 4);
  auto none = Evaluate(Answering([](int64_t, const reward::Problem&) { return std::string("12"); }, 10), 10, 4);
  ASSERT_TRUE(all.ok() && none.ok());
  EXPECT_DOUBLE_EQ(all->accuracy, 1.0);
  EXPECT_DOUBLE_EQ(all->format_rate, 1.0);
  EXPECT_DOUBLE_EQ(none->format_rate, 0.0);
  EXPECT_GT(all->reward_mean, r->reward_mean);
  EXPECT_GT(r->reward_mean, none->reward_mean);
}

TEST_F(EvaluationTest, RefusesBadOptionsAndAGeneratorThatLosesCompletions) {
  auto answer = [](int64_t, const reward::Problem& p) { return p.demonstration; };
  EXPECT_EQ(Evaluate(Answering(answer, 4), 0, 4).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Evaluate(Answering(answer, 4), 4, 0).status().code(), StatusCode::kInvalidArgument);
  GenerateFn short_by_one = [](const std::vector<std::vector<int32_t>>& prompts, const model::SamplingOptions&)
      -> Result<std::vector<model::Completion<float>>> {
    return std::vector<model::Completion<float>>(prompts.size() - 1);
  };
  auto lost = Evaluate(short_by_one, 4, 4);
  EXPECT_EQ(lost.status().code(), StatusCode::kInternal);
  EXPECT_NE(lost.status().ToString().find("3 completions for 4 prompts"), std::string::npos) << lost.status();
  // A generator's own error comes back as it is.
  GenerateFn failing = [](const std::vector<std::vector<int32_t>>&, const model::SamplingOptions&)
      -> Result<std::vector<model::Completion<float>>> { return Status::Unavailable("engine gone"); };
  auto failed = Evaluate(failing, 4, 4);
  EXPECT_EQ(failed.status().code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace grove::learner
