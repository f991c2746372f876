#include "reward/python_tests_verifier.h"

#include <optional>
#include <vector>

#include <glog/logging.h>
#include <nlohmann/json.hpp>

#include "reward/answer.h"
#include "reward/python_code.h"

namespace grove::reward {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

struct TestCase {
  std::string input;
  std::string output;
};

// Output as compared: trailing whitespace of each line and trailing blank
// lines dropped, "\r\n" read as "\n".
std::string NormalizeOutput(std::string_view text) {
  std::string out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    while (!line.empty() && (line.back() == ' ' || line.back() == '\t' || line.back() == '\r')) line.remove_suffix(1);
    out.append(line);
    out.push_back('\n');
    pos = end + 1;
  }
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// The last non-empty line of a traceback: "ZeroDivisionError: division by zero".
std::string LastLine(std::string_view text) {
  text = TrimSpace(text);
  size_t nl = text.rfind('\n');
  return nl == std::string_view::npos ? std::string(text) : std::string(TrimSpace(text.substr(nl + 1)));
}

class PythonTestsVerifier final : public Verifier {
 public:
  PythonTestsVerifier(PythonTestsOptions options, std::unique_ptr<Sandbox> sandbox)
      : options_(std::move(options)), sandbox_(std::move(sandbox)) {}

  VerifyOutput Verify(const VerifyInput& in) const override {
    std::vector<TestCase> tests;
    if (std::string error = ParseTests(in.reference, &tests); !error.empty()) return VerifyOutput::Make(0.0, error);
    ExtractedCode code = ExtractPythonCode(in.completion, options_.max_code_bytes);
    if (!code.found) return Finish(0, tests.size(), code.error);

    const std::vector<std::string> argv = {options_.python, "-I", "/tmp/main.py"};
    const std::vector<SandboxFile> files = {{"/tmp/main.py", code.code}};
    const Clock::time_point budget_end = Clock::now() + options_.total_time;
    size_t passed = 0;
    std::string first_failure;
    for (size_t i = 0; i < tests.size(); ++i) {
      if (Clock::now() >= budget_end) {
        if (first_failure.empty()) first_failure = "test " + std::to_string(i + 1) + ": time budget spent";
        break;
      }
      Result<SandboxRun> run = sandbox_->Run(argv, tests[i].input, files);
      if (!run.ok()) {
        LOG(ERROR) << "python_tests: " << run.status();
        return Finish(0, tests.size(), "sandbox error: " + Snippet(run.status().message(), 120));
      }
      std::string failure;
      if (run->timed_out || run->output_limit || !run->exited || run->exit_code != 0) {
        failure = run->Describe(options_.sandbox.limits);
        std::string last = LastLine(run->stderr_text);
        if (!last.empty() && !run->timed_out && !run->output_limit) failure += " (" + Snippet(last, 60) + ")";
      } else if (NormalizeOutput(run->stdout_text) != NormalizeOutput(tests[i].output)) {
        failure = "wrong output";
      }
      if (failure.empty()) {
        ++passed;
        continue;
      }
      if (first_failure.empty()) first_failure = "test " + std::to_string(i + 1) + ": " + failure;
      if (options_.all_or_nothing) break;
    }
    return Finish(passed, tests.size(), first_failure);
  }

 private:
  std::string ParseTests(std::string_view reference, std::vector<TestCase>* tests) const {
    constexpr const char* kShape = "reference must be {\"tests\": [{\"input\": str, \"output\": str}, ...]}";
    json ref = json::parse(reference.begin(), reference.end(), nullptr, /*allow_exceptions=*/false);
    if (ref.is_discarded() || !ref.is_object() || !ref.contains("tests") || !ref["tests"].is_array() ||
        ref["tests"].empty()) {
      return kShape;
    }
    if (ref["tests"].size() > options_.max_tests) return "more than " + std::to_string(options_.max_tests) + " tests";
    for (const json& t : ref["tests"]) {
      if (!t.is_object() || !t.contains("input") || !t.contains("output") || !t["input"].is_string() ||
          !t["output"].is_string()) {
        return kShape;
      }
      tests->push_back({t["input"].get<std::string>(), t["output"].get<std::string>()});
    }
    return "";
  }

  VerifyOutput Finish(size_t passed, size_t total, const std::string& first_failure) const {
    double reward = options_.all_or_nothing ? (passed == total ? 1.0 : 0.0)
                                            : static_cast<double>(passed) / static_cast<double>(total);
    VerifyOutput out = VerifyOutput::Make(reward, passed == total ? "ok" : first_failure);
    if (passed != total && passed > 0) out.reason = std::to_string(passed) + "/" + std::to_string(total) + " passed; " + first_failure;
    out.scores.push_back({"tests_passed", static_cast<double>(passed)});
    out.scores.push_back({"tests", static_cast<double>(total)});
    return out;
  }

  PythonTestsOptions options_;
  std::unique_ptr<Sandbox> sandbox_;
};

}  // namespace

SandboxOptions DefaultPythonSandboxOptions() {
  SandboxOptions o;
  o.limits.wall_time = std::chrono::milliseconds(1000);
  o.limits.cpu_seconds = 1;
  return o;
}

Result<std::unique_ptr<Verifier>> MakePythonTestsVerifier(PythonTestsOptions options) {
  if (options.total_time.count() <= 0) return Status::InvalidArgument("python_tests: total_time must be positive");
  if (options.max_tests == 0 || options.max_code_bytes == 0) {
    return Status::InvalidArgument("python_tests: max_tests and max_code_bytes must be positive");
  }
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<Sandbox> sandbox,
                         Sandbox::Create(options.sandbox, {options.python, "-I", "-c", "print('ok')"}, "ok\n"));
  return std::unique_ptr<Verifier>(new PythonTestsVerifier(std::move(options), std::move(sandbox)));
}

}  // namespace grove::reward
