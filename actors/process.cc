#include "actors/process.h"

#include <csignal>
#include <cstdio>
#include <iomanip>
#include <thread>

#include <glog/logging.h>

namespace grove::actors {
namespace {

volatile std::sig_atomic_t g_signals = 0;  // how many SIGTERM/SIGINT arrived
std::string* g_actor_id = nullptr;         // leaked: read by glog until exit

extern "C" void OnTerminate(int) {
  if (g_signals < 2) g_signals = g_signals + 1;
}

void PrefixWithActorId(std::ostream& s, const google::LogMessageInfo& l, void*) {
  s << l.severity[0] << std::setw(2) << std::setfill('0') << 1 + l.time.month() << std::setw(2)
    << l.time.day() << ' ' << std::setw(2) << l.time.hour() << ':' << std::setw(2)
    << l.time.min() << ':' << std::setw(2) << l.time.sec() << '.' << std::setw(6)
    << l.time.usec() << std::setfill(' ') << ' ' << (g_actor_id ? *g_actor_id : "?") << ' '
    << l.filename << ':' << l.line_number << "]";
}

}  // namespace

void InitActorLogging(const char* argv0, const std::string& actor_id) {
  if (google::IsGoogleLoggingInitialized()) return;
  g_actor_id = new std::string(actor_id);
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv0, &PrefixWithActorId, nullptr);
}

void InstallDrainSignalHandlers() {
  struct sigaction sa {};
  sa.sa_handler = &OnTerminate;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: blocking calls return EINTR and loops re-check the flags
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

bool DrainSignalled() { return g_signals >= 1; }
bool StopSignalled() { return g_signals >= 2; }
void RequestDrain() {
  if (g_signals < 1) g_signals = 1;
}

Result<std::unique_ptr<ActorProcess>> ActorProcess::Start(const RoleArgs& args, wire::Role role,
                                                           std::string data_endpoint) {
  if (args.coordinator.empty()) {
    return Status::InvalidArgument("--coordinator is required for role " + args.role);
  }
  InstallDrainSignalHandlers();
  ActorClientOptions options;
  options.role = role;
  options.id = args.id;
  options.coordinator = args.coordinator;
  options.data_endpoint = std::move(data_endpoint);
  options.restarts = args.restarts;
  auto client = std::make_unique<ActorClient>(options);
  GROVE_RETURN_IF_ERROR(client->Start());
  return std::unique_ptr<ActorProcess>(new ActorProcess(std::move(client)));
}

bool ActorProcess::draining() const {
  return DrainSignalled() || client_->command() != wire::CommandKind::NONE;
}

bool ActorProcess::stopping() const {
  return StopSignalled() || client_->command() == wire::CommandKind::STOP;
}

void ActorProcess::ReportDraining() {
  if (reported_draining_) return;
  reported_draining_ = true;
  LOG(INFO) << "draining";
  client_->SetState(wire::ActorState::DRAINING);
}

int ActorProcess::Finish(int exit_code, const std::string& reason) {
  if (finished_) return exit_code;
  finished_ = true;
  const bool clean = exit_code == 0;
  const std::string why = !reason.empty() ? reason : clean ? "exit 0" : "exit " + std::to_string(exit_code);
  LOG(INFO) << "stopping: " << why;
  client_->Shutdown(clean ? wire::ActorState::STOPPED : wire::ActorState::DEAD, why, clean);
  return exit_code;
}

void ActorProcess::WaitFor(int ms) const {
  const int64_t until = MonotonicMs() + ms;
  while (!draining()) {
    const int64_t left = until - MonotonicMs();
    if (left <= 0) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min<int64_t>(left, 10)));
  }
}

}  // namespace grove::actors
