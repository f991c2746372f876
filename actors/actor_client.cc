#include "actors/actor_client.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <random>

#include <glog/logging.h>

namespace grove::actors {
namespace {

std::string HostName() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "unknown";
  return buf;
}

int Rank(wire::CommandKind k) {
  switch (k) {
    case wire::CommandKind::NONE: return 0;
    case wire::CommandKind::DRAIN: return 1;
    case wire::CommandKind::STOP: return 2;
  }
  return 0;
}

}  // namespace

uint64_t CurrentRssBytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t pages_total = 0, pages_resident = 0;
  if (!(statm >> pages_total >> pages_resident)) return 0;
  return pages_resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

ActorClient::ActorClient(ActorClientOptions options) : options_(std::move(options)) {
  std::random_device rd;
  incarnation_ = (uint64_t{rd()} << 32) | rd();
  started_at_ms_ = WallClockMs();
  heartbeat_rpc_ = std::make_unique<RpcClient>(options_.id);
  request_rpc_ = std::make_unique<RpcClient>(options_.id);
}

ActorClient::~ActorClient() {
  {
    std::lock_guard<std::mutex> lock(wake_mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ActorClient::SetCounter(const std::string& name, double value) {
  std::lock_guard<std::mutex> lock(state_mu_);
  counters_[name] = value;
}
void ActorClient::SetPolicyVersion(int64_t version) {
  {
    std::lock_guard<std::mutex> lock(state_mu_);
    if (policy_version_ == version) return;
    policy_version_ = version;
  }
  // A new version goes out at once, not at the next beat: workers learn of
  // the learner's versions through the coordinator (a receive of the NCCL
  // group is posted only then), so each beat of waiting is latency between
  // a step and the samples of its weights.
  std::lock_guard<std::mutex> lock(wake_mu_);
  beat_now_ = true;
  wake_.notify_all();
}
void ActorClient::SetDetail(std::string detail) {
  std::lock_guard<std::mutex> lock(state_mu_);
  detail_ = std::move(detail);
}
void ActorClient::SetState(wire::ActorState state) {
  std::lock_guard<std::mutex> lock(state_mu_);
  state_ = state;
}

Status ActorClient::RegisterOnce(RpcClient& rpc, int timeout_ms) {
  capnp::MallocMessageBuilder msg;
  auto reg = InitEnvelope(msg, options_.id, 0).getBody().initRegister();
  reg.setRole(options_.role);
  reg.setId(options_.id);
  reg.setHost(HostName());
  reg.setPid(static_cast<int32_t>(getpid()));
  reg.setDataEndpoint(options_.data_endpoint);
  reg.setStartedAtMs(started_at_ms_);
  reg.setRestarts(options_.restarts);
  reg.setIncarnation(incarnation_);
  {
    std::lock_guard<std::mutex> lock(state_mu_);
    reg.setPolicyVersion(policy_version_);
  }
  GROVE_ASSIGN_OR_RETURN(Frame reply, rpc.Call(msg, {BodyKind::REGISTER_ACK}, timeout_ms));
  auto ack = reply.envelope().getBody().getRegisterAck();
  if (!ack.getAccepted()) {
    return Status::FailedPrecondition(std::string("coordinator refused registration: ") +
                                      ack.getReason().cStr());
  }
  interval_ms_ = std::max<int>(1, static_cast<int>(ack.getHeartbeatIntervalMs()));
  liveness_ = std::max<int>(1, static_cast<int>(ack.getLivenessMisses()));
  epoch_ = ack.getCoordinatorEpoch();
  coordinator_version_ = ack.getPolicyVersion();
  registrations_.fetch_add(1);
  connected_ = true;
  LOG(INFO) << "registered with " << options_.coordinator << " (epoch " << epoch_.load()
            << ", heartbeat " << interval_ms_.load() << " ms x " << liveness_.load() << ")";
  return Status::OK();
}

Status ActorClient::Start() {
  if (options_.id.empty()) return Status::InvalidArgument("actor id is empty");
  GROVE_RETURN_IF_ERROR(heartbeat_rpc_->Connect(options_.coordinator));
  GROVE_RETURN_IF_ERROR(request_rpc_->Connect(options_.coordinator));
  const int64_t deadline = MonotonicMs() + options_.register_timeout_ms;
  int backoff = 50;
  Status last;
  for (;;) {
    const int64_t left = deadline - MonotonicMs();
    if (left <= 0) {
      return Status::Unavailable("could not register with " + options_.coordinator + ": " +
                                 last.ToString());
    }
    last = RegisterOnce(*heartbeat_rpc_, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (last.ok()) break;
    if (last.code() == StatusCode::kFailedPrecondition) return last;  // refused: no retry
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min<int64_t>(backoff, left)));
    backoff = std::min(backoff * 2, options_.max_backoff_ms);
  }
  SetState(wire::ActorState::HEALTHY);
  thread_ = std::thread([this] { HeartbeatLoop(); });
  return Status::OK();
}

bool ActorClient::SleepFor(int ms) {
  std::unique_lock<std::mutex> lock(wake_mu_);
  wake_.wait_for(lock, std::chrono::milliseconds(ms), [this] { return stop_ || beat_now_; });
  beat_now_ = false;
  return !stop_;
}

void ActorClient::FillHeartbeat(wire::Heartbeat::Builder hb) {
  std::lock_guard<std::mutex> lock(state_mu_);
  hb.setState(state_);
  hb.setPolicyVersion(policy_version_);
  hb.setRssBytes(CurrentRssBytes());
  hb.setDetail(detail_);
  // Handshakes this process's servers refused (curve_security.h), summed by
  // the coordinator into the cluster's auth_refusals.
  if (const uint64_t refused = ProcessAuthRefusals().count; refused > 0) {
    counters_["auth_refusals"] = static_cast<double>(refused);
  }
  auto list = hb.initCounters(static_cast<unsigned>(counters_.size()));
  unsigned i = 0;
  for (const auto& [name, value] : counters_) {
    list[i].setName(name);
    list[i].setValue(value);
    ++i;
  }
}

void ActorClient::HeartbeatLoop() {
  int liveness = liveness_.load();
  int backoff_ms = interval_ms_.load();
  int64_t next_beat = MonotonicMs();
  for (;;) {
    const int64_t wait = next_beat - MonotonicMs();
    if (wait > 0 && !SleepFor(static_cast<int>(wait))) return;
    {
      std::lock_guard<std::mutex> lock(wake_mu_);
      if (stop_) return;
    }
    const int interval = interval_ms_.load();
    next_beat = MonotonicMs() + interval;

    capnp::MallocMessageBuilder msg;
    FillHeartbeat(InitEnvelope(msg, options_.id, 0).getBody().initHeartbeat());
    auto reply = heartbeat_rpc_->Call(msg, {BodyKind::HEARTBEAT_ACK}, interval);
    if (reply.ok()) {
      auto ack = reply->envelope().getBody().getHeartbeatAck();
      connected_ = true;
      liveness = liveness_.load();
      backoff_ms = interval;
      coordinator_version_ = ack.getPolicyVersion();
      if (Rank(ack.getCommand()) > Rank(command_.load())) {
        LOG(INFO) << "coordinator command: "
                  << (ack.getCommand() == wire::CommandKind::STOP ? "stop" : "drain");
        command_ = ack.getCommand();
      }
      if (!ack.getKnown() || ack.getCoordinatorEpoch() != epoch_.load()) {
        LOG(INFO) << "coordinator does not know us (restarted: epoch " << ack.getCoordinatorEpoch()
                  << "); registering again";
        Status s = RegisterOnce(*heartbeat_rpc_, interval_ms_.load() * liveness_.load());
        if (!s.ok()) LOG(WARNING) << "re-register: " << s;
      }
      continue;
    }
    if (--liveness > 0) continue;
    // The whole liveness window passed without an answer: presume the
    // coordinator gone and back off before the next try.
    if (connected_.exchange(false)) {
      LOG(WARNING) << "coordinator " << options_.coordinator << " silent for " << liveness_.load()
                   << " heartbeats (" << reply.status() << "); reconnecting with back-off";
    }
    next_beat = MonotonicMs() + backoff_ms;
    backoff_ms = std::min(backoff_ms * 2, options_.max_backoff_ms);
    liveness = 1;  // one try per back-off step until the coordinator answers
  }
}

Result<std::vector<PeerEndpoint>> ActorClient::Lookup(wire::Role role) {
  std::lock_guard<std::mutex> lock(request_mu_);
  capnp::MallocMessageBuilder msg;
  InitEnvelope(msg, options_.id, 0).getBody().initLookupRequest().setRole(role);
  GROVE_ASSIGN_OR_RETURN(Frame reply, request_rpc_->Call(msg, {BodyKind::LOOKUP_REPLY},
                                                         options_.request_timeout_ms));
  std::vector<PeerEndpoint> out;
  for (auto e : reply.envelope().getBody().getLookupReply().getEndpoints()) {
    out.push_back({e.getId().cStr(), e.getAddress().cStr()});
  }
  return out;
}

Result<WorkBatch> ActorClient::RequestWork(uint32_t max_prompts, int64_t policy_version) {
  std::lock_guard<std::mutex> lock(request_mu_);
  capnp::MallocMessageBuilder msg;
  auto req = InitEnvelope(msg, options_.id, 0).getBody().initWorkRequest();
  req.setMaxPrompts(max_prompts);
  req.setPolicyVersion(policy_version);
  GROVE_ASSIGN_OR_RETURN(Frame reply, request_rpc_->Call(msg, {BodyKind::PROMPT_BATCH},
                                                         options_.request_timeout_ms));
  auto batch = reply.envelope().getBody().getPromptBatch();
  WorkBatch out;
  out.policy_version = batch.getPolicyVersion();
  out.retry_after_ms = batch.getRetryAfterMs();
  for (auto p : batch.getPrompts()) {
    out.prompts.push_back(Prompt{p.getId(), p.getTask().cStr(), p.getText().cStr(),
                                 p.getReference().cStr(), p.getSplit().cStr()});
  }
  return out;
}

Status ActorClient::PromptDone(const std::vector<uint64_t>& prompt_ids) {
  std::lock_guard<std::mutex> lock(request_mu_);
  capnp::MallocMessageBuilder msg;
  auto ids = InitEnvelope(msg, options_.id, 0).getBody().initPromptDone().initPromptIds(
      static_cast<unsigned>(prompt_ids.size()));
  for (size_t i = 0; i < prompt_ids.size(); ++i) ids.set(static_cast<unsigned>(i), prompt_ids[i]);
  GROVE_ASSIGN_OR_RETURN(Frame reply, request_rpc_->Call(msg, {BodyKind::COMMAND_REPLY},
                                                         options_.request_timeout_ms));
  return Status::OK();
}

void ActorClient::Shutdown(wire::ActorState final_state, const std::string& exit_reason,
                           bool clean) {
  {
    std::lock_guard<std::mutex> lock(wake_mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  SetState(final_state);
  const int timeout = std::max(200, interval_ms_.load() * 2);
  capnp::MallocMessageBuilder hb;
  FillHeartbeat(InitEnvelope(hb, options_.id, 0).getBody().initHeartbeat());
  auto s = heartbeat_rpc_->Call(hb, {BodyKind::HEARTBEAT_ACK}, timeout);
  if (!s.ok()) LOG(WARNING) << "final heartbeat: " << s.status();
  capnp::MallocMessageBuilder report;
  auto ex = InitEnvelope(report, options_.id, 0).getBody().initExitReport();
  ex.setId(options_.id);
  ex.setReason(exit_reason);
  ex.setClean(clean);
  auto r = heartbeat_rpc_->Call(report, {BodyKind::COMMAND_REPLY}, timeout);
  if (!r.ok()) LOG(WARNING) << "exit report: " << r.status();
}

}  // namespace grove::actors
