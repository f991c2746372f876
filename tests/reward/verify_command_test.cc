// `grove verify` through its function: ordered JSON lines out, a summary on
// stderr, clear failures for bad arguments and bad lines.
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "reward/verify_command.h"

namespace grove::reward {
namespace {

using nlohmann::json;

struct Outcome {
  int code;
  std::vector<json> lines;
  std::string err;
};

Outcome RunVerify(std::vector<std::string> args) {
  args.insert(args.begin(), "verify");
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  std::ostringstream out, err;
  std::streambuf* old_out = std::cout.rdbuf(out.rdbuf());
  std::streambuf* old_err = std::cerr.rdbuf(err.rdbuf());
  int code = VerifyMain(static_cast<int>(argv.size()), argv.data());
  std::cout.rdbuf(old_out);
  std::cerr.rdbuf(old_err);
  Outcome o{code, {}, err.str()};
  std::istringstream lines(out.str());
  for (std::string line; std::getline(lines, line);) o.lines.push_back(json::parse(line));
  return o;
}

std::string WriteInput(const std::vector<std::string>& lines) {
  std::string path = testing::TempDir() + "/verify_input_" + std::to_string(getpid()) + ".jsonl";
  std::ofstream f(path);
  for (const std::string& l : lines) f << l << "\n";
  return path;
}

TEST(VerifyCommand, ScoresLinesInOrderWithSummary) {
  std::string path = WriteInput({
      R"({"prompt":"1+1=","completion":"<think>1+1</think><answer>2</answer>","reference":"2"})",
      R"({"prompt":"1+2=","completion":"<think>1+2</think><answer>4</answer>","reference":"3"})",
      R"({"prompt":"half","completion":"<answer>\\boxed{0.5}</answer>","reference":"1/2"})",
      "",
      R"(not json)",
      R"({"prompt":"x","completion":"<think>c</think><answer>3*7+12</answer>","reference":{"numbers":[3,7,12],"target":33}})",
  });
  Outcome o = RunVerify({"--verifiers", "format:0.1,exact:1", "--input", path, "--workers", "2"});
  EXPECT_EQ(o.code, 1);  // one malformed line
  ASSERT_EQ(o.lines.size(), 5u);
  EXPECT_NEAR(o.lines[0]["reward"].get<double>(), 1.1, 1e-12);
  EXPECT_EQ(o.lines[0]["scores"]["format"].get<double>(), 1.0);
  EXPECT_EQ(o.lines[0]["scores"]["exact"].get<double>(), 1.0);
  EXPECT_NEAR(o.lines[1]["reward"].get<double>(), 0.1, 1e-12);
  EXPECT_NE(o.lines[1]["reason"].get<std::string>().find("exact: wrong value"), std::string::npos);
  EXPECT_NEAR(o.lines[2]["reward"].get<double>(), 1.0, 1e-12);
  EXPECT_EQ(o.lines[3]["reward"].get<double>(), 0.0);
  EXPECT_EQ(o.lines[3]["reason"].get<std::string>(), "input line is not a JSON object");
  EXPECT_NEAR(o.lines[4]["reward"].get<double>(), 0.1, 1e-12);  // exact cannot use a countdown reference
  EXPECT_NE(o.err.find("5 samples"), std::string::npos) << o.err;
  EXPECT_NE(o.err.find("line 5: input line is not a JSON object"), std::string::npos) << o.err;
  EXPECT_NE(o.err.find("exact: mean 0.5"), std::string::npos) << o.err;
}

TEST(VerifyCommand, PluginAndExternalOptions) {
  std::string path = WriteInput({
      R"({"prompt":"","completion":"<think>t</think><answer>PARIS</answer>","reference":"paris"})",
  });
  Outcome o = RunVerify({"--verifiers=case_insensitive,echo:0.5", "--input", path, "--plugin",
                         std::string(GROVE_TEST_PLUGIN_DIR) + "/libcase_insensitive_verifier.so", "--external",
                         "echo=while read -r l; do echo '{\"reward\": 1, \"reason\": \"sure\"}'; done"});
  EXPECT_EQ(o.code, 0) << o.err;
  ASSERT_EQ(o.lines.size(), 1u);
  EXPECT_NEAR(o.lines[0]["reward"].get<double>(), 1.5, 1e-12);
  EXPECT_EQ(o.lines[0]["reason"].get<std::string>(), "case_insensitive: ok; echo: sure");
}

TEST(VerifyCommand, UsageErrors) {
  std::string path = WriteInput({"{}"});
  EXPECT_EQ(RunVerify({"--input", path}).code, 2);
  EXPECT_EQ(RunVerify({"--verifiers", "format", "--input", "/no/such/file"}).code, 2);
  EXPECT_EQ(RunVerify({"--verifiers", "nope", "--input", path}).code, 2);
  EXPECT_EQ(RunVerify({"--verifiers", "format", "--input", path, "--workers", "0"}).code, 2);
  EXPECT_EQ(RunVerify({"--verifiers", "format", "--input", path, "--external", "noequals"}).code, 2);
  EXPECT_EQ(RunVerify({"--verifiers", "format", "--input", path, "--bogus"}).code, 2);
  Outcome missing = RunVerify({"--verifiers", "format", "--input", path});
  EXPECT_EQ(missing.code, 1);
  EXPECT_EQ(missing.lines[0]["reason"].get<std::string>(), "input line has no string \"completion\"");
}

}  // namespace
}  // namespace grove::reward
