#include "reward/scoring_pool.h"

#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include <glog/logging.h>

#include "reward/answer.h"

namespace grove::reward {
namespace {

using Clock = std::chrono::steady_clock;

// Frames on the worker socket: u64 length, then the payload. Payloads are
// plain little-endian fields and length-prefixed byte strings; no text
// encoding, so any bytes in a completion travel unchanged.
class Writer {
 public:
  void U64(uint64_t v) { buf_.append(reinterpret_cast<const char*>(&v), sizeof(v)); }
  void I64(int64_t v) { buf_.append(reinterpret_cast<const char*>(&v), sizeof(v)); }
  void F64(double v) { buf_.append(reinterpret_cast<const char*>(&v), sizeof(v)); }
  void Str(std::string_view s) {
    U64(s.size());
    buf_.append(s.data(), s.size());
  }
  std::string Frame() const {
    std::string out(sizeof(uint64_t), '\0');
    uint64_t n = buf_.size();
    std::memcpy(out.data(), &n, sizeof(n));
    return out + buf_;
  }

 private:
  std::string buf_;
};

class Reader {
 public:
  explicit Reader(std::string_view data) : data_(data) {}
  bool U64(uint64_t* v) { return Raw(v, sizeof(*v)); }
  bool I64(int64_t* v) { return Raw(v, sizeof(*v)); }
  bool F64(double* v) { return Raw(v, sizeof(*v)); }
  bool Str(std::string_view* s) {
    uint64_t n;
    if (!U64(&n) || n > data_.size() - pos_) return false;
    *s = data_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  bool done() const { return pos_ == data_.size(); }

 private:
  bool Raw(void* v, size_t n) {
    if (data_.size() - pos_ < n) return false;
    std::memcpy(v, data_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  std::string_view data_;
  size_t pos_ = 0;
};

bool SendAll(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    ssize_t n = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

// Reads exactly n bytes; false on EOF or error.
bool RecvAll(int fd, char* out, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = recv(fd, out + got, n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    got += static_cast<size_t>(r);
  }
  return true;
}

// Extracts one complete frame's payload from `inbox`, if there is one.
bool TakeFrame(std::string* inbox, std::string* payload) {
  if (inbox->size() < sizeof(uint64_t)) return false;
  uint64_t n;
  std::memcpy(&n, inbox->data(), sizeof(n));
  if (inbox->size() - sizeof(n) < n) return false;
  *payload = inbox->substr(sizeof(n), n);
  inbox->erase(0, sizeof(n) + n);
  return true;
}

constexpr uint64_t kMaxRequestBytes = uint64_t{1} << 31;
constexpr uint64_t kMaxReplyBytes = uint64_t{1} << 20;
// Request bytes that may wait in a busy worker's socket; far below the
// kernel's default Unix socket buffer (about 200 KiB).
constexpr size_t kPipelineBytes = 32 << 10;

VerifyOutput Failure(std::string reason) { return VerifyOutput::Make(0.0, std::move(reason)); }

// The worker's whole life: read a request, verify, reply; exit on EOF.
[[noreturn]] void WorkerLoop(int fd, const Verifier& verifier) {
  std::string payload;
  while (true) {
    uint64_t n;
    if (!RecvAll(fd, reinterpret_cast<char*>(&n), sizeof(n)) || n > kMaxRequestBytes) _exit(0);
    payload.resize(n);
    if (!RecvAll(fd, payload.data(), n)) _exit(0);
    Reader r(payload);
    int64_t token_count;
    VerifyInput in;
    if (!r.I64(&token_count) || !r.Str(&in.prompt) || !r.Str(&in.completion) || !r.Str(&in.reference)) _exit(3);
    in.token_count = token_count;
    VerifyOutput out;
    try {
      out = verifier.Verify(in);
    } catch (const std::exception& e) {
      out = Failure("verifier threw: " + Snippet(e.what(), 100));
    } catch (...) {
      out = Failure("verifier threw a non-exception");
    }
    Writer w;
    w.F64(out.reward);
    w.Str(out.reason.size() > 500 ? out.reason.substr(0, 500) : out.reason);
    size_t count = std::min<size_t>(out.scores.size(), 64);
    w.U64(count);
    for (size_t i = 0; i < count; ++i) {
      w.Str(out.scores[i].name.substr(0, 64));
      w.F64(out.scores[i].value);
    }
    if (!SendAll(fd, w.Frame())) _exit(0);
  }
}

bool ParseReply(const std::string& payload, VerifyOutput* out) {
  Reader r(payload);
  std::string_view reason;
  uint64_t count;
  if (!r.F64(&out->reward) || !r.Str(&reason) || !r.U64(&count) || count > 64) return false;
  out->reason = Snippet(reason, 500);
  for (uint64_t i = 0; i < count; ++i) {
    std::string_view name;
    double value;
    if (!r.Str(&name) || !r.F64(&value)) return false;
    if (std::isfinite(value)) out->scores.push_back({std::string(name), value});
  }
  return r.done();
}

}  // namespace

ScoringPool::ScoringPool(std::shared_ptr<const Verifier> verifier, ScoringPoolOptions options)
    : verifier_(std::move(verifier)), options_(options) {}

Result<std::unique_ptr<ScoringPool>> ScoringPool::Start(std::shared_ptr<const Verifier> verifier,
                                                        ScoringPoolOptions options) {
  if (!verifier) return Status::InvalidArgument("scoring pool needs a verifier");
  if (options.num_workers < 1 || options.num_workers > 256) {
    return Status::InvalidArgument("scoring pool needs 1..256 workers, got " + std::to_string(options.num_workers));
  }
  if (options.sample_timeout.count() <= 0) return Status::InvalidArgument("scoring pool needs a positive sample timeout");
  if (options.pipeline_depth < 1 || options.pipeline_depth > 64) {
    return Status::InvalidArgument("scoring pool pipeline_depth must be in [1, 64]");
  }
  std::unique_ptr<ScoringPool> pool(new ScoringPool(std::move(verifier), options));
  pool->workers_.resize(static_cast<size_t>(options.num_workers));
  for (Worker& w : pool->workers_) GROVE_RETURN_IF_ERROR(pool->Spawn(w));
  return pool;
}

ScoringPool::~ScoringPool() {
  for (Worker& w : workers_) Kill(w);
}

Status ScoringPool::Spawn(Worker& w) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    return Status::IOError(std::string("scoring pool: socketpair: ") + strerror(errno));
  }
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return Status::ResourceExhausted(std::string("scoring pool: fork: ") + strerror(errno));
  }
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(0);
    close(fds[0]);
    for (const Worker& other : workers_) {
      if (other.fd >= 0) close(other.fd);
    }
    if (options_.memory_limit_bytes > 0) {
      rlimit limit{options_.memory_limit_bytes, options_.memory_limit_bytes};
      setrlimit(RLIMIT_AS, &limit);
    }
    WorkerLoop(fds[1], *verifier_);
  }
  setpgid(pid, pid);
  close(fds[1]);
  w.pid = pid;
  w.fd = fds[0];
  w.inflight.clear();
  w.inbox.clear();
  return Status::OK();
}

void ScoringPool::Kill(Worker& w) {
  if (w.fd >= 0) close(w.fd);
  w.fd = -1;
  if (w.pid > 0) {
    kill(-w.pid, SIGKILL);
    kill(w.pid, SIGKILL);
    waitpid(w.pid, nullptr, 0);
  }
  w.pid = -1;
  w.inflight.clear();
  w.inbox.clear();
}

std::string ScoringPool::Reap(Worker& w, bool killed) {
  int status = 0;
  std::string how;
  if (w.fd >= 0) close(w.fd);
  w.fd = -1;
  if (w.pid > 0) {
    if (killed) {
      kill(-w.pid, SIGKILL);
      kill(w.pid, SIGKILL);
    }
    if (waitpid(w.pid, &status, 0) == w.pid) {
      if (WIFSIGNALED(status)) {
        how = "signal " + std::to_string(WTERMSIG(status)) + " " + strsignal(WTERMSIG(status));
      } else if (WIFEXITED(status)) {
        how = "exit status " + std::to_string(WEXITSTATUS(status));
      }
    }
  }
  w.pid = -1;
  w.inbox.clear();
  return how;
}

std::vector<VerifyOutput> ScoringPool::Score(std::span<const VerifyInput> batch) {
  std::vector<VerifyOutput> results(batch.size());
  std::vector<int> attempts(batch.size(), 0);
  std::vector<size_t> frame_bytes(batch.size(), 0);
  std::deque<size_t> queue;  // samples waiting, in input order
  for (size_t i = 0; i < batch.size(); ++i) queue.push_back(i);
  size_t done = 0;

  auto finish = [&](size_t index, VerifyOutput out, bool failed) {
    if (!std::isfinite(out.reward)) {
      out = Failure("verifier returned a non-finite reward");
      failed = true;
    }
    results[index] = std::move(out);
    ++done;
    ++stats_.scored;
    if (failed) ++stats_.failed;
  };
  auto respawn = [&](Worker& w) {
    ++stats_.restarts;
    Status s = Spawn(w);
    if (!s.ok()) LOG(ERROR) << "scoring pool could not re-create a worker: " << s;
  };
  // A dead worker's front sample is charged with `reason`; those queued
  // behind it never started and go back to the front of the queue.
  auto fail_front = [&](Worker& w, std::string reason) {
    std::deque<size_t> inflight = std::move(w.inflight);
    w.inflight.clear();
    finish(inflight.front(), Failure(std::move(reason)), true);
    for (size_t k = inflight.size(); k > 1; --k) queue.push_front(inflight[k - 1]);
  };

  // Takes every reply a worker already wrote: one that died may have answered
  // several samples before the one it died on, and only that one is charged.
  // False when a reply is malformed.
  auto drain_replies = [&](Worker& w) {
    char chunk[65536];
    ssize_t n;
    while ((n = recv(w.fd, chunk, sizeof(chunk), MSG_DONTWAIT)) > 0) w.inbox.append(chunk, static_cast<size_t>(n));
    std::string payload;
    while (!w.inflight.empty() && TakeFrame(&w.inbox, &payload)) {
      VerifyOutput out;
      if (!ParseReply(payload, &out)) return false;
      const size_t index = w.inflight.front();
      w.inflight.pop_front();
      const bool failed = out.reason.starts_with("verifier threw");
      finish(index, std::move(out), failed);
    }
    return true;
  };

  while (done < batch.size()) {
    // Keep every worker's pipeline full.
    for (Worker& w : workers_) {
      while (!queue.empty() && w.inflight.size() < static_cast<size_t>(options_.pipeline_depth)) {
        if (w.pid < 0) respawn(w);
        if (w.pid < 0) break;
        const size_t index = queue.front();
        const VerifyInput& in = batch[index];
        Writer req;
        req.I64(in.token_count);
        req.Str(in.prompt);
        req.Str(in.completion);
        req.Str(in.reference);
        std::string frame = req.Frame();
        // The send blocks. It cannot block for long when the worker is idle
        // (it is reading), nor when everything queued to a busy worker fits
        // in the socket buffer; a larger sample waits for the worker to be
        // idle, so a hanging sample can never stall the pool in send().
        size_t queued = 0;
        for (size_t q : w.inflight) queued += frame_bytes[q];
        if (!w.inflight.empty() && queued + frame.size() > kPipelineBytes) break;
        frame_bytes[index] = frame.size();
        if (!SendAll(w.fd, frame)) {
          // It died: the sample it died on (the first unanswered one, if
          // any) is charged, this one retried.
          drain_replies(w);
          std::string how = Reap(w, true);
          if (!w.inflight.empty()) {
            fail_front(w, "verifier crashed (" + (how.empty() ? std::string("connection lost") : how) + ")");
          }
          if (++attempts[index] > 2) {
            queue.pop_front();
            finish(index, Failure("verifier worker could not be started"), true);
          }
          break;
        }
        queue.pop_front();
        if (w.inflight.empty()) w.deadline = Clock::now() + options_.sample_timeout;
        w.inflight.push_back(index);
      }
    }

    std::vector<pollfd> fds;
    std::vector<Worker*> busy;
    Clock::time_point next_deadline = Clock::time_point::max();
    for (Worker& w : workers_) {
      if (w.inflight.empty()) continue;
      fds.push_back(pollfd{w.fd, POLLIN, 0});
      busy.push_back(&w);
      next_deadline = std::min(next_deadline, w.deadline);
    }
    if (busy.empty()) {
      if (queue.empty()) break;
      bool any_alive = false;
      for (Worker& w : workers_) any_alive = any_alive || w.pid > 0;
      if (any_alive) continue;
      // No worker could be started: fail what is left rather than spin.
      while (!queue.empty()) {
        finish(queue.front(), Failure("no verifier worker could be started"), true);
        queue.pop_front();
      }
      break;
    }
    auto wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(next_deadline - Clock::now()).count();
    int ready = poll(fds.data(), fds.size(), static_cast<int>(std::max<long long>(0, wait_ms) + 1));
    if (ready < 0 && errno != EINTR) PLOG(ERROR) << "scoring pool: poll";

    for (size_t k = 0; k < busy.size(); ++k) {
      Worker& w = *busy[k];
      if (fds[k].revents != 0) {
        char chunk[65536];
        ssize_t n = recv(w.fd, chunk, sizeof(chunk), MSG_DONTWAIT);
        if (n > 0) {
          w.inbox.append(chunk, static_cast<size_t>(n));
          std::string payload;
          bool broken = false;
          while (!w.inflight.empty() && TakeFrame(&w.inbox, &payload)) {
            VerifyOutput out;
            if (!ParseReply(payload, &out)) {
              broken = true;
              break;
            }
            const size_t index = w.inflight.front();
            w.inflight.pop_front();
            const bool failed = out.reason.starts_with("verifier threw");
            finish(index, std::move(out), failed);
            // The next sample starts now.
            w.deadline = Clock::now() + options_.sample_timeout;
          }
          if (broken || w.inbox.size() > kMaxReplyBytes + 8) {
            Reap(w, true);
            fail_front(w, broken ? "verifier sent a malformed reply" : "verifier reply too large");
          }
          continue;
        }
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
          std::string how = Reap(w, false);
          fail_front(w, "verifier crashed (" + (how.empty() ? std::string("connection lost") : how) + ")");
          continue;
        }
      }
      if (!w.inflight.empty() && Clock::now() >= w.deadline) {
        Reap(w, true);
        fail_front(w, "verifier timed out after " + std::to_string(options_.sample_timeout.count()) + " ms");
      }
    }
  }
  return results;
}

}  // namespace grove::reward
