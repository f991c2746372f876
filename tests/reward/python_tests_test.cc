// python_tests: where the program is read from a completion, how test cases
// score, and that the registry and `grove verify` can run it.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "reward/python_code.h"
#include "reward/python_tests_verifier.h"
#include "reward/composite_verifier.h"
#include "reward/registry.h"
#include "reward/task.h"
#include "tests/support/proc_util.h"

namespace grove::reward {
namespace {

using nlohmann::json;

std::string Code(const std::string& completion) {
  ExtractedCode c = ExtractPythonCode(completion, 1000);
  return c.found ? c.code : "ERROR: " + c.error;
}

TEST(PythonCode, ReadsTheLastPythonBlockOfTheAnswer) {
  EXPECT_EQ(Code("<think>try ```python\nprint(0)\n```</think><answer>```python\nprint(1)\n```</answer>"), "print(1)\n");
  EXPECT_EQ(Code("```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```cpp\nint x;\n```"), "print(2)\n");
  EXPECT_EQ(Code("```\nprint(3)\n```"), "print(3)\n");
  EXPECT_EQ(Code("<answer>\nprint(4)\n</answer>"), "print(4)");  // no fence: the whole answer
  EXPECT_EQ(Code("print(5)"), "print(5)");
  // A draft in the reasoning never counts, even without an answer block.
  EXPECT_EQ(Code("<think>\nprint(6)\n</think>\nprint(7)"), "print(7)");
}

TEST(PythonCode, MissingOrMalformedCodeIsAnError) {
  EXPECT_EQ(Code(""), "ERROR: no code");
  EXPECT_EQ(Code("<think>print(1)</think>   "), "ERROR: no code");
  EXPECT_EQ(Code("```cpp\nint main() {}\n```"), "ERROR: no ```python block");
  EXPECT_EQ(Code("```python\nprint(1)\n"), "ERROR: unterminated ``` block");
  EXPECT_EQ(Code("<answer>a</answer><answer>b</answer>"), "ERROR: 2 <answer> blocks");
  EXPECT_EQ(Code(std::string("print(1)\0", 9) + "x"), "ERROR: code contains a NUL byte");
  EXPECT_EQ(Code(std::string(1001, 'x')), "ERROR: code longer than 1000 bytes");
}

class PythonTests : public ::testing::Test {
 protected:
  // Limits with room for a loaded 2-core machine, where Python alone can
  // take a quarter of a second to start.
  static PythonTestsOptions Options(bool all_or_nothing) {
    PythonTestsOptions o;
    o.sandbox.limits.wall_time = std::chrono::milliseconds(3000);
    o.sandbox.limits.cpu_seconds = 2;
    o.total_time = std::chrono::milliseconds(6000);
    o.all_or_nothing = all_or_nothing;
    return o;
  }
  static void SetUpTestSuite() {
    Result<std::unique_ptr<Verifier>> v = MakePythonTestsVerifier(Options(false));
    if (v.ok()) fraction_ = v->release();
    else setup_error_ = new Status(v.status());
    v = MakePythonTestsVerifier(Options(true));
    if (v.ok()) all_ = v->release();
  }
  void SetUp() override {
    if (setup_error_ != nullptr) {
      ASSERT_EQ(setup_error_->code(), StatusCode::kFailedPrecondition) << *setup_error_;
      GTEST_SKIP() << "no sandbox here: " << *setup_error_;
    }
  }
  static VerifyOutput Score(const Verifier* v, const std::string& code, const std::string& reference) {
    std::string completion = "<think>t</think><answer>```python\n" + code + "\n```</answer>";
    return v->Verify(VerifyInput{"p", completion, reference});
  }
  static inline Verifier* fraction_ = nullptr;
  static inline Verifier* all_ = nullptr;
  static inline Status* setup_error_ = nullptr;
};

// 3*n+2 on three inputs.
const char* kLinear = R"({"tests": [{"input": "1\n", "output": "5\n"}, {"input": "10\n", "output": "32\n"},
                                     {"input": "0\n", "output": "2"}]})";

TEST_F(PythonTests, CorrectCodeScoresOneAndWrongCodeZero) {
  VerifyOutput right = Score(fraction_, "n = int(input())\nprint(3 * n + 2)", kLinear);
  EXPECT_EQ(right.reward, 1.0);
  EXPECT_EQ(right.reason, "ok");
  ASSERT_EQ(right.scores.size(), 2u);
  EXPECT_EQ(right.scores[0].name, "tests_passed");
  EXPECT_EQ(right.scores[0].value, 3.0);
  // Trailing spaces and a missing final newline do not matter.
  EXPECT_EQ(Score(fraction_, "n = int(input())\nprint(3 * n + 2, end='  ')", kLinear).reward, 1.0);

  VerifyOutput wrong = Score(fraction_, "n = int(input())\nprint(3 * n + 1)", kLinear);
  EXPECT_EQ(wrong.reward, 0.0);
  EXPECT_EQ(wrong.reason, "test 1: wrong output");
  VerifyOutput crash = Score(fraction_, "print(1 / 0)", kLinear);
  EXPECT_EQ(crash.reward, 0.0);
  EXPECT_EQ(crash.reason, "test 1: exit 1 (ZeroDivisionError: division by zero)");
  EXPECT_EQ(Score(fraction_, "def f(:\n  pass", kLinear).reason.substr(0, 14), "test 1: exit 1");
}

TEST_F(PythonTests, PartialCreditOrAllOrNothing) {
  // Right except for n = 0.
  const std::string code = "n = int(input())\nprint(3 * n + 2 if n else 7)";
  VerifyOutput partial = Score(fraction_, code, kLinear);
  EXPECT_NEAR(partial.reward, 2.0 / 3.0, 1e-12);
  EXPECT_EQ(partial.reason, "2/3 passed; test 3: wrong output");
  ASSERT_NE(all_, nullptr);
  EXPECT_EQ(Score(all_, code, kLinear).reward, 0.0);
  EXPECT_EQ(Score(all_, "n = int(input())\nprint(3 * n + 2)", kLinear).reward, 1.0);
}

TEST_F(PythonTests, HostileProgramsScoreZeroWithinTheirBudget) {
  for (const char* code : {"while True: pass", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
                           "x = bytearray(3 << 30)", "while True: print('y' * 4096)"}) {
    auto start = std::chrono::steady_clock::now();
    VerifyOutput out = Score(all_, code, kLinear);  // stops at the first failure
    auto took = std::chrono::steady_clock::now() - start;
    EXPECT_EQ(out.reward, 0.0) << code;
    EXPECT_EQ(out.reason.substr(0, 8), "test 1: ") << out.reason;
    // One test's wall time (3 s), plus teardown.
    EXPECT_LT(took, std::chrono::milliseconds(4500)) << code << ": " << out.reason;
  }
}

TEST_F(PythonTests, BadReferencesAreReasonsNotCrashes) {
  for (const char* ref : {"", "[]", "{\"tests\": []}", "{\"tests\": [{\"input\": 1, \"output\": \"2\"}]}",
                          "{\"tests\": [\"x\"]}"}) {
    VerifyOutput out = Score(fraction_, "print(1)", ref);
    EXPECT_EQ(out.reward, 0.0) << ref;
    EXPECT_NE(out.reason.find("reference must be"), std::string::npos) << ref << ": " << out.reason;
  }
}

TEST_F(PythonTests, TheRegistryMakesIt) {
  VerifierRegistry registry;
  ASSERT_TRUE(registry.Has("python_tests"));
  ASSERT_TRUE(registry.Has("python_tests_all"));
  Result<std::unique_ptr<Verifier>> v = registry.Create("python_tests");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(Score(v->get(), "print(int(input()) * 3 + 2)", kLinear).reward, 1.0);
}

TEST_F(PythonTests, TaskDemonstrationsPassAndWrongProgramsFail) {
  Result<std::unique_ptr<Task>> task = MakeTask("python", *Config::Parse("seed = 3\ntests = 2"));
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ((*task)->verifier_spec(), "format:0.1,python_tests:1");
  VerifierRegistry registry;
  Result<std::vector<WeightedVerifier>> spec = ParseVerifierSpec((*task)->verifier_spec());
  ASSERT_TRUE(spec.ok());
  Result<std::unique_ptr<Verifier>> verifier = MakeCompositeVerifier(registry, *spec);
  ASSERT_TRUE(verifier.ok()) << verifier.status();
  std::set<std::string> kinds;
  for (Split split : {Split::kTrain, Split::kEval}) {
    for (uint64_t i = 0; i < 3; ++i) {
      Problem p = (*task)->Generate(split, i + (split == Split::kEval ? 100 : 0));
      EXPECT_TRUE(IsPromptText(p.prompt)) << p.prompt;
      EXPECT_LE(p.prompt.size(), 40u) << p.prompt;
      json ref = json::parse(p.reference);
      ASSERT_EQ(ref["tests"].size(), 2u) << p.reference;
      kinds.insert(p.prompt.substr(0, p.prompt.find_first_of("0123456789")));
      VerifyOutput out = (*verifier)->Verify(VerifyInput{p.prompt, p.demonstration, p.reference});
      EXPECT_NEAR(out.reward, 1.1, 1e-12) << p.prompt << " | " << p.demonstration << " | " << out.reason;
      std::string wrong = p.demonstration;
      wrong.insert(wrong.find("</answer>"), "+1");  // print(...)+1: a TypeError
      out = (*verifier)->Verify(VerifyInput{p.prompt, wrong, p.reference});
      EXPECT_NEAR(out.reward, 0.1, 1e-12) << wrong << " | " << out.reason;
    }
  }
  EXPECT_GE(kinds.size(), 3u);  // several kinds of problem, not one
}

TEST(PythonTask, HeldOutSplitAndBadConfigs) {
  Result<std::unique_ptr<Task>> task = MakeTask("python", Config());
  ASSERT_TRUE(task.ok()) << task.status();
  std::set<std::string> train;
  for (uint64_t i = 0; i < 2000; ++i) train.insert((*task)->Generate(Split::kTrain, i).prompt);
  int eval_distinct = 0;
  std::set<std::string> eval;
  for (uint64_t i = 0; i < 100; ++i) {
    Problem p = (*task)->Generate(Split::kEval, i);
    EXPECT_EQ(train.count(p.prompt), 0u) << p.prompt;
    eval_distinct += eval.insert(p.prompt).second;
  }
  EXPECT_GT(eval_distinct, 20);
  EXPECT_EQ(MakeTask("python", *Config::Parse("tests = 0")).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeTask("python", *Config::Parse("max_m = 3")).status().code(), StatusCode::kInvalidArgument);
}

// End to end through the real command line, as a person trying it would.
TEST_F(PythonTests, GroveVerifyRunsIt) {
  Result<std::unique_ptr<Task>> task = MakeTask("python", Config());
  ASSERT_TRUE(task.ok());
  Problem p = (*task)->Generate(Split::kTrain, 7);
  const std::string dir = grove::testing::MakeTempDir();
  const std::string input = dir + "/samples.jsonl";
  {
    std::ofstream f(input);
    json reference = json::parse(p.reference);
    f << json{{"prompt", p.prompt}, {"completion", p.demonstration}, {"reference", reference}}.dump() << "\n";
    f << json{{"prompt", p.prompt}, {"completion", "<think>x</think><answer>print(-1)</answer>"}, {"reference", reference}}.dump()
      << "\n";
  }
  int code = -1;
  std::string out = grove::testing::RunCapture(
      {grove::testing::GroveBinary(), "verify", "--verifiers", "format:0.1,python_tests:1", "--input", input,
       "--workers", "2", "--timeout_ms", "20000"},
      &code);
  EXPECT_EQ(code, 0) << out;
  std::istringstream lines(out);
  std::vector<json> scored;
  for (std::string line; std::getline(lines, line);) scored.push_back(json::parse(line));
  ASSERT_EQ(scored.size(), 2u) << out;
  EXPECT_NEAR(scored[0]["reward"].get<double>(), 1.1, 1e-12) << scored[0].dump();
  EXPECT_EQ(scored[0]["scores"]["python_tests"].get<double>(), 1.0);
  EXPECT_NEAR(scored[1]["reward"].get<double>(), 0.1, 1e-12) << scored[1].dump();
  EXPECT_EQ(scored[1]["reason"].get<std::string>().find("wrong output") != std::string::npos, true) << scored[1].dump();
  std::remove(input.c_str());
  rmdir(dir.c_str());
}

}  // namespace
}  // namespace grove::reward
