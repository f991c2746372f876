// Sandbox: runs an untrusted program (model-written code) inside bubblewrap.
//
// Each Run() starts `bwrap` with every namespace unshared (no network: the
// sandbox has only its own loopback; no host processes; no IPC), a read-only
// view of the few system folders the interpreter needs (`read_only_paths`),
// a fresh /proc and minimal /dev, a private size-capped tmpfs at /tmp as the
// only writable place (also the working directory; the root is remounted
// read-only), nothing of /home, /root,
// /work, /etc or the run directory, an environment of PATH, HOME=/tmp and
// LANG only, and a new session (no controlling terminal to inject into).
//
// Before exec'ing bwrap the child process sets the limits below with
// setrlimit, which the program inherits: CPU seconds, address space, open
// files, file size, and processes. RLIMIT_NPROC does not bind uid 0, so when
// grove runs as root the child first drops to an unprivileged uid/gid drawn
// per run from [first_uid, first_uid + uid_count) (uids no host account
// uses): the limit then counts only that sandbox's processes, and a fork bomb
// in one sandbox cannot starve another. As another user, grove's own
// processes and threads count too, so the limit is raised by their number.
//
// The wall-clock deadline is enforced from outside: at the deadline (or when
// the program's output passes `max_output_bytes`) bwrap is SIGKILLed; it is
// the parent of the sandbox's PID namespace, whose PID 1 is the program
// itself (--as-pid-1, so no reaper is left behind as a zombie for the host's
// init) and dies with bwrap (--die-with-parent); when PID 1 dies the kernel
// kills every process in the namespace, fork bombs included.
//
// Thread-safe: Run() may be called from several threads at once.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace grove::reward {

struct SandboxLimits {
  std::chrono::milliseconds wall_time{2000};
  int cpu_seconds = 2;                               // RLIMIT_CPU, soft = hard: SIGKILL
  size_t address_space_bytes = size_t{512} << 20;    // RLIMIT_AS, per process
  int max_processes = 16;                            // RLIMIT_NPROC: bwrap and the program included
  size_t max_file_bytes = size_t{1} << 20;           // RLIMIT_FSIZE
  int max_open_files = 64;                           // RLIMIT_NOFILE
  size_t tmp_bytes = size_t{16} << 20;               // size of the /tmp tmpfs
  size_t max_output_bytes = size_t{64} << 10;        // stdout and stderr each; more kills the run
};

struct SandboxOptions {
  std::string bwrap_path = "/usr/bin/bwrap";
  // Host folders bound read-only at the same path. A symlink on the host
  // (merged /usr: /lib -> usr/lib) is recreated as the same symlink; a path
  // missing on the host is skipped.
  std::vector<std::string> read_only_paths = {"/usr", "/lib", "/lib64", "/bin", "/etc/alternatives"};
  uid_t first_uid = 1900000000;  // used only when running as root, see above
  uid_t uid_count = 65536;
  SandboxLimits limits;
};

// A file placed in the sandbox (read-only) before the program starts.
struct SandboxFile {
  std::string path;  // absolute, under /tmp
  std::string content;
};

struct SandboxRun {
  bool exited = false;      // exited normally: exit_code is valid
  int exit_code = -1;
  int signal = 0;           // the signal that ended bwrap's child, when it was one
  bool timed_out = false;   // killed at the wall-clock deadline
  bool output_limit = false;  // killed for writing more than max_output_bytes
  std::string stdout_text;  // at most max_output_bytes each
  std::string stderr_text;
  std::chrono::milliseconds wall{0};

  // "exit 0", "exit 1", "timed out after 2000 ms", "killed: CPU time limit ...", ...
  std::string Describe(const SandboxLimits& limits) const;
};

class Sandbox {
 public:
  // Checks that bwrap exists and can build the sandbox here, by running
  // `probe` (argv) in it and expecting exit 0 and `probe_stdout` on stdout.
  // FailedPrecondition naming the cause when bwrap is missing, cannot create
  // namespaces (e.g. unprivileged user namespaces are disabled), or the probe
  // program does not run inside; InvalidArgument for bad options.
  static Result<std::unique_ptr<Sandbox>> Create(SandboxOptions options, std::vector<std::string> probe,
                                                 std::string probe_stdout);

  // Runs argv (argv[0] a path inside the sandbox) with `stdin_data` on its
  // stdin and `files` in place. An error only when the sandbox could not be
  // started (fork, pipes, bwrap failing to set up); anything the program does
  // is in the SandboxRun.
  Result<SandboxRun> Run(const std::vector<std::string>& argv, std::string_view stdin_data,
                         const std::vector<SandboxFile>& files) const;

  const SandboxOptions& options() const { return options_; }

 private:
  explicit Sandbox(SandboxOptions options) : options_(std::move(options)) {}
  Result<SandboxRun> RunWithLimits(const std::vector<std::string>& argv, std::string_view stdin_data,
                                   const std::vector<SandboxFile>& files, const SandboxLimits& limits) const;
  SandboxOptions options_;
  std::vector<std::string> mount_args_;  // the bwrap arguments for read_only_paths
};

}  // namespace grove::reward
