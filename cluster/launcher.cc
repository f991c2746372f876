#include "cluster/launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <thread>

#include <glog/logging.h>
#include <nlohmann/json.hpp>

#include "cluster/roles.h"
#include "cluster/run_dir.h"

namespace grove {

using actors::BodyKind;
using actors::MonotonicMs;

namespace {

// Every role recovers from a crash: workers hold nothing, the replay store
// reopens RocksDB, the learner resumes from its checkpoint and the store's
// cursor, and the coordinator relearns the cluster from heartbeats.
bool Restartable(const std::string& role) {
  return role == "rollout" || role == "verifier" || role == "coordinator" || role == "replay" ||
         role == "learner";
}

std::string DescribeWait(int status) {
  if (WIFSIGNALED(status)) return "signal " + std::to_string(WTERMSIG(status));
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  return "status " + std::to_string(status);
}

void SleepMs(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

}  // namespace

Launcher::Launcher(LauncherOptions options) : options_(std::move(options)) {}

Launcher::~Launcher() {
  for (auto& c : children_) {
    if (c.pid > 0) {
      kill(c.pid, SIGKILL);
      waitpid(c.pid, nullptr, 0);
    }
  }
}

Status Launcher::CanStart(const std::string& role) const {
  if (options_.programs.count(role) != 0) return Status::OK();
  if (role != "coordinator" && FindRole(role) != nullptr) return Status::OK();
  std::string known;
  for (const auto& r : Roles()) known += std::string(known.empty() ? "" : ", ") + r.name;
  return Status::FailedPrecondition(
      "cannot start role '" + role + "': this build of grove has no such role (it has: " + known +
      ") and [launcher.programs] names no program for it");
}

Status Launcher::Spawn(Child& child) {
  std::vector<std::string> args;
  auto program = options_.programs.find(child.role);
  if (program != options_.programs.end()) {
    args = {program->second, "--role=" + child.role, "--id=" + child.id,
            "--coordinator=" + coordinator_, "--config=" + options_.config_path,
            "--restarts=" + std::to_string(child.restarts), "--run_dir=" + options_.run_dir};
  } else if (child.role == "coordinator") {
    args = {options_.grove_binary, "run", "coordinator", "--id=coordinator",
            "--bind=" + coordinator_bind_, "--config=" + options_.config_path,
            "--endpoint_file=" + options_.run_dir + "/coordinator.endpoint",
            "--restarts=" + std::to_string(child.restarts), "--run_dir=" + options_.run_dir};
    // A restarted coordinator serves /metrics where its predecessor did, so
    // scrapers configured with the address keep working.
    if (!metrics_address_.empty()) args.push_back("--set=coordinator.metrics_bind=\"" + metrics_address_ + "\"");
  } else {
    args = {options_.grove_binary, "run", child.role, "--id=" + child.id,
            "--coordinator=" + coordinator_, "--config=" + options_.config_path,
            "--restarts=" + std::to_string(child.restarts), "--run_dir=" + options_.run_dir};
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log = options_.run_dir + "/logs/" + child.id + ".log";

  pid_t pid = fork();
  if (pid < 0) return Status::IOError(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    setpgid(0, 0);  // its own group: a Ctrl-C reaches the launcher, which drains in order
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    execv(argv[0], argv.data());
    const char msg[] = "grove launcher: exec failed\n";
    (void)!write(2, msg, sizeof(msg) - 1);
    _exit(127);
  }
  child.pid = pid;
  child.restart_at = 0;
  child.started_ms = MonotonicMs();
  LOG(INFO) << "started " << child.id << " pid " << pid << " (restarts " << child.restarts
            << ", log " << log << ")";
  WriteClusterJson();
  return Status::OK();
}

Status Launcher::StartCoordinator(int timeout_ms) {
  control_ = std::make_unique<actors::RouterSocket>();
  GROVE_ASSIGN_OR_RETURN(control_endpoint_, control_->Bind("tcp://127.0.0.1:0"));
  const std::string endpoint_file = options_.run_dir + "/coordinator.endpoint";
  std::remove(endpoint_file.c_str());
  std::remove((options_.run_dir + "/coordinator.metrics").c_str());
  auto cfg = Config::LoadFile(options_.config_path);
  if (!cfg.ok()) return cfg.status();
  GROVE_ASSIGN_OR_RETURN(coordinator_bind_,
                         cfg->String("coordinator.bind", std::string("tcp://127.0.0.1:0")));
  children_.insert(children_.begin(), Child{"coordinator", "coordinator"});
  GROVE_RETURN_IF_ERROR(Spawn(children_[0]));
  const int64_t deadline = MonotonicMs() + timeout_ms;
  while (MonotonicMs() < deadline) {
    std::ifstream in(endpoint_file);
    std::string endpoint;
    if (in >> endpoint && !endpoint.empty()) {
      coordinator_ = endpoint;
      // Restarts bind the same port, so actors find the new coordinator
      // where the old one was.
      coordinator_bind_ = endpoint;
      std::ifstream metrics(options_.run_dir + "/coordinator.metrics");
      if (!(metrics >> metrics_address_)) metrics_address_.clear();
      reporter_ = std::make_unique<actors::RpcClient>("launcher");
      GROVE_RETURN_IF_ERROR(reporter_->Connect(coordinator_));
      WriteClusterJson();
      return Status::OK();
    }
    int status = 0;
    if (waitpid(children_[0].pid, &status, WNOHANG) == children_[0].pid) {
      children_[0].pid = 0;
      return Status::Unavailable("the coordinator exited at start (" + DescribeWait(status) +
                                 "); see " + options_.run_dir + "/logs/coordinator.log");
    }
    SleepMs(10);
  }
  return Status::DeadlineExceeded("the coordinator did not start within " +
                                  std::to_string(timeout_ms) + " ms; see " + options_.run_dir +
                                  "/logs/coordinator.log");
}

int Launcher::Count(const std::string& role) const {
  int n = 0;
  for (const auto& c : children_) n += (c.role == role && !c.retiring) ? 1 : 0;
  return n;
}

Status Launcher::Scale(const std::string& role, int count) {
  if (role == "coordinator") return Status::InvalidArgument("there is exactly one coordinator");
  if (count < 0 || count > 1024) return Status::InvalidArgument("count must be in [0, 1024]");
  GROVE_RETURN_IF_ERROR(CanStart(role));
  int have = Count(role);
  for (int index = 0; have < count; ++index) {
    const std::string id = role + "-" + std::to_string(index);
    bool taken = false;
    for (const auto& c : children_) taken = taken || (c.id == id && (c.pid > 0 || c.restart_at > 0) && !c.retiring);
    if (taken) continue;
    Child* slot = nullptr;
    for (auto& c : children_) {
      if (c.id == id) slot = &c;
    }
    if (slot == nullptr) {
      children_.push_back(Child{role, id});
      slot = &children_.back();
    }
    if (slot->pid > 0) continue;  // still draining out; pick another id
    slot->retiring = false;
    GROVE_RETURN_IF_ERROR(Spawn(*slot));
    ++have;
  }
  for (auto it = children_.rbegin(); it != children_.rend() && have > count; ++it) {
    if (it->role != role || it->retiring) continue;
    it->retiring = true;
    it->restart_at = 0;
    if (it->pid > 0) {
      LOG(INFO) << "draining " << it->id << " (scale " << role << "=" << count << ")";
      kill(it->pid, SIGTERM);
    }
    --have;
  }
  return Status::OK();
}

void Launcher::ReportExit(const std::string& id, const std::string& reason, bool clean) {
  if (!reporter_) return;
  capnp::MallocMessageBuilder msg;
  auto ex = actors::InitEnvelope(msg, "launcher", 0).getBody().initExitReport();
  ex.setId(id);
  ex.setReason(reason);
  ex.setClean(clean);
  auto r = reporter_->Call(msg, {BodyKind::COMMAND_REPLY}, 1000);
  if (!r.ok()) LOG(WARNING) << "exit report for " << id << ": " << r.status();
}

void Launcher::Reap() {
  for (;;) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    for (auto& c : children_) {
      if (c.pid != pid) continue;
      c.pid = 0;
      const std::string reason = DescribeWait(status);
      const bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      LOG(INFO) << c.id << " exited: " << reason;
      if (c.role != "coordinator") ReportExit(c.id, reason, clean);
      if (MonotonicMs() - c.started_ms >= options_.restart_reset_ms) c.crash_streak = 0;
      // A learner that exits (0: its steps are done; else: it failed and said
      // why) ends the run; one killed by a signal crashed and is restarted.
      const bool learner_crashed = c.role == "learner" && WIFSIGNALED(status) && !stop_requested_ &&
                                   c.crash_streak < options_.restart_limit;
      if (c.role == "learner" && !learner_crashed) {
        learner_exited_ = true;
        learner_exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      } else if (!clean && !c.retiring && !stop_requested_ && Restartable(c.role)) {
        if (c.crash_streak < options_.restart_limit) {
          const int delay = options_.restart_backoff_ms << std::min(c.crash_streak, 10);
          ++c.crash_streak;
          c.restart_at = MonotonicMs() + delay;
          LOG(INFO) << "restarting " << c.id << " in " << delay << " ms";
        } else {
          LOG(ERROR) << c.id << " crashed " << c.crash_streak + 1 << " times in a row; not restarting it";
        }
      }
      WriteClusterJson();
    }
  }
}

void Launcher::HandleControl(int timeout_ms) {
  auto in = control_->Receive(timeout_ms);
  if (!in) return;
  auto frame = actors::DecodeFrame(in->payload.data(), in->payload.size(),
                                   {BodyKind::SCALE_REQUEST, BodyKind::COMMAND}, &control_->stats(),
                                   actors::DecodeLimits{.max_frame_bytes = 1 << 20});
  if (!frame.ok()) return;
  capnp::MallocMessageBuilder reply_msg;
  auto reply = actors::InitEnvelope(reply_msg, "launcher", frame->envelope().getRequestId());
  if (frame->kind() == BodyKind::SCALE_REQUEST) {
    auto req = frame->envelope().getBody().getScaleRequest();
    std::string role;
    switch (req.getRole()) {
      case wire::Role::ROLLOUT: role = "rollout"; break;
      case wire::Role::VERIFIER: role = "verifier"; break;
      case wire::Role::REPLAY: role = "replay"; break;
      case wire::Role::LEARNER: role = "learner"; break;
      default: role = "?"; break;
    }
    const int previous = Count(role);
    Status s = Scale(role, static_cast<int>(req.getCount()));
    if (!s.ok()) {
      reply.getBody().initError().setMessage(s.message());
    } else {
      auto r = reply.getBody().initScaleReply();
      r.setPrevious(static_cast<uint32_t>(previous));
      r.setCount(req.getCount());
      r.setMessage(role + ": " + std::to_string(previous) + " -> " + std::to_string(req.getCount()));
    }
  } else {
    LOG(INFO) << "shutdown requested by " << frame->envelope().getSender().cStr();
    stop_requested_ = true;
    reply.getBody().initCommandReply().setMatched(static_cast<uint32_t>(children_.size()));
  }
  (void)control_->Send(in->peer, actors::EncodeFrame(reply_msg));
}

int Launcher::Supervise(const std::function<bool()>& should_stop) {
  while (!should_stop() && !stop_requested_ && !learner_exited_) {
    HandleControl(20);
    Reap();
    const int64_t now = MonotonicMs();
    for (auto& c : children_) {
      if (c.restart_at > 0 && c.pid == 0 && now >= c.restart_at && !c.retiring) {
        ++c.restarts;
        Status s = Spawn(c);
        if (!s.ok()) LOG(ERROR) << "restart " << c.id << ": " << s;
      }
    }
  }
  return learner_exited_ ? learner_exit_code_ : 0;
}

// Stops the actors in data-flow order, each stage drained before the next is
// signalled: a draining rollout worker delivers its last group to a verifier,
// a draining verifier its scores to the replay store, the learner checkpoints
// while the store still serves, and the coordinator goes last so every actor
// can still deregister. Stopping all at once left rollout workers waiting
// for verifiers that had already gone (SIGKILLed at the stop timeout).
void Launcher::Shutdown(bool force) {
  stop_requested_ = true;
  static const std::vector<std::string> kStopOrder = {"rollout", "verifier", "learner", "replay"};
  auto stage_of = [&](const std::string& role) -> size_t {
    if (role == "coordinator") return kStopOrder.size() + 1;
    for (size_t i = 0; i < kStopOrder.size(); ++i) {
      if (kStopOrder[i] == role) return i;
    }
    return kStopOrder.size();  // any other role: after the known ones, before the coordinator
  };
  auto wait_stage = [&](size_t stage, int timeout_ms) {
    const int64_t deadline = MonotonicMs() + timeout_ms;
    for (;;) {
      Reap();
      bool any = false;
      for (auto& c : children_) any = any || (c.pid > 0 && stage_of(c.role) == stage);
      if (!any || MonotonicMs() >= deadline) return;
      if (control_) HandleControl(10); else SleepMs(10);
    }
  };
  auto signal_stage = [&](size_t stage, int sig) {
    for (auto& c : children_) {
      if (c.pid > 0 && stage_of(c.role) == stage) kill(c.pid, sig);
    }
  };
  for (size_t stage = 0; stage <= kStopOrder.size() + 1; ++stage) {
    signal_stage(stage, force ? SIGKILL : SIGTERM);
    wait_stage(stage, force ? 1000 : options_.stop_timeout_ms);
    signal_stage(stage, SIGKILL);
    wait_stage(stage, 1000);
  }
  WriteClusterJson();
}

std::string Launcher::metrics_url() const {
  return metrics_address_.empty() ? "" : "http://" + metrics_address_ + "/metrics";
}

void Launcher::MarkReady() {
  ready_ = true;
  WriteClusterJson();
}

void Launcher::WriteClusterJson() {
  nlohmann::json pids = nlohmann::json::object();
  for (const auto& c : children_) {
    if (c.pid > 0) pids[c.id] = c.pid;
  }
  nlohmann::json info = {{"name", options_.name},
                         {"run_dir", options_.run_dir},
                         {"coordinator", coordinator_},
                         {"launcher", control_endpoint_},
                         {"launcher_pid", static_cast<int>(getpid())},
                         {"config", options_.config_path},
                         {"metrics", metrics_url()},
                         {"pids", pids},
                         {"ready", ready_ && !stop_requested_}};
  Status s = WriteJsonAtomically(options_.run_dir + "/cluster.json", info);
  if (!s.ok()) LOG(WARNING) << s;
}

}  // namespace grove
