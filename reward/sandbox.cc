#include "reward/sandbox.h"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "reward/answer.h"

namespace grove::reward {
namespace {

using Clock = std::chrono::steady_clock;

// File descriptor numbers in the child, as bwrap sees them.
constexpr int kStatusFd = 3;     // --json-status-fd
constexpr int kExecErrorFd = 4;  // close-on-exec: carries errno when exec fails
constexpr int kFirstFileFd = 5;  // --ro-bind-data, one per SandboxFile
constexpr size_t kMaxFiles = 8;

// Owns a file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd& operator=(Fd&& other) noexcept {
    reset(other.release());
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1) {
    if (fd_ >= 0) close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(left);
}

uint64_t Mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A different uid for (nearly) every run, so that one sandbox's processes
// never count against another's RLIMIT_NPROC, even one still being torn down.
uid_t PickUid(const SandboxOptions& o) {
  static std::atomic<uint64_t> counter{0};
  uint64_t h = Mix(Mix(static_cast<uint64_t>(getpid())) ^ static_cast<uint64_t>(syscall(SYS_gettid)) ^
                   Mix(counter.fetch_add(1)));
  return o.first_uid + static_cast<uid_t>(h % o.uid_count);
}

// Processes and threads of `uid` now: RLIMIT_NPROC counts all of them.
long TasksOfUser(uid_t uid) {
  long count = 0;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return 0;
  while (dirent* e = readdir(proc)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::string dir = std::string("/proc/") + e->d_name;
    struct stat st;
    if (stat(dir.c_str(), &st) != 0 || st.st_uid != uid) continue;
    DIR* tasks = opendir((dir + "/task").c_str());
    if (tasks == nullptr) continue;
    while (dirent* t = readdir(tasks)) count += t->d_name[0] != '.';
    closedir(tasks);
  }
  closedir(proc);
  return count;
}

// Reads what is available on fd into *out (at most `cap` bytes kept).
// Returns false at EOF or on an error other than EAGAIN/EINTR.
bool Drain(int fd, std::string* out, size_t cap, bool* over) {
  char chunk[65536];
  while (true) {
    ssize_t n = read(fd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return true;
    if (n <= 0) return false;
    size_t room = cap > out->size() ? cap - out->size() : 0;
    out->append(chunk, std::min(room, static_cast<size_t>(n)));
    if (static_cast<size_t>(n) > room) {
      *over = true;
      return true;
    }
  }
}

Status CheckOptions(const SandboxOptions& o) {
  const SandboxLimits& l = o.limits;
  if (l.wall_time.count() <= 0) return Status::InvalidArgument("sandbox wall_time must be positive");
  if (l.cpu_seconds <= 0) return Status::InvalidArgument("sandbox cpu_seconds must be positive");
  if (l.address_space_bytes < (size_t{32} << 20)) return Status::InvalidArgument("sandbox address space below 32 MiB");
  if (l.max_processes < 3) return Status::InvalidArgument("sandbox max_processes below 3 (bwrap needs two)");
  if (l.max_open_files < 16) return Status::InvalidArgument("sandbox max_open_files below 16");
  if (l.max_output_bytes == 0 || l.tmp_bytes == 0 || l.max_file_bytes == 0) {
    return Status::InvalidArgument("sandbox output, tmp and file sizes must be positive");
  }
  if (o.uid_count == 0 || o.first_uid == 0 || o.first_uid + o.uid_count < o.first_uid) {
    return Status::InvalidArgument("sandbox uid range must be non-empty, above 0 and not wrap");
  }
  for (const std::string& p : o.read_only_paths) {
    if (p.empty() || p[0] != '/' || p == "/") return Status::InvalidArgument("read-only path '" + p + "' must be an absolute folder other than /");
  }
  return Status::OK();
}

}  // namespace

std::string SandboxRun::Describe(const SandboxLimits& limits) const {
  if (timed_out) return "timed out after " + std::to_string(limits.wall_time.count()) + " ms";
  if (output_limit) return "output over " + std::to_string(limits.max_output_bytes) + " bytes";
  int sig = signal;
  if (exited && exit_code > 128 && exit_code < 128 + 65) sig = exit_code - 128;  // bwrap's way to pass a signal on
  // The program is PID 1 of its namespace, which ignores SIGXCPU; the hard
  // limit's SIGKILL is what ends it.
  if (sig == SIGKILL || sig == SIGXCPU) {
    return "killed: CPU time limit (" + std::to_string(limits.cpu_seconds) + " s) or out of memory";
  }
  if (sig != 0) {
    const char* name = strsignal(sig);
    return "killed by signal " + std::to_string(sig) + " (" + (name ? name : "?") + ")";
  }
  return "exit " + std::to_string(exit_code);
}

Result<std::unique_ptr<Sandbox>> Sandbox::Create(SandboxOptions options, std::vector<std::string> probe,
                                                 std::string probe_stdout) {
  GROVE_RETURN_IF_ERROR(CheckOptions(options));
  if (probe.empty()) return Status::InvalidArgument("sandbox probe command is empty");
  if (access(options.bwrap_path.c_str(), X_OK) != 0) {
    return Status::FailedPrecondition("bubblewrap not found: cannot execute " + options.bwrap_path + " (" +
                                      std::strerror(errno) + "); install Debian's package 'bubblewrap'");
  }
  std::unique_ptr<Sandbox> sandbox(new Sandbox(std::move(options)));
  for (const std::string& path : sandbox->options_.read_only_paths) {
    struct stat st;
    if (lstat(path.c_str(), &st) != 0) continue;  // not on this host
    if (S_ISLNK(st.st_mode)) {
      char target[4096];
      ssize_t n = readlink(path.c_str(), target, sizeof(target) - 1);
      if (n <= 0) continue;
      sandbox->mount_args_.insert(sandbox->mount_args_.end(), {"--symlink", std::string(target, static_cast<size_t>(n)), path});
    } else {
      sandbox->mount_args_.insert(sandbox->mount_args_.end(), {"--ro-bind", path, path});
    }
  }
  // The probe gets time to spare: it checks the sandbox, not the machine's load.
  SandboxLimits probe_limits = sandbox->options_.limits;
  probe_limits.wall_time = std::max(probe_limits.wall_time, std::chrono::milliseconds(10000));
  probe_limits.cpu_seconds = std::max(probe_limits.cpu_seconds, 10);
  Result<SandboxRun> run = sandbox->RunWithLimits(probe, "", {}, probe_limits);
  if (!run.ok()) {
    return Status::FailedPrecondition("bubblewrap cannot create the sandbox here (user namespaces disabled?): " +
                                      run.status().message());
  }
  if (!run->exited || run->exit_code != 0 || run->stdout_text != probe_stdout) {
    return Status::FailedPrecondition("the sandbox probe '" + probe[0] + "' failed inside bubblewrap: " +
                                      run->Describe(sandbox->options_.limits) + ", stdout '" +
                                      Snippet(run->stdout_text, 60) + "', stderr '" + Snippet(run->stderr_text, 200) + "'");
  }
  return sandbox;
}

Result<SandboxRun> Sandbox::Run(const std::vector<std::string>& argv, std::string_view stdin_data,
                                const std::vector<SandboxFile>& files) const {
  return RunWithLimits(argv, stdin_data, files, options_.limits);
}

Result<SandboxRun> Sandbox::RunWithLimits(const std::vector<std::string>& argv, std::string_view stdin_data,
                                          const std::vector<SandboxFile>& files, const SandboxLimits& limits) const {
  if (argv.empty()) return Status::InvalidArgument("sandbox: empty command");
  if (files.size() > kMaxFiles) return Status::InvalidArgument("sandbox: more than 8 files");

  // The files, each in an anonymous memory file that bwrap copies in.
  std::vector<Fd> file_fds;
  for (const SandboxFile& f : files) {
    if (!f.path.starts_with("/tmp/") || f.path.find("/..") != std::string::npos) {
      return Status::InvalidArgument("sandbox file path must be under /tmp: " + f.path);
    }
    Fd fd(memfd_create("grove-sandbox-file", MFD_CLOEXEC));
    if (fd.get() < 0) return Status::Internal(Errno("memfd_create"));
    size_t done = 0;
    while (done < f.content.size()) {
      ssize_t n = write(fd.get(), f.content.data() + done, f.content.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Status::Internal(Errno("writing a sandbox file"));
      done += static_cast<size_t>(n);
    }
    if (lseek(fd.get(), 0, SEEK_SET) != 0) return Status::Internal(Errno("lseek"));
    file_fds.push_back(std::move(fd));
  }

  // Everything the child needs is built before fork: after it, only
  // async-signal-safe calls.
  std::vector<std::string> args = {options_.bwrap_path,
                                   "--unshare-all", "--unshare-user", "--disable-userns",
                                   "--die-with-parent", "--as-pid-1", "--new-session", "--cap-drop", "ALL",
                                   "--json-status-fd", std::to_string(kStatusFd),
                                   "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                                   "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox"};
  args.insert(args.end(), mount_args_.begin(), mount_args_.end());
  args.insert(args.end(), {"--proc", "/proc", "--dev", "/dev", "--size", std::to_string(limits.tmp_bytes),
                           "--tmpfs", "/tmp"});
  for (size_t i = 0; i < files.size(); ++i) {
    args.insert(args.end(), {"--perms", "0444", "--ro-bind-data", std::to_string(kFirstFileFd + static_cast<int>(i)),
                             files[i].path});
  }
  args.insert(args.end(), {"--remount-ro", "/", "--chdir", "/tmp", "--"});
  args.insert(args.end(), argv.begin(), argv.end());
  std::vector<char*> c_args;
  for (std::string& a : args) c_args.push_back(a.data());
  c_args.push_back(nullptr);
  char env_path[] = "PATH=/usr/bin:/bin";
  char* c_env[] = {env_path, nullptr};

  const bool root = geteuid() == 0;
  const uid_t uid = root ? PickUid(options_) : geteuid();
  rlim_t nproc = static_cast<rlim_t>(limits.max_processes);
  if (!root) nproc += static_cast<rlim_t>(TasksOfUser(uid));
  struct Limit {
    int resource;
    rlimit value;
  };
  const rlim_t cpu = static_cast<rlim_t>(limits.cpu_seconds);
  const Limit rlimits[] = {
      {RLIMIT_CPU, {cpu, cpu}},
      {RLIMIT_AS, {limits.address_space_bytes, limits.address_space_bytes}},
      {RLIMIT_NPROC, {nproc, nproc}},
      {RLIMIT_FSIZE, {limits.max_file_bytes, limits.max_file_bytes}},
      {RLIMIT_NOFILE, {static_cast<rlim_t>(limits.max_open_files), static_cast<rlim_t>(limits.max_open_files)}},
      {RLIMIT_CORE, {0, 0}},
  };

  int stdin_pair[2], out_pipe[2], err_pipe[2], status_pipe[2], exec_pipe[2];
  // stdin is a socket so that writing to a program that stopped reading is
  // EPIPE with MSG_NOSIGNAL, never a SIGPIPE in grove.
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, stdin_pair) != 0) return Status::Internal(Errno("socketpair"));
  Fd stdin_parent(stdin_pair[0]), stdin_child(stdin_pair[1]);
  if (pipe2(out_pipe, O_CLOEXEC) != 0) return Status::Internal(Errno("pipe"));
  Fd out_read(out_pipe[0]), out_write(out_pipe[1]);
  if (pipe2(err_pipe, O_CLOEXEC) != 0) return Status::Internal(Errno("pipe"));
  Fd err_read(err_pipe[0]), err_write(err_pipe[1]);
  if (pipe2(status_pipe, O_CLOEXEC) != 0) return Status::Internal(Errno("pipe"));
  Fd status_read(status_pipe[0]), status_write(status_pipe[1]);
  if (pipe2(exec_pipe, O_CLOEXEC) != 0) return Status::Internal(Errno("pipe"));
  Fd exec_read(exec_pipe[0]), exec_write(exec_pipe[1]);

  // Child fd layout: source fds in the order of their target numbers 0..N.
  std::vector<int> sources = {stdin_child.get(), out_write.get(), err_write.get(), status_write.get(), exec_write.get()};
  for (const Fd& f : file_fds) sources.push_back(f.get());
  const int num_fds = static_cast<int>(sources.size());

  const Clock::time_point start = Clock::now();
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return Status::Internal(Errno("fork"));
  if (pid == 0) {
    int error_fd = exec_write.get();  // kExecErrorFd once the descriptors are in place
    auto fail = [&](int err) {
      ssize_t ignored = write(error_fd, &err, sizeof(err));
      (void)ignored;
      _exit(127);
    };
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // grove's scoring process dies: so does the sandbox
    if (getppid() != parent) _exit(127);
    // Move every source above the target range first, so no dup2 below
    // overwrites a source not yet placed.
    int high[16];
    for (int i = 0; i < num_fds; ++i) {
      high[i] = fcntl(sources[static_cast<size_t>(i)], F_DUPFD_CLOEXEC, 64);
      if (high[i] < 0) fail(errno);
    }
    for (int i = 0; i < num_fds; ++i) {
      if (dup2(high[i], i) < 0) fail(errno);  // dup2 clears close-on-exec
    }
    error_fd = kExecErrorFd;
    if (fcntl(kExecErrorFd, F_SETFD, FD_CLOEXEC) != 0) fail(errno);
    if (syscall(SYS_close_range, static_cast<unsigned>(num_fds), ~0U, 0U) != 0) {
      for (int fd = num_fds; fd < 65536; ++fd) close(fd);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int s = 1; s < NSIG; ++s) {
      if (s != SIGKILL && s != SIGSTOP) signal(s, SIG_DFL);
    }
    if (root) {
      if (setgroups(0, nullptr) != 0 || setresgid(uid, uid, uid) != 0 || setresuid(uid, uid, uid) != 0) fail(errno);
    }
    for (const Limit& l : rlimits) {
      if (setrlimit(l.resource, &l.value) != 0) fail(errno);
    }
    execve(c_args[0], c_args.data(), c_env);
    fail(errno);
  }
  // Parent. setpgid here too, so that a kill right after fork reaches the group.
  setpgid(pid, pid);
  stdin_child.reset();
  out_write.reset();
  err_write.reset();
  status_write.reset();
  exec_write.reset();
  file_fds.clear();

  auto kill_all = [pid] {
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
  };
  int exec_errno = 0;
  ssize_t got;
  do {
    got = read(exec_read.get(), &exec_errno, sizeof(exec_errno));
  } while (got < 0 && errno == EINTR);
  if (got == static_cast<ssize_t>(sizeof(exec_errno))) {
    int status;
    waitpid(pid, &status, 0);
    return Status::FailedPrecondition("cannot start " + options_.bwrap_path + ": " + std::strerror(exec_errno));
  }

  SandboxRun run;
  std::string status_json;
  for (int fd : {stdin_parent.get(), out_read.get(), err_read.get(), status_read.get()}) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  }
  size_t stdin_sent = 0;
  if (stdin_data.empty()) stdin_parent.reset();
  bool out_open = true, err_open = true, status_open = true;
  const Clock::time_point deadline = start + limits.wall_time;
  // After a kill, the pipes close as the namespace is torn down; this bounds
  // the wait for that.
  Clock::time_point drain_deadline = Clock::time_point::max();
  bool killed = false;
  while (out_open || err_open || status_open) {
    const Clock::time_point now = Clock::now();
    if (!killed && now >= deadline) {
      run.timed_out = true;
      kill_all();
      killed = true;
      drain_deadline = now + std::chrono::seconds(2);
    }
    if (killed && now >= drain_deadline) break;
    pollfd p[4];
    int n = 0;
    int in_slot = -1, out_slot = -1, err_slot = -1, status_slot = -1;
    if (stdin_parent.get() >= 0) {
      in_slot = n;
      p[n++] = {stdin_parent.get(), POLLOUT, 0};
    }
    if (out_open) {
      out_slot = n;
      p[n++] = {out_read.get(), POLLIN, 0};
    }
    if (err_open) {
      err_slot = n;
      p[n++] = {err_read.get(), POLLIN, 0};
    }
    if (status_open) {
      status_slot = n;
      p[n++] = {status_read.get(), POLLIN, 0};
    }
    int ready = poll(p, static_cast<nfds_t>(n), RemainingMs(killed ? drain_deadline : deadline));
    if (ready < 0 && errno != EINTR) {
      kill_all();
      killed = true;
      break;
    }
    if (ready <= 0) continue;
    if (in_slot >= 0 && p[in_slot].revents != 0) {
      ssize_t sent = send(stdin_parent.get(), stdin_data.data() + stdin_sent, stdin_data.size() - stdin_sent,
                          MSG_NOSIGNAL | MSG_DONTWAIT);
      if (sent > 0) stdin_sent += static_cast<size_t>(sent);
      if ((sent < 0 && errno != EAGAIN && errno != EINTR) || stdin_sent == stdin_data.size()) stdin_parent.reset();
    }
    bool over = false;
    if (out_slot >= 0 && p[out_slot].revents != 0) out_open = Drain(out_read.get(), &run.stdout_text, limits.max_output_bytes, &over);
    if (err_slot >= 0 && p[err_slot].revents != 0) err_open = Drain(err_read.get(), &run.stderr_text, limits.max_output_bytes, &over);
    if (status_slot >= 0 && p[status_slot].revents != 0) {
      bool status_over = false;
      status_open = Drain(status_read.get(), &status_json, 4096, &status_over);
    }
    if (over && !killed) {
      run.output_limit = true;
      kill_all();
      killed = true;
      drain_deadline = Clock::now() + std::chrono::seconds(2);
      out_open = err_open = false;  // what was kept is all that is wanted
    }
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  run.wall = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
  if (WIFEXITED(status)) {
    run.exited = true;
    run.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    run.signal = WTERMSIG(status);
  }
  // bwrap reports "child-pid" once the sandbox is built and the program
  // started; without it, bwrap itself failed and said why on stderr.
  if (!killed && status_json.find("\"child-pid\"") == std::string::npos) {
    return Status::FailedPrecondition("bubblewrap failed to set up the sandbox: " +
                                      Snippet(TrimSpace(run.stderr_text), 300) + " (" + run.Describe(limits) + ")");
  }
  return run;
}

}  // namespace grove::reward
