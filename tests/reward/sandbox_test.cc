// The bubblewrap sandbox and the python_tests verifier: every escape tried
// here must fail, every limit must hold, and correct code must still score.
// Each test asserts on what the program saw or did, not only on the reward.
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "reward/python_tests_verifier.h"
#include "reward/registry.h"
#include "reward/sandbox.h"
#include "tests/support/proc_util.h"

namespace grove::reward {
namespace {

using namespace std::chrono_literals;

const std::vector<std::string> kProbe = {"/usr/bin/python3", "-I", "-c", "print('ok')"};

// Skips (with the reason) only when this machine cannot build the sandbox.
#define SKIP_WITHOUT_SANDBOX(result)                                                  \
  if (!(result).ok()) {                                                               \
    ASSERT_EQ((result).status().code(), StatusCode::kFailedPrecondition) << (result).status(); \
    GTEST_SKIP() << "no sandbox here: " << (result).status();                         \
  }

class SandboxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    host_dir_ = grove::testing::MakeTempDir();
    ASSERT_NE(host_dir_, "/tmp");
  }
  void TearDown() override {
    std::string cmd = "rm -rf '" + host_dir_ + "'";
    ASSERT_EQ(system(cmd.c_str()), 0);
  }

  // Runs a Python program in a sandbox with `limits`.
  // Runs a Python program in a sandbox with `limits` (sandboxes are made
  // once per distinct limits: each creation runs the probe).
  Result<SandboxRun> RunPython(const std::string& code, SandboxLimits limits = DefaultPythonSandboxOptions().limits,
                               std::string stdin_data = "") {
    auto key = std::make_pair(limits.wall_time.count(), limits.cpu_seconds);
    auto it = sandboxes_.find(key);
    if (it == sandboxes_.end()) {
      SandboxOptions options = DefaultPythonSandboxOptions();
      options.limits = limits;
      Result<std::unique_ptr<Sandbox>> sandbox = Sandbox::Create(options, kProbe, "ok\n");
      if (!sandbox.ok()) return sandbox.status();
      it = sandboxes_.emplace(key, std::move(*sandbox)).first;
    }
    return it->second->Run({"/usr/bin/python3", "-I", "/tmp/main.py"}, stdin_data, {{"/tmp/main.py", code}});
  }

  std::string WriteHostFile(const std::string& name, const std::string& content) {
    std::string path = host_dir_ + "/" + name;
    std::ofstream(path) << content;
    return path;
  }

  std::string host_dir_;
  static inline std::map<std::pair<int64_t, int>, std::unique_ptr<Sandbox>> sandboxes_;
};

// Processes on the host owned by a uid of the sandbox range.
int SandboxProcesses() {
  const SandboxOptions o = DefaultPythonSandboxOptions();
  int count = 0;
  DIR* proc = opendir("/proc");
  while (dirent* e = readdir(proc)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    struct stat st;
    if (stat((std::string("/proc/") + e->d_name).c_str(), &st) != 0) continue;
    count += st.st_uid >= o.first_uid && st.st_uid - o.first_uid < o.uid_count;
  }
  closedir(proc);
  return count;
}

TEST_F(SandboxTest, RunsAProgramWithStdinAndCapturesBothStreams) {
  Result<SandboxRun> run = RunPython("import sys\nn = int(input())\nprint(n * 2)\nprint('e', file=sys.stderr)\nsys.exit(3)",
                                     DefaultPythonSandboxOptions().limits, "21\n");
  SKIP_WITHOUT_SANDBOX(run);
  EXPECT_TRUE(run->exited);
  EXPECT_EQ(run->exit_code, 3);
  EXPECT_EQ(run->stdout_text, "42\n");
  EXPECT_EQ(run->stderr_text, "e\n");
  EXPECT_FALSE(run->timed_out);
}

TEST_F(SandboxTest, NetworkIsUnreachableEvenToTheHostLoopback) {
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(listener, 4), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);

  Result<SandboxRun> run = RunPython(
      "import socket\n"
      "def tcp():\n"
      "    s = socket.socket(); s.settimeout(0.3)\n"
      "    try:\n"
      "        s.connect(('127.0.0.1', " + std::to_string(port) + ")); return 'connected'\n"
      "    except OSError as e: return 'refused'\n"
      "def dns():\n"
      "    try:\n"
      "        socket.getaddrinfo('example.com', 80); return 'resolved'\n"
      "    except OSError: return 'no-dns'\n"
      "def udp():\n"
      "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
      "    try:\n"
      "        s.sendto(b'x', ('8.8.8.8', 53)); return 'sent'\n"
      "    except OSError: return 'unreachable'\n"
      "ifaces = sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])\n"
      "print(tcp(), dns(), udp(), ','.join(ifaces))\n");
  SKIP_WITHOUT_SANDBOX(run);
  EXPECT_EQ(run->stdout_text, "refused no-dns unreachable lo\n") << run->stderr_text;
  pollfd p{listener, POLLIN, 0};
  EXPECT_EQ(poll(&p, 1, 0), 0) << "a connection reached the host's listener";
  close(listener);
}

TEST_F(SandboxTest, WritesOutsideTmpFailAndHostFilesStayUntouched) {
  const std::string target = WriteHostFile("victim.txt", "original");
  Result<SandboxRun> run = RunPython(
      "import os\n"
      "def attempt(path):\n"
      "    try:\n"
      "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
      "        with open(path, 'w') as f: f.write('pwned')\n"
      "        return 'wrote'\n"
      "    except OSError: return 'denied'\n"
      "print(attempt('/usr/lib/grove_escape'), attempt('/grove_escape'), attempt('/etc/grove_escape'),\n"
      "      attempt('/proc/grove_escape'), attempt('/tmp/inside_ok'))\n"
      "print(attempt('" + target + "'), attempt('" + host_dir_ + "/new_file'))\n");
  SKIP_WITHOUT_SANDBOX(run);
  std::istringstream lines(run->stdout_text);
  std::string first, second;
  std::getline(lines, first);
  std::getline(lines, second);
  EXPECT_EQ(first, "denied denied denied denied wrote") << run->stderr_text;
  // Writing to the host's path lands, at most, in the sandbox's private /tmp.
  EXPECT_EQ(grove::testing::ReadFile(target), "original");
  EXPECT_NE(access((host_dir_ + "/new_file").c_str(), F_OK), 0);
  EXPECT_NE(access("/usr/lib/grove_escape", F_OK), 0);
  EXPECT_EQ(grove::testing::ReadFile(target), "original") << second;
}

TEST_F(SandboxTest, HostFilesAndEnvironmentAreUnreadable) {
  const std::string secret = WriteHostFile("secret.txt", "hunter2-sandbox-secret");
  ASSERT_EQ(setenv("GROVE_SANDBOX_TEST_SECRET", "env-secret-4711", 1), 0);
  Result<SandboxRun> run = RunPython(
      "import os\n"
      "def read(path):\n"
      "    try:\n"
      "        with open(path, 'rb') as f: return f.read().decode('latin-1')\n"
      "    except OSError as e: return 'unreadable'\n"
      "def ls(path):\n"
      "    try: return ','.join(sorted(os.listdir(path))) or 'empty'\n"
      "    except OSError: return 'missing'\n"
      "print(read('/etc/shadow'), read('/etc/passwd'), read('" + secret + "'))\n"
      "print(ls('/root'), ls('/home'), ls('/work'), ls('" + host_dir_ + "'))\n"
      "print(repr(read('/proc/1/environ')))\n"
      "print(sorted(os.environ.items()))\n"
      "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
      "fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n"
      "print([f for f in fds if os.path.exists('/proc/self/fd/%d' % f)], oct(os.stat('/tmp/main.py').st_mode & 0o777))\n"
      "try:\n"
      "    open('/tmp/main.py', 'a').write('x'); print('main.py writable')\n"
      "except OSError: print('main.py read-only')\n");
  unsetenv("GROVE_SANDBOX_TEST_SECRET");
  SKIP_WITHOUT_SANDBOX(run);
  std::istringstream lines(run->stdout_text);
  std::string files, dirs, pid1_env, env, pids, fds, program;
  for (std::string* line : {&files, &dirs, &pid1_env, &env, &pids, &fds, &program}) std::getline(lines, *line);
  EXPECT_EQ(files, "unreadable unreadable unreadable") << run->stderr_text;
  EXPECT_EQ(dirs, "missing missing missing missing");
  EXPECT_EQ(run->stdout_text.find("hunter2"), std::string::npos);
  EXPECT_EQ(run->stdout_text.find("env-secret-4711"), std::string::npos);
  // Only the environment the sandbox sets.
  EXPECT_EQ(env, "[('HOME', '/tmp'), ('LANG', 'C.UTF-8'), ('PATH', '/usr/bin:/bin'), ('PWD', '/tmp')]");
  // Its own PID namespace, where the program is PID 1: nothing of the host.
  EXPECT_EQ(pids, "['1']");
  EXPECT_NE(pid1_env.find("PATH=/usr/bin:/bin"), std::string::npos) << pid1_env;
  // Only stdin, stdout and stderr (and the directory listing's own fd, closed
  // by the time it is checked): no descriptor of grove or bwrap leaks in.
  EXPECT_EQ(fds, "[0, 1, 2] 0o444");
  EXPECT_EQ(program, "main.py read-only");
}

TEST_F(SandboxTest, ForkBombIsContainedAndCleanedUp) {
  // Earlier tests' sandboxes may still be in teardown.
  ASSERT_TRUE(grove::testing::WaitFor([] { return SandboxProcesses() == 0; }, 5000));
  SandboxLimits limits = DefaultPythonSandboxOptions().limits;
  limits.wall_time = 1500ms;
  // First: how many children can the program make? RLIMIT_NPROC bounds it.
  Result<SandboxRun> count = RunPython(
      "import os, time\n"
      "made = 0\n"
      "for i in range(200):\n"
      "    try:\n"
      "        if os.fork() == 0:\n"
      "            time.sleep(30); os._exit(0)\n"
      "        made += 1\n"
      "    except OSError: break\n"
      "print(made)\n",
      limits);
  SKIP_WITHOUT_SANDBOX(count);
  ASSERT_TRUE(count->exited) << count->Describe(limits);
  const int made = std::stoi(count->stdout_text);
  EXPECT_GE(made, 1);
  EXPECT_LE(made, limits.max_processes - 2);  // bwrap and the program count too

  // Then the real thing, which must end at the deadline with nothing left.
  auto start = std::chrono::steady_clock::now();
  Result<SandboxRun> bomb = RunPython(
      "import os\n"
      "while True:\n"
      "    try: os.fork()\n"
      "    except OSError: pass\n",
      limits);
  ASSERT_TRUE(bomb.ok()) << bomb.status();
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(bomb->timed_out || !bomb->exited || bomb->exit_code != 0) << bomb->Describe(limits);
  EXPECT_LT(took, limits.wall_time + 2500ms);
  EXPECT_TRUE(grove::testing::WaitFor([] { return SandboxProcesses() == 0; }, 5000))
      << SandboxProcesses() << " sandbox processes still alive on the host";
}

TEST_F(SandboxTest, InfiniteLoopsAreKilledAtTheDeadline) {
  SandboxLimits limits = DefaultPythonSandboxOptions().limits;
  limits.wall_time = 400ms;
  limits.cpu_seconds = 10;  // the wall clock must be what stops it
  for (const char* code : {"while True: pass\n", "import time\ntime.sleep(60)\n"}) {
    Result<SandboxRun> run = RunPython(code, limits);
    SKIP_WITHOUT_SANDBOX(run);
    EXPECT_TRUE(run->timed_out) << code;
    EXPECT_GE(run->wall, 400ms);
    EXPECT_LT(run->wall, 2000ms);
    EXPECT_EQ(run->Describe(limits), "timed out after 400 ms");
  }
  // With a CPU limit below the wall clock, RLIMIT_CPU ends a busy loop first.
  // (The wall clock is generous: on a loaded machine one CPU second takes longer.)
  limits.wall_time = 30000ms;
  limits.cpu_seconds = 1;
  Result<SandboxRun> run = RunPython("while True: pass\n", limits);
  ASSERT_TRUE(run.ok());
  EXPECT_FALSE(run->timed_out);
  EXPECT_EQ(run->Describe(limits), "killed: CPU time limit (1 s) or out of memory");
}

TEST_F(SandboxTest, MemoryHogHitsTheAddressSpaceLimit) {
  Result<SandboxRun> run = RunPython("x = bytearray(2 << 30)\nprint('allocated')\n");
  SKIP_WITHOUT_SANDBOX(run);
  EXPECT_TRUE(run->exited);
  EXPECT_EQ(run->exit_code, 1);
  EXPECT_EQ(run->stdout_text, "");
  EXPECT_NE(run->stderr_text.find("MemoryError"), std::string::npos) << run->stderr_text;
}

TEST_F(SandboxTest, HugeOutputIsCappedAndStopsTheProgram) {
  SandboxLimits limits = DefaultPythonSandboxOptions().limits;
  limits.wall_time = 5000ms;
  limits.cpu_seconds = 5;
  Result<SandboxRun> run = RunPython("while True: print('x' * 1000)\n", limits);
  SKIP_WITHOUT_SANDBOX(run);
  EXPECT_TRUE(run->output_limit);
  EXPECT_EQ(run->stdout_text.size(), limits.max_output_bytes);
  EXPECT_EQ(run->stdout_text.substr(0, 3), "xxx");
  EXPECT_LT(run->wall, 3000ms);  // killed when the cap was passed, not at the deadline
  // Files are capped too (RLIMIT_FSIZE), even in the sandbox's /tmp.
  run = RunPython("f = open('/tmp/big', 'wb')\nf.write(b'x' * (4 << 20))\nf.close()\nprint('wrote')\n");
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(run->stdout_text, "");
  EXPECT_EQ(run->exit_code, 1);  // Python ignores SIGXFSZ: the write fails with EFBIG
  EXPECT_NE(run->stderr_text.find("File too large"), std::string::npos) << run->stderr_text;
}

TEST(SandboxSetup, MissingBwrapIsAnErrorNamingIt) {
  SandboxOptions options = DefaultPythonSandboxOptions();
  options.bwrap_path = "/nonexistent/bwrap";
  Result<std::unique_ptr<Sandbox>> sandbox = Sandbox::Create(options, kProbe, "ok\n");
  ASSERT_FALSE(sandbox.ok());
  EXPECT_EQ(sandbox.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(sandbox.status().message().find("bubblewrap"), std::string::npos) << sandbox.status();

  PythonTestsOptions verifier_options;
  verifier_options.sandbox = options;
  Result<std::unique_ptr<Verifier>> verifier = MakePythonTestsVerifier(verifier_options);
  ASSERT_FALSE(verifier.ok());
  EXPECT_NE(verifier.status().message().find("/nonexistent/bwrap"), std::string::npos) << verifier.status();
}

TEST(SandboxSetup, BwrapThatCannotCreateNamespacesIsAnErrorWithItsReason) {
  // A stand-in for bwrap on a host where user namespaces are off: it fails
  // the way bwrap does there.
  const std::string dir = grove::testing::MakeTempDir();
  ASSERT_EQ(chmod(dir.c_str(), 0755), 0);  // the sandbox starts bwrap as an unprivileged uid
  std::string fake = dir + "/bwrap";
  std::ofstream(fake) << "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace, likely because the kernel "
                         "does not allow non-privileged user namespaces.' >&2\nexit 1\n";
  ASSERT_EQ(chmod(fake.c_str(), 0755), 0);
  SandboxOptions options = DefaultPythonSandboxOptions();
  options.bwrap_path = fake;
  Result<std::unique_ptr<Sandbox>> sandbox = Sandbox::Create(options, kProbe, "ok\n");
  unlink(fake.c_str());
  rmdir(dir.c_str());
  ASSERT_FALSE(sandbox.ok());
  EXPECT_EQ(sandbox.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(sandbox.status().message().find("No permissions to creating new namespace"), std::string::npos)
      << sandbox.status();
}

TEST(SandboxSetup, BwrapTheSandboxUserCannotExecuteIsAnErrorSayingSo) {
  if (geteuid() != 0) GTEST_SKIP() << "only root drops to a sandbox uid before exec";
  const std::string dir = grove::testing::MakeTempDir();  // 0700: the sandbox uid cannot enter it
  std::string fake = dir + "/bwrap";
  std::ofstream(fake) << "#!/bin/sh\nexit 0\n";
  ASSERT_EQ(chmod(fake.c_str(), 0755), 0);
  SandboxOptions options = DefaultPythonSandboxOptions();
  options.bwrap_path = fake;
  Result<std::unique_ptr<Sandbox>> sandbox = Sandbox::Create(options, kProbe, "ok\n");
  unlink(fake.c_str());
  rmdir(dir.c_str());
  ASSERT_FALSE(sandbox.ok());
  EXPECT_EQ(sandbox.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(sandbox.status().message().find("cannot start " + fake + ": Permission denied"), std::string::npos)
      << sandbox.status();
}

TEST(SandboxSetup, BadOptionsAreRefused) {
  SandboxOptions options = DefaultPythonSandboxOptions();
  options.limits.max_processes = 1;
  EXPECT_EQ(Sandbox::Create(options, kProbe, "ok\n").status().code(), StatusCode::kInvalidArgument);
  options = DefaultPythonSandboxOptions();
  options.read_only_paths.push_back("/");
  EXPECT_EQ(Sandbox::Create(options, kProbe, "ok\n").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::reward
