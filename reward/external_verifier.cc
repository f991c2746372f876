#include "reward/external_verifier.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <mutex>

#include <nlohmann/json.hpp>

#include "reward/answer.h"

namespace grove::reward {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(left);
}

class ExternalVerifier final : public Verifier {
 public:
  explicit ExternalVerifier(ExternalVerifierOptions options) : options_(std::move(options)) {}
  ~ExternalVerifier() override {
    std::lock_guard<std::mutex> lock(mu_);
    Stop();
  }

  VerifyOutput Verify(const VerifyInput& in) const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (owner_ != getpid()) Forget();  // inherited through fork: the program belongs to the parent
    if (pid_ < 0) {
      std::string error = Spawn();
      if (!error.empty()) return VerifyOutput::Make(0.0, error);
    }
    json request;
    request["prompt"] = std::string(in.prompt);
    request["completion"] = std::string(in.completion);
    json reference = json::parse(in.reference.begin(), in.reference.end(), nullptr, false);
    request["reference"] = reference.is_discarded() ? json(std::string(in.reference)) : reference;
    request["token_count"] = in.token_count;
    std::string line = request.dump(-1, ' ', false, json::error_handler_t::replace);
    line.push_back('\n');

    const Clock::time_point deadline = Clock::now() + options_.timeout;
    std::string reply;
    std::string error = Exchange(line, deadline, &reply);
    if (!error.empty()) {
      Stop();
      return VerifyOutput::Make(0.0, error);
    }
    return ParseReply(reply);
  }

 private:
  VerifyOutput ParseReply(const std::string& line) const {
    json reply = json::parse(line, nullptr, false);
    if (reply.is_discarded() || !reply.is_object()) return VerifyOutput::Make(0.0, "external verifier: reply is not a JSON object");
    if (!reply.contains("reward") || !reply["reward"].is_number()) {
      return VerifyOutput::Make(0.0, "external verifier: reply has no numeric reward");
    }
    VerifyOutput out;
    out.reward = reply["reward"].get<double>();
    if (!std::isfinite(out.reward)) return VerifyOutput::Make(0.0, "external verifier: non-finite reward");
    if (reply.contains("reason") && reply["reason"].is_string()) out.reason = Snippet(reply["reason"].get<std::string>(), 200);
    if (reply.contains("scores") && reply["scores"].is_object()) {
      for (auto& [name, value] : reply["scores"].items()) {
        if (value.is_number() && std::isfinite(value.get<double>()) && out.scores.size() < 32) {
          out.scores.push_back({Snippet(name, 32), value.get<double>()});
        }
      }
    }
    return out;
  }

  // Sends `line` and reads one reply line, both before `deadline`.
  std::string Exchange(const std::string& line, Clock::time_point deadline, std::string* reply) const {
    size_t sent = 0;
    while (sent < line.size()) {
      pollfd p{fd_, POLLOUT, 0};
      int ready = poll(&p, 1, RemainingMs(deadline));
      if (ready < 0 && errno == EINTR) continue;
      if (ready == 0) return TimeoutReason();
      ssize_t n = send(fd_, line.data() + sent, line.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n <= 0) return ExitReason("stopped reading");
      sent += static_cast<size_t>(n);
    }
    while (true) {
      size_t newline = buffer_.find('\n');
      if (newline != std::string::npos) {
        *reply = buffer_.substr(0, newline);
        buffer_.erase(0, newline + 1);
        return "";
      }
      if (buffer_.size() > options_.max_reply_bytes) return "external verifier: reply longer than limit";
      pollfd p{fd_, POLLIN, 0};
      int ready = poll(&p, 1, RemainingMs(deadline));
      if (ready < 0 && errno == EINTR) continue;
      if (ready == 0) return TimeoutReason();
      char chunk[65536];
      ssize_t n = recv(fd_, chunk, sizeof(chunk), MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n <= 0) return ExitReason("closed its output");
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

  std::string TimeoutReason() const {
    return "external verifier timed out after " + std::to_string(options_.timeout.count()) + " ms";
  }

  std::string ExitReason(const char* what) const {
    // Give a dying program a moment to be reaped so the reason can name how it ended.
    int status = 0;
    pid_t done = 0;
    for (int i = 0; i < 500 && done == 0; ++i) {
      done = waitpid(pid_, &status, WNOHANG);
      if (done == 0) usleep(2000);
    }
    std::string reason = std::string("external verifier ") + what;
    if (done == pid_) {
      if (WIFEXITED(status)) reason += " (exit status " + std::to_string(WEXITSTATUS(status)) + ")";
      if (WIFSIGNALED(status)) reason += " (signal " + std::to_string(WTERMSIG(status)) + ")";
      pid_ = -1;  // reaped
    }
    return reason;
  }

  std::string Spawn() const {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return "external verifier: socketpair failed";
    // Everything the child needs is prepared before fork: after it, only
    // async-signal-safe calls.
    const char* argv[] = {"sh", "-c", options_.command.c_str(), nullptr};
    const pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
      close(fds[0]);
      close(fds[1]);
      return "external verifier: fork failed";
    }
    if (pid == 0) {
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);  // the parent died before prctl
      dup2(fds[1], STDIN_FILENO);   // dup2 clears CLOEXEC on the copies
      dup2(fds[1], STDOUT_FILENO);
      execv("/bin/sh", const_cast<char* const*>(argv));
      _exit(127);
    }
    setpgid(pid, pid);  // also from here, so the group exists before any kill
    close(fds[1]);
    fd_ = fds[0];
    pid_ = pid;
    owner_ = parent;
    buffer_.clear();
    return "";
  }

  void Stop() const {
    if (owner_ != getpid()) {
      Forget();
      return;
    }
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    if (pid_ > 0) {
      kill(-pid_, SIGKILL);
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    pid_ = -1;
    buffer_.clear();
  }

  // Drops a program started by another process without touching it.
  void Forget() const {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    pid_ = -1;
    owner_ = getpid();
    buffer_.clear();
  }

  const ExternalVerifierOptions options_;
  mutable std::mutex mu_;
  mutable pid_t pid_ = -1;
  mutable pid_t owner_ = getpid();
  mutable int fd_ = -1;
  mutable std::string buffer_;
};

}  // namespace

std::unique_ptr<Verifier> MakeExternalVerifier(ExternalVerifierOptions options) {
  return std::make_unique<ExternalVerifier>(std::move(options));
}

}  // namespace grove::reward
