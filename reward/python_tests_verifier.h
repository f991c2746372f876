// python_tests: runs model-written Python against hidden test cases, inside
// the bubblewrap sandbox (reward/sandbox.h), as DeepSeek-R1's code rewards do.
//
// Reference JSON:
//   {"tests": [{"input": "5\n", "output": "17\n"}, ...]}
// Each test runs the program once (python3 -I /tmp/main.py) with `input` on
// stdin; it passes when the program exits 0 within its limits and its stdout
// equals `output` up to trailing whitespace on each line and trailing blank
// lines. The comparison happens outside the sandbox, on output the program
// cannot see in advance; assert-style tests appended to the program are not
// offered because the program under test could defeat them from inside
// (os._exit(0) before the asserts, an __eq__ that always says yes).
//
// The program is found by ExtractPythonCode (reward/python_code.h): the last
// ```python block of the answer, or the whole answer when it has no fence.
//
// Reward: the fraction of tests passed, or 1/0 with all_or_nothing (which
// also stops at the first failure). Sub-scores "tests_passed" and "tests".
// Tests are run one after another until `total_time` is spent; tests not
// started by then fail ("time budget spent"). So a sample costs at most
// total_time + one test's wall_time: keep the scoring pool's per-sample
// timeout above that (the defaults, 3 s + 1 s, fit its 5 s).
//
// A sandbox that cannot start (bwrap missing, namespaces refused) is an error
// of MakePythonTestsVerifier, naming the cause, never a silent 0.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "base/result.h"
#include "reward/sandbox.h"
#include "reward/verifier.h"

namespace grove::reward {

// Per test: 1 s wall and CPU, 512 MiB, 16 processes, 1 MiB files, 64 KiB output.
SandboxOptions DefaultPythonSandboxOptions();

struct PythonTestsOptions {
  SandboxOptions sandbox = DefaultPythonSandboxOptions();
  std::string python = "/usr/bin/python3";  // a path inside the sandbox (read_only_paths)
  bool all_or_nothing = false;
  std::chrono::milliseconds total_time{3000};
  size_t max_code_bytes = 64 << 10;
  size_t max_tests = 64;
};

// Checks the sandbox by running the interpreter in it once.
Result<std::unique_ptr<Verifier>> MakePythonTestsVerifier(PythonTestsOptions options);

}  // namespace grove::reward
