// Process helpers for multi-process tests: start programs, capture output,
// wait with a timeout, and poll a condition.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace grove::testing {

// Starts argv (stdout+stderr appended to log_path) and returns its pid.
int Spawn(const std::vector<std::string>& argv, const std::string& log_path);
// Runs argv to completion; returns stdout, sets *exit_code.
std::string RunCapture(const std::vector<std::string>& argv, int* exit_code,
                       bool with_stderr = false);
// Waits for a child; true if it exited within timeout_ms (status in *status).
bool WaitExit(int pid, int timeout_ms, int* status = nullptr);
// Polls `done` every 10 ms until true or timeout; returns its last value.
bool WaitFor(const std::function<bool()>& done, int timeout_ms);
std::string ReadFile(const std::string& path);
// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick for
// an ephemeral bind; another process may take it before the caller does).
int FreePort();
// n distinct free loopback ports: every socket stays bound until all n are
// drawn, so two draws cannot return the same port (FreePort twice can).
std::vector<int> FreePorts(int n);
// A fresh directory under $TMPDIR, removed by the caller when wanted.
std::string MakeTempDir();
// $GROVE_BIN/grove, and the test actor ($GROVE_TEST_ACTOR).
std::string GroveBinary();
std::string TestActorBinary();

}  // namespace grove::testing
