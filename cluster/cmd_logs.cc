// grove logs ROLE[/ID] [-f]: prints an actor's log from the run directory.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "actors/process.h"
#include "cluster/cli_flags.h"
#include "cluster/commands.h"
#include "cluster/log_files.h"
#include "cluster/run_dir.h"

namespace grove::cli {
namespace {

int Fail(const Status& s) {
  std::fprintf(stderr, "grove logs: %s\n", s.ToString().c_str());
  return 1;
}

bool WriteAll(const char* data, size_t n) {
  return std::fwrite(data, 1, n, stdout) == n;
}

// Copies fd from `offset` to EOF onto stdout; returns the new offset, or -1
// when stdout is gone (e.g. `grove logs ... | head`).
off_t CopyFrom(int fd, off_t offset) {
  char buf[1 << 16];
  for (;;) {
    ssize_t n = pread(fd, buf, sizeof(buf), offset);
    if (n <= 0) break;
    if (!WriteAll(buf, static_cast<size_t>(n))) return -1;
    offset += n;
  }
  return std::fflush(stdout) == 0 ? offset : -1;
}

// The offset where the last `lines` lines of fd (of size `size`) begin.
off_t TailOffset(int fd, off_t size, int64_t lines) {
  if (lines <= 0 || size == 0) return 0;
  char buf[1 << 16];
  off_t end = size;
  int64_t newlines = 0;
  // A final newline ends the last line rather than starting an empty one.
  char last = 0;
  if (pread(fd, &last, 1, size - 1) == 1 && last == '\n') --newlines;
  while (end > 0) {
    const off_t start = end > static_cast<off_t>(sizeof(buf)) ? end - static_cast<off_t>(sizeof(buf)) : 0;
    const ssize_t n = pread(fd, buf, static_cast<size_t>(end - start), start);
    if (n <= 0) return 0;
    for (ssize_t i = n - 1; i >= 0; --i) {
      if (buf[i] == '\n' && ++newlines == lines) return start + i + 1;
    }
    end = start;
  }
  return 0;
}

}  // namespace

int CmdLogs(int argc, char** argv) {
  std::string run_dir;
  bool follow = false;
  int64_t tail = 0, poll_ms = 200;
  FlagSet flags("grove logs ROLE[/ID] [-f] [--tail N] [--run_dir DIR]",
                "Prints an actor's log (<run_dir>/logs/<id>.log; the run directory is found like\n"
                "`grove status` finds it). ROLE alone works when the role has one actor\n"
                "(grove logs learner); else name it: grove logs rollout/1, or rollout/rollout-1,\n"
                "or rollout-1. `launcher` is the detached launcher's own log. -f keeps printing\n"
                "what is appended (restarts of the actor included) until Ctrl-C.");
  flags.String("run_dir", &run_dir, "run directory (default $GROVE_RUN_DIR, else runs/latest)");
  flags.Bool("follow", &follow, "keep printing new lines (also -f)");
  flags.Int("tail", &tail, "print only the last N lines first (0: the whole log)");
  flags.Int("poll_ms", &poll_ms, "with -f: how often to look for new output");
  // FlagSet knows only --long flags; -f is the spelling everybody types.
  std::vector<char*> args(argv, argv + argc);
  std::string follow_flag = "--follow";
  for (size_t i = 2; i < args.size(); ++i) {
    if (std::strcmp(args[i], "-f") == 0) args[i] = follow_flag.data();
  }
  Status parsed = flags.Parse(argc, args.data(), 2);
  if (flags.help()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  if (!parsed.ok()) return Fail(parsed);
  if (flags.positional().size() != 1) {
    return Fail(Status::InvalidArgument("name exactly one actor: grove logs ROLE[/ID] [-f]"));
  }
  if (tail < 0 || poll_ms < 1 || poll_ms > 60000) {
    return Fail(Status::InvalidArgument("--tail must be >= 0 and --poll_ms in [1, 60000]"));
  }
  auto dir = FindRunDir(run_dir);
  if (!dir.ok()) return Fail(dir.status());
  auto path = ResolveLogFile(*dir, flags.positional()[0]);
  if (!path.ok()) return Fail(path.status());

  int fd = open(path->c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Fail(Status::IOError("cannot open " + *path + ": " + std::strerror(errno)));
  struct stat st {};
  fstat(fd, &st);
  off_t offset = CopyFrom(fd, TailOffset(fd, st.st_size, tail));
  if (!follow || offset < 0) {
    close(fd);
    return offset < 0 ? 1 : 0;
  }
  actors::InstallDrainSignalHandlers();
  while (!actors::DrainSignalled()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(poll_ms));
    // The launcher appends to one file per id, but a person may truncate or
    // replace it: follow the path, and start over when the file shrank.
    struct stat now {};
    if (stat(path->c_str(), &now) == 0 && (now.st_ino != st.st_ino || now.st_dev != st.st_dev)) {
      int reopened = open(path->c_str(), O_RDONLY | O_CLOEXEC);
      if (reopened >= 0) {
        offset = CopyFrom(fd, offset);  // the old file's last words
        close(fd);
        fd = reopened;
        st = now;
        offset = 0;
      }
    }
    struct stat cur {};
    if (fstat(fd, &cur) == 0 && cur.st_size < offset) offset = 0;
    offset = CopyFrom(fd, offset);
    if (offset < 0) break;
  }
  close(fd);
  return 0;
}

}  // namespace grove::cli
