#include "cluster/registry.h"

#include <glog/logging.h>

namespace grove {
namespace {

bool IsOver(wire::ActorState s) {
  return s == wire::ActorState::DEAD || s == wire::ActorState::STOPPED;
}

}  // namespace

std::string RoleName(wire::Role role) {
  switch (role) {
    case wire::Role::COORDINATOR: return "coordinator";
    case wire::Role::ROLLOUT: return "rollout";
    case wire::Role::VERIFIER: return "verifier";
    case wire::Role::REPLAY: return "replay";
    case wire::Role::LEARNER: return "learner";
    case wire::Role::CLIENT: return "client";
    default: return "unknown";
  }
}

wire::Role RoleFromName(const std::string& name) {
  for (auto r : {wire::Role::COORDINATOR, wire::Role::ROLLOUT, wire::Role::VERIFIER,
                 wire::Role::REPLAY, wire::Role::LEARNER, wire::Role::CLIENT}) {
    if (RoleName(r) == name) return r;
  }
  return wire::Role::UNKNOWN;
}

std::string StateName(wire::ActorState state) {
  switch (state) {
    case wire::ActorState::STARTING: return "starting";
    case wire::ActorState::HEALTHY: return "healthy";
    case wire::ActorState::SUSPECT: return "suspect";
    case wire::ActorState::DEAD: return "dead";
    case wire::ActorState::DRAINING: return "draining";
    case wire::ActorState::STOPPED: return "stopped";
  }
  return "unknown";
}

bool Registry::Register(ActorRecord r, int64_t now_ms) {
  auto it = actors_.find(r.id);
  const bool replaced_live = it != actors_.end() && !IsOver(it->second.state) &&
                             it->second.incarnation != r.incarnation;
  r.state = wire::ActorState::STARTING;
  r.registered_ms = now_ms;
  r.last_heartbeat_ms = now_ms;
  r.exit_reason.clear();
  r.command = wire::CommandKind::NONE;
  std::string id = r.id;
  actors_[id] = std::move(r);
  return replaced_live;
}

ActorRecord* Registry::Heartbeat(const std::string& id, wire::ActorState state,
                                 int64_t policy_version, std::map<std::string, double> counters,
                                 uint64_t rss_bytes, std::string detail, int64_t now_ms) {
  auto it = actors_.find(id);
  if (it == actors_.end() || IsOver(it->second.state)) return nullptr;
  ActorRecord& r = it->second;
  r.last_heartbeat_ms = now_ms;
  // An actor reports starting/healthy/draining/stopped; suspect and dead are
  // the coordinator's verdicts and a heartbeat clears suspicion.
  if (state == wire::ActorState::SUSPECT || state == wire::ActorState::STARTING) {
    state = wire::ActorState::HEALTHY;
  }
  r.state = state;
  r.policy_version = policy_version;
  r.counters = std::move(counters);
  r.rss_bytes = rss_bytes;
  r.detail = std::move(detail);
  return &r;
}

ActorRecord* Registry::Exit(const std::string& id, const std::string& reason, bool clean) {
  auto it = actors_.find(id);
  if (it == actors_.end()) return nullptr;
  ActorRecord& r = it->second;
  // The actor's own clean report wins over a later "exit 0" from its
  // supervisor; a crash report always sticks.
  if (r.state != wire::ActorState::STOPPED || !clean) {
    r.state = clean ? wire::ActorState::STOPPED : wire::ActorState::DEAD;
  }
  if (!reason.empty() && (r.exit_reason.empty() || !clean)) r.exit_reason = reason;
  return &r;
}

std::vector<std::string> Registry::Sweep(int64_t now_ms) {
  std::vector<std::string> died;
  for (auto& [id, r] : actors_) {
    if (IsOver(r.state)) continue;
    const int64_t age = now_ms - r.last_heartbeat_ms;
    if (age > timing_.heartbeat_interval_ms * timing_.liveness_misses) {
      r.state = wire::ActorState::DEAD;
      r.exit_reason = "no heartbeat for " + std::to_string(age) + " ms";
      LOG(WARNING) << id << " is dead: " << r.exit_reason;
      died.push_back(id);
    } else if (age > timing_.heartbeat_interval_ms * timing_.suspect_misses &&
               r.state != wire::ActorState::SUSPECT) {
      LOG(INFO) << id << " is suspect: no heartbeat for " << age << " ms";
      r.state = wire::ActorState::SUSPECT;
    }
  }
  return died;
}

uint32_t Registry::Command(wire::CommandKind kind, const std::string& target) {
  uint32_t matched = 0;
  for (auto& [id, r] : actors_) {
    if (IsOver(r.state)) continue;
    if (target != "*" && target != id && target != RoleName(r.role)) continue;
    if (static_cast<int>(kind) > static_cast<int>(r.command)) r.command = kind;
    ++matched;
  }
  return matched;
}

const ActorRecord* Registry::Find(const std::string& id) const {
  auto it = actors_.find(id);
  return it == actors_.end() ? nullptr : &it->second;
}

}  // namespace grove
