// Tasks: reproducible by seed, a held-out split disjoint from training,
// prompts the tokenizer can spell, and demonstrations the task's own
// verifiers accept.
#include <regex>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "reward/composite_verifier.h"
#include "reward/task.h"

namespace grove::reward {
namespace {

std::unique_ptr<Task> Make(const std::string& name, const std::string& toml = "") {
  Result<Config> config = Config::Parse(toml);
  EXPECT_TRUE(config.ok()) << config.status();
  Result<std::unique_ptr<Task>> task = MakeTask(name, *config);
  EXPECT_TRUE(task.ok()) << task.status();
  return std::move(*task);
}

class EveryTask : public ::testing::TestWithParam<std::string> {};

TEST_P(EveryTask, ReproducibleBySeedAndDifferentAcrossSeeds) {
  auto a = Make(GetParam(), "seed = 5");
  auto b = Make(GetParam(), "seed = 5");
  auto c = Make(GetParam(), "seed = 6");
  int same_as_other_seed = 0;
  for (uint64_t i = 0; i < 50; ++i) {
    Problem pa = a->Generate(Split::kTrain, i), pb = b->Generate(Split::kTrain, i);
    EXPECT_EQ(pa.prompt, pb.prompt);
    EXPECT_EQ(pa.reference, pb.reference);
    EXPECT_EQ(pa.demonstration, pb.demonstration);
    same_as_other_seed += pa.prompt == c->Generate(Split::kTrain, i).prompt;
  }
  EXPECT_LT(same_as_other_seed, 25);
}

TEST_P(EveryTask, EvalSplitIsDisjointFromTrain) {
  auto task = Make(GetParam());
  std::set<std::string> train, eval;
  for (uint64_t i = 0; i < 3000; ++i) train.insert(task->Generate(Split::kTrain, i).prompt);
  for (uint64_t i = 0; i < 300; ++i) eval.insert(task->Generate(Split::kEval, i).prompt);
  EXPECT_GT(eval.size(), 20u);  // not one problem repeated
  for (const std::string& p : eval) EXPECT_EQ(train.count(p), 0u) << "eval prompt in train: " << p;
}

TEST_P(EveryTask, PromptsUseTheTokenizerCharacters) {
  auto task = Make(GetParam());
  for (Split split : {Split::kTrain, Split::kEval}) {
    for (uint64_t i = 0; i < 300; ++i) {
      Problem p = task->Generate(split, i);
      EXPECT_TRUE(IsPromptText(p.prompt)) << p.prompt;
      EXPECT_LE(p.prompt.size(), 40u) << p.prompt;
      EXPECT_LE(p.demonstration.size(), 120u) << p.demonstration;
    }
  }
}

// The task's verifier set gives every demonstration full marks, and the
// same completion with a wrong answer loses the accuracy part.
TEST_P(EveryTask, DemonstrationsScoreFullMarks) {
  auto task = Make(GetParam(), "seed = 3");
  VerifierRegistry registry;
  auto spec = ParseVerifierSpec(task->verifier_spec());
  ASSERT_TRUE(spec.ok());
  auto verifier = MakeCompositeVerifier(registry, *spec);
  ASSERT_TRUE(verifier.ok());
  double full = 0;
  for (const WeightedVerifier& w : *spec) full += w.weight;
  for (Split split : {Split::kTrain, Split::kEval}) {
    for (uint64_t i = 0; i < 150; ++i) {
      Problem p = task->Generate(split, i);
      VerifyOutput out = (*verifier)->Verify(VerifyInput{p.prompt, p.demonstration, p.reference});
      EXPECT_NEAR(out.reward, full, 1e-12) << p.prompt << " | " << p.demonstration << " | " << out.reason;
      std::string wrong = p.demonstration;
      size_t at = wrong.find("</answer>");
      wrong.insert(at, "+1");
      out = (*verifier)->Verify(VerifyInput{p.prompt, wrong, p.reference});
      EXPECT_LT(out.reward, full - 0.5) << wrong << " | " << out.reason;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tasks, EveryTask, ::testing::Values("arithmetic", "countdown", "symbolic"));

TEST(ArithmeticTask, EasyEndIsShortSums) {
  auto task = Make("arithmetic", "max_digits = 2\nops = \"+\"");
  std::regex shape("[0-9]{1,2}\\+[0-9]{1,2}=");
  for (uint64_t i = 0; i < 200; ++i) {
    Problem p = task->Generate(Split::kTrain, i);
    EXPECT_TRUE(std::regex_match(p.prompt, shape)) << p.prompt;
    // The reference is the true sum.
    size_t plus = p.prompt.find('+');
    int a = std::stoi(p.prompt.substr(0, plus)), b = std::stoi(p.prompt.substr(plus + 1));
    EXPECT_EQ(p.reference, "\"" + std::to_string(a + b) + "\"");
  }
}

TEST(ArithmeticTask, DifficultyKnobSetsDigits) {
  auto task = Make("arithmetic", "min_digits = 4\nmax_digits = 4\nops = \"*\"");
  for (uint64_t i = 0; i < 50; ++i) {
    Problem p = task->Generate(Split::kTrain, i);
    EXPECT_TRUE(std::regex_match(p.prompt, std::regex("[1-9][0-9]{3}\\*[1-9][0-9]{3}="))) << p.prompt;
  }
}

TEST(Tasks, BadConfigsAreClearErrors) {
  Result<Config> typo = Config::Parse("max_digit = 3");
  EXPECT_EQ(MakeTask("arithmetic", *typo).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeTask("arithmetic", *Config::Parse("ops = \"/\"")).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeTask("arithmetic", *Config::Parse("eval_fraction = 0")).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeTask("symbolic", *Config::Parse("modes = \"integrate\"")).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeTask("chess", Config()).status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace grove::reward
