#include "cluster/coordinator.h"

#include <algorithm>
#include <random>

#include <glog/logging.h>

namespace grove {

using actors::BodyKind;
using actors::MonotonicMs;

Result<CoordinatorOptions> CoordinatorOptions::FromConfig(const Config& root) {
  CoordinatorOptions o;
  Config c = root.Section("coordinator");
  GROVE_RETURN_IF_ERROR(c.CheckKeys({"bind", "heartbeat_interval_ms", "suspect_misses",
                                     "liveness_misses", "prompts_per_step", "max_staleness",
                                     "max_frame_bytes", "metrics_bind"}));
  GROVE_ASSIGN_OR_RETURN(o.metrics_bind, c.String("metrics_bind", o.metrics_bind));
  GROVE_ASSIGN_OR_RETURN(o.bind, c.String("bind", o.bind));
  GROVE_ASSIGN_OR_RETURN(o.timing.heartbeat_interval_ms,
                         c.Int("heartbeat_interval_ms", o.timing.heartbeat_interval_ms));
  GROVE_ASSIGN_OR_RETURN(int64_t suspect, c.Int("suspect_misses", o.timing.suspect_misses));
  GROVE_ASSIGN_OR_RETURN(int64_t liveness, c.Int("liveness_misses", o.timing.liveness_misses));
  GROVE_ASSIGN_OR_RETURN(o.work.prompts_per_step, c.Int("prompts_per_step", 0));
  GROVE_ASSIGN_OR_RETURN(o.work.max_staleness, c.Int("max_staleness", 1));
  GROVE_ASSIGN_OR_RETURN(int64_t max_frame,
                         c.Int("max_frame_bytes", static_cast<int64_t>(o.max_frame_bytes)));
  if (o.timing.heartbeat_interval_ms < 1 || o.timing.heartbeat_interval_ms > 600000) {
    return Status::InvalidArgument("coordinator.heartbeat_interval_ms must be in [1, 600000]");
  }
  if (suspect < 1 || liveness <= suspect || liveness > 1000) {
    return Status::InvalidArgument(
        "coordinator: need 1 <= suspect_misses < liveness_misses <= 1000");
  }
  if (o.work.max_staleness < 0) {
    return Status::InvalidArgument("coordinator.max_staleness must be >= 0");
  }
  if (max_frame < 1024 || static_cast<size_t>(max_frame) > actors::kMaxFrameBytes) {
    return Status::InvalidArgument("coordinator.max_frame_bytes out of range");
  }
  o.timing.suspect_misses = static_cast<int>(suspect);
  o.timing.liveness_misses = static_cast<int>(liveness);
  o.max_frame_bytes = static_cast<size_t>(max_frame);
  return o;
}

namespace {

actors::SocketOptions ServerSocketOptions(const CoordinatorOptions& o) {
  actors::SocketOptions s;
  s.max_frame_bytes = o.max_frame_bytes;
  return s;
}

std::map<std::string, double> ReadCounters(capnp::List<wire::Counter>::Reader list) {
  std::map<std::string, double> out;
  for (auto c : list) out[c.getName().cStr()] = c.getValue();
  return out;
}

}  // namespace

Coordinator::Coordinator(CoordinatorOptions options, std::unique_ptr<PromptSource> source)
    : options_(std::move(options)),
      source_(std::move(source)),
      socket_(ServerSocketOptions(options_)),
      registry_(options_.timing),
      queue_(source_.get(), options_.work,
             options_.first_prompt_id != 0
                 ? options_.first_prompt_id
                 : static_cast<uint64_t>(actors::WallClockMs()) << 20),
      // A worker that stopped polling for a minute no longer wants NCCL
      // weights. Deaths are caught sooner: the sweep and exit reports forget
      // dead workers, and a failed epoch drops those silent since the
      // failure. Long enough that a worker busy copying and verifying a big
      // version (seconds, without polls) is not mistaken for gone.
      weight_group_(std::max<int64_t>(60000, options_.timing.heartbeat_interval_ms *
                                                 options_.timing.liveness_misses)) {
  std::random_device rd;
  epoch_ = (uint64_t{rd()} << 32) | rd();
  started_ms_ = MonotonicMs();
}

Result<std::string> Coordinator::Bind() { return socket_.Bind(options_.bind); }

void Coordinator::Serve(const std::function<bool()>& should_stop) {
  const int tick = std::max<int>(1, static_cast<int>(options_.timing.heartbeat_interval_ms / 2));
  int64_t next_sweep = MonotonicMs() + tick;
  while (!should_stop()) {
    const int64_t wait = std::max<int64_t>(0, next_sweep - MonotonicMs());
    if (auto in = socket_.Receive(static_cast<int>(wait))) Handle(*in);
    if (MonotonicMs() >= next_sweep) {
      SweepAndRequeue();
      next_sweep = MonotonicMs() + tick;
    }
  }
}

int64_t Coordinator::LearnerVersion() const { return learner_version_; }

void Coordinator::SweepAndRequeue() {
  for (const std::string& id : registry_.Sweep(MonotonicMs())) {
    weight_group_.Forget(id);
    if (size_t n = queue_.Requeue(id)) LOG(INFO) << "re-queued " << n << " prompts of dead " << id;
  }
}

void Coordinator::Handle(actors::Incoming& in) {
  auto frame = actors::DecodeFrame(
      in.payload.data(), in.payload.size(),
      {BodyKind::REGISTER, BodyKind::HEARTBEAT, BodyKind::COMMAND, BodyKind::STATUS_REQUEST,
       BodyKind::LOOKUP_REQUEST, BodyKind::EXIT_REPORT, BodyKind::WORK_REQUEST,
       BodyKind::PROMPT_DONE, BodyKind::WEIGHT_GROUP_REQUEST},
      &socket_.stats(), actors::DecodeLimits{.max_frame_bytes = options_.max_frame_bytes});
  if (!frame.ok()) return;  // counted and logged once per kind by the codec
  auto env = frame->envelope();
  const std::string sender = env.getSender().cStr();
  const int64_t now = MonotonicMs();

  capnp::MallocMessageBuilder reply_msg;
  auto reply = actors::InitEnvelope(reply_msg, "coordinator", env.getRequestId());
  auto body = env.getBody();
  switch (frame->kind()) {
    case BodyKind::REGISTER: {
      auto reg = body.getRegister();
      ActorRecord r;
      r.role = reg.getRole();
      r.id = reg.getId().cStr();
      r.host = reg.getHost().cStr();
      r.pid = reg.getPid();
      r.data_endpoint = reg.getDataEndpoint().cStr();
      r.started_at_ms = reg.getStartedAtMs();
      r.restarts = reg.getRestarts();
      r.incarnation = reg.getIncarnation();
      r.policy_version = reg.getPolicyVersion();
      auto ack = reply.getBody().initRegisterAck();
      if (r.id.empty() || r.role == wire::Role::UNKNOWN || r.role == wire::Role::CLIENT ||
          r.role == wire::Role::COORDINATOR) {
        ack.setAccepted(false);
        ack.setReason("register needs an id and an actor role");
        break;
      }
      const auto* old = registry_.Find(r.id);
      if (old != nullptr && old->incarnation != r.incarnation) {
        // A new process under an old id: whatever the old one held is lost.
        if (size_t n = queue_.Requeue(r.id)) {
          LOG(INFO) << "re-queued " << n << " prompts of the previous " << r.id;
        }
      }
      LOG(INFO) << "register " << RoleName(r.role) << " " << r.id << " pid " << r.pid << " at "
                << r.host << (r.data_endpoint.empty() ? "" : " serving " + r.data_endpoint)
                << " (restarts " << r.restarts << ")";
      if (r.role == wire::Role::LEARNER) {
        learner_version_ = r.policy_version;
        if (!learner_seen_) gate_baseline_pending_ = r.policy_version > 0;
        learner_seen_ = true;
      }
      registry_.Register(std::move(r), now);
      ack.setAccepted(true);
      ack.setHeartbeatIntervalMs(static_cast<uint32_t>(options_.timing.heartbeat_interval_ms));
      ack.setLivenessMisses(static_cast<uint32_t>(options_.timing.liveness_misses));
      ack.setCoordinatorEpoch(epoch_);
      ack.setPolicyVersion(learner_version_);
      break;
    }
    case BodyKind::HEARTBEAT: {
      auto hb = body.getHeartbeat();
      ActorRecord* r = registry_.Heartbeat(sender, hb.getState(), hb.getPolicyVersion(),
                                           ReadCounters(hb.getCounters()), hb.getRssBytes(),
                                           hb.getDetail().cStr(), now);
      auto ack = reply.getBody().initHeartbeatAck();
      ack.setKnown(r != nullptr);
      ack.setCoordinatorEpoch(epoch_);
      if (r != nullptr) {
        if (r->role == wire::Role::LEARNER) {
          learner_version_ = r->policy_version;
          auto wasted = r->counters.find("groups_wasted");
          if (wasted != r->counters.end()) learner_wasted_ = static_cast<int64_t>(wasted->second);
          if (gate_baseline_pending_) {
            gate_baseline_pending_ = false;
            const int64_t assumed =
                queue_.Allowance(learner_version_, learner_wasted_) - options_.work.prompts_per_step;
            if (assumed > 0 && queue_.AssumeHandedOut(static_cast<uint64_t>(assumed)))
              LOG(INFO) << "learner at version " << learner_version_ << ": assuming " << assumed
                        << " prompts were handed out before this coordinator started";
          }
        }
        ack.setCommand(r->command);
      }
      ack.setPolicyVersion(learner_version_);
      break;
    }
    case BodyKind::COMMAND: {
      auto cmd = body.getCommand();
      uint32_t matched = registry_.Command(cmd.getKind(), cmd.getTarget().cStr());
      LOG(INFO) << "command " << static_cast<int>(cmd.getKind()) << " to '"
                << cmd.getTarget().cStr() << "' from " << sender << ": " << matched
                << " matched (" << cmd.getReason().cStr() << ")";
      reply.getBody().initCommandReply().setMatched(matched);
      break;
    }
    case BodyKind::STATUS_REQUEST:
      FillStatus(reply.getBody().initStatusReply(), body.getStatusRequest().getIncludeDead());
      break;
    case BodyKind::LOOKUP_REQUEST: {
      const wire::Role role = body.getLookupRequest().getRole();
      std::vector<const ActorRecord*> found;
      for (const auto& [id, r] : registry_.actors()) {
        if (r.role == role && !r.data_endpoint.empty() &&
            (r.state == wire::ActorState::HEALTHY || r.state == wire::ActorState::STARTING)) {
          found.push_back(&r);
        }
      }
      auto list = reply.getBody().initLookupReply().initEndpoints(
          static_cast<unsigned>(found.size()));
      for (unsigned i = 0; i < found.size(); ++i) {
        list[i].setId(found[i]->id);
        list[i].setAddress(found[i]->data_endpoint);
      }
      break;
    }
    case BodyKind::EXIT_REPORT: {
      auto ex = body.getExitReport();
      const std::string id = ex.getId().cStr();
      const ActorRecord* r = registry_.Exit(id, ex.getReason().cStr(), ex.getClean());
      size_t requeued = queue_.Requeue(id);
      weight_group_.Forget(id);
      LOG(INFO) << id << " exited: " << ex.getReason().cStr() << " (reported by " << sender
                << (requeued ? ", re-queued " + std::to_string(requeued) + " prompts" : "")
                << ")";
      reply.getBody().initCommandReply().setMatched(r != nullptr ? 1 : 0);
      break;
    }
    case BodyKind::WORK_REQUEST: {
      const ActorRecord* r = registry_.Find(sender);
      if (r == nullptr || r->state == wire::ActorState::DEAD ||
          r->state == wire::ActorState::STOPPED) {
        reply.getBody().initError().setMessage("unknown actor '" + sender + "': register first");
        break;
      }
      auto req = body.getWorkRequest();
      auto grant = r->state == wire::ActorState::DRAINING
                       ? WorkQueue::Grant{{}, WorkQueue::Empty::kSourceDry}
                       : queue_.Take(sender, std::min<uint32_t>(req.getMaxPrompts(), 4096),
                                     learner_version_, learner_wasted_);
      auto batch = reply.getBody().initPromptBatch();
      batch.setPolicyVersion(learner_version_);
      if (grant.prompts.empty()) {
        batch.setRetryAfterMs(static_cast<uint32_t>(options_.timing.heartbeat_interval_ms));
      }
      auto list = batch.initPrompts(static_cast<unsigned>(grant.prompts.size()));
      for (unsigned i = 0; i < grant.prompts.size(); ++i) {
        const Prompt& p = grant.prompts[i];
        list[i].setId(p.id);
        list[i].setTask(p.task);
        list[i].setText(p.text);
        list[i].setReference(p.reference);
        list[i].setSplit(p.split);
      }
      break;
    }
    case BodyKind::PROMPT_DONE: {
      std::vector<uint64_t> ids;
      for (uint64_t id : body.getPromptDone().getPromptIds()) ids.push_back(id);
      size_t released = queue_.Done(sender, ids);
      reply.getBody().initCommandReply().setMatched(static_cast<uint32_t>(released));
      break;
    }
    case BodyKind::WEIGHT_GROUP_REQUEST:
      HandleWeightGroup(sender, body.getWeightGroupRequest(), reply, now);
      break;
    default:
      return;  // not reachable: DecodeFrame filtered the kinds
  }
  Status s = socket_.Send(in.peer, actors::EncodeFrame(reply_msg));
  if (!s.ok()) {
    ++unreachable_replies_;
    VLOG(1) << "reply to " << sender << ": " << s;
  }
}

void Coordinator::HandleWeightGroup(const std::string& sender,
                                    wire::WeightGroupRequest::Reader req,
                                    wire::Envelope::Builder reply, int64_t now) {
  const ActorRecord* r = registry_.Find(sender);
  auto alive = [this](const std::string& id) {
    const ActorRecord* a = registry_.Find(id);
    return a != nullptr && a->state != wire::ActorState::DEAD &&
           a->state != wire::ActorState::STOPPED && a->state != wire::ActorState::DRAINING;
  };
  if (r == nullptr || !alive(sender) ||
      (r->role != wire::Role::LEARNER && r->role != wire::Role::ROLLOUT)) {
    reply.getBody().initError().setMessage("weight group: '" + sender +
                                           "' is no live learner or rollout worker");
    return;
  }
  WeightGroupView view;
  if (r->role == wire::Role::ROLLOUT) {
    if (req.getAction() != wire::WeightGroupAction::POLL) {
      reply.getBody().initError().setMessage("weight group: only the learner proposes or fails epochs");
      return;
    }
    view = weight_group_.PollWorker(sender, now);
  } else {
    Status s;
    if (req.getAction() == wire::WeightGroupAction::PROPOSE) {
      auto id = req.getUniqueId();
      s = weight_group_.Propose(sender, req.getEpoch(),
                                std::string(reinterpret_cast<const char*>(id.begin()), id.size()),
                                now, alive);
      if (s.ok()) {
        LOG(INFO) << "weight group epoch " << weight_group_.epoch() << ": "
                  << weight_group_.members().size() << " members";
      }
    } else if (req.getAction() == wire::WeightGroupAction::FAILED) {
      s = weight_group_.Fail(sender, req.getEpoch(), now);
      if (s.ok()) LOG(INFO) << "weight group epoch " << req.getEpoch() << " failed (" << sender << ")";
    }
    if (!s.ok()) {
      reply.getBody().initError().setMessage(s.ToString());
      return;
    }
    view = weight_group_.PollLearner(sender, now, alive);
  }
  auto out = reply.getBody().initWeightGroupReply();
  out.setEpoch(view.epoch);
  out.setRank(view.rank);
  out.setSize(view.size);
  out.setUniqueId(kj::arrayPtr(reinterpret_cast<const kj::byte*>(view.unique_id.data()),
                               view.unique_id.size()));
  auto members = out.initMembers(static_cast<unsigned>(view.members.size()));
  for (unsigned i = 0; i < view.members.size(); ++i) members.set(i, view.members[i]);
  out.setFailed(view.failed);
  out.setReformNeeded(view.reform_needed);
  out.setPolicyVersion(learner_version_);
}

void Coordinator::FillStatus(wire::StatusReply::Builder reply, bool include_dead) {
  const int64_t now = MonotonicMs();
  std::vector<const ActorRecord*> shown;
  for (const auto& [id, r] : registry_.actors()) {
    if (!include_dead && (r.state == wire::ActorState::DEAD || r.state == wire::ActorState::STOPPED)) {
      continue;
    }
    shown.push_back(&r);
  }
  auto list = reply.initActors(static_cast<unsigned>(shown.size()));
  std::map<std::string, double> cluster;
  double reward_sum = 0, reward_n = 0, replay_depth = 0, learner_step = 0;
  int64_t oldest_rollout = learner_version_;
  bool any_rollout = false;
  std::map<std::string, double> by_state;
  for (unsigned i = 0; i < shown.size(); ++i) {
    const ActorRecord& r = *shown[i];
    auto a = list[i];
    a.setRole(r.role);
    a.setId(r.id);
    a.setHost(r.host);
    a.setPid(r.pid);
    a.setState(r.state);
    a.setHeartbeatAgeMs(now - r.last_heartbeat_ms);
    a.setUptimeMs(now - r.registered_ms);
    a.setRestarts(r.restarts);
    a.setPolicyVersion(r.policy_version);
    // A rollout worker's counters are its own plus the coordinator's view of
    // the prompts leased to it (the ones re-queued should it die now).
    const bool rollout = r.role == wire::Role::ROLLOUT;
    auto counters = a.initCounters(static_cast<unsigned>(r.counters.size() + (rollout ? 1 : 0)));
    unsigned j = 0;
    for (const auto& [name, value] : r.counters) {
      counters[j].setName(name);
      counters[j].setValue(value);
      ++j;
    }
    if (rollout) {
      counters[j].setName("prompts_leased");
      counters[j].setValue(static_cast<double>(queue_.leased(r.id)));
    }
    a.setRssBytes(r.rss_bytes);
    a.setExitReason(r.exit_reason);
    a.setDataEndpoint(r.data_endpoint);
    a.setDetail(r.detail);
    by_state["actors_" + StateName(r.state)] += 1;
    const bool live = r.state != wire::ActorState::DEAD && r.state != wire::ActorState::STOPPED;
    if (!live) continue;
    auto get = [&](const char* name) -> const double* {
      auto it = r.counters.find(name);
      return it == r.counters.end() ? nullptr : &it->second;
    };
    if (r.role == wire::Role::LEARNER) {
      if (const double* v = get("step")) learner_step = std::max(learner_step, *v);
    } else if (r.role == wire::Role::REPLAY) {
      if (const double* v = get("queue_depth")) replay_depth += *v;
    } else if (r.role == wire::Role::VERIFIER) {
      if (const double* v = get("reward_mean")) {
        reward_sum += *v;
        reward_n += 1;
      }
    } else if (r.role == wire::Role::ROLLOUT) {
      oldest_rollout = any_rollout ? std::min(oldest_rollout, r.policy_version) : r.policy_version;
      any_rollout = true;
    }
  }
  cluster = by_state;
  cluster["learner_step"] = learner_step;
  cluster["policy_version"] = static_cast<double>(learner_version_);
  cluster["staleness"] = any_rollout ? static_cast<double>(learner_version_ - oldest_rollout) : 0;
  cluster["prompt_queue_depth"] = static_cast<double>(queue_.requeued_depth());
  cluster["prompts_leased"] = static_cast<double>(queue_.leased());
  cluster["prompts_handed_out"] = static_cast<double>(queue_.handed_out());
  cluster["prompts_done"] = static_cast<double>(queue_.done());
  cluster["replay_queue_depth"] = replay_depth;
  if (reward_n > 0) cluster["reward_mean"] = reward_sum / reward_n;
  for (int e = 0; e < actors::kFrameErrorCount; ++e) {
    auto err = static_cast<actors::FrameError>(e);
    cluster["bad_frames_" + std::string(actors::FrameErrorName(err))] =
        static_cast<double>(socket_.stats().Get(err));
  }
  cluster["unreachable_replies"] = static_cast<double>(unreachable_replies_);
  // CurveZMQ: handshakes refused by this process's ZAP handler plus those
  // the actors' own servers report (their "auth_refusals" counter).
  const actors::AuthRefusals refused = actors::ProcessAuthRefusals();
  double auth_refusals = static_cast<double>(refused.count);
  for (const auto& [id, r] : registry_.actors()) {
    auto it = r.counters.find("auth_refusals");
    if (it != r.counters.end()) auth_refusals += it->second;
  }
  cluster["auth_refusals"] = auth_refusals;
  cluster["curve"] = actors::ProcessSocketSecurity() != nullptr ? 1 : 0;
  if (refused.count > 0) {
    reply.setLastAuthRefusal((refused.last_peer.empty() ? "unknown peer" : refused.last_peer) +
                             ": " + refused.last_reason);
  }
  auto out = reply.initCluster(static_cast<unsigned>(cluster.size()));
  unsigned k = 0;
  for (const auto& [name, value] : cluster) {
    out[k].setName(name);
    out[k].setValue(value);
    ++k;
  }
  reply.setCoordinatorEpoch(epoch_);
  reply.setUptimeMs(now - started_ms_);
}

}  // namespace grove
