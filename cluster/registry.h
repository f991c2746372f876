// Registry: the coordinator's membership and health table. Single-threaded
// (the coordinator's loop owns it); times are monotonic milliseconds passed
// in by the caller, so tests can drive the clock.
//
// States: an actor is `starting` from Register until its first heartbeat,
// then whatever it reports (healthy, draining, stopped). Sweep() marks it
// `suspect` once suspect_misses heartbeat intervals pass in silence and
// `dead` after liveness_misses intervals (the liveness window). Dead and
// stopped actors stay listed, with how they ended, until the same id
// registers again.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "actors/schema/control.capnp.h"

namespace grove {

struct ActorRecord {
  wire::Role role = wire::Role::UNKNOWN;
  std::string id;
  std::string host;
  int32_t pid = 0;
  std::string data_endpoint;
  wire::ActorState state = wire::ActorState::STARTING;
  int64_t last_heartbeat_ms = 0;  // monotonic
  int64_t registered_ms = 0;      // monotonic
  int64_t started_at_ms = 0;      // wall clock, from the actor
  uint32_t restarts = 0;
  uint64_t incarnation = 0;
  int64_t policy_version = 0;
  std::map<std::string, double> counters;
  uint64_t rss_bytes = 0;
  std::string exit_reason;
  std::string detail;
  wire::CommandKind command = wire::CommandKind::NONE;  // pending, sent on every ack
};

struct HealthTiming {
  int64_t heartbeat_interval_ms = 1000;
  int suspect_misses = 2;
  int liveness_misses = 5;
};

class Registry {
 public:
  explicit Registry(HealthTiming timing) : timing_(timing) {}

  // Adds or replaces the record of r.id (a re-registration keeps nothing of
  // the old record). Returns true when this replaced a live record of
  // another incarnation (the process restarted before it was declared dead).
  bool Register(ActorRecord r, int64_t now_ms);

  // Applies a heartbeat. Returns nullptr for an unknown id, or one that was
  // declared dead or stopped: the sender must register again.
  ActorRecord* Heartbeat(const std::string& id, wire::ActorState state, int64_t policy_version,
                         std::map<std::string, double> counters, uint64_t rss_bytes,
                         std::string detail, int64_t now_ms);

  // Records how an actor ended (from itself or its supervisor). Returns the
  // record, or nullptr for an unknown id.
  ActorRecord* Exit(const std::string& id, const std::string& reason, bool clean);

  // Updates suspect/dead states; returns the ids that just became dead.
  std::vector<std::string> Sweep(int64_t now_ms);

  // Sets `kind` pending on every live actor matching `target` (an id, a role
  // name such as "rollout", or "*"); returns how many matched.
  uint32_t Command(wire::CommandKind kind, const std::string& target);

  const ActorRecord* Find(const std::string& id) const;
  const std::map<std::string, ActorRecord>& actors() const { return actors_; }
  const HealthTiming& timing() const { return timing_; }

 private:
  HealthTiming timing_;
  std::map<std::string, ActorRecord> actors_;
};

// "rollout" for wire::Role::ROLLOUT; "unknown" for anything else unnamed.
std::string RoleName(wire::Role role);
// The inverse; UNKNOWN for a name that is not a role.
wire::Role RoleFromName(const std::string& name);
std::string StateName(wire::ActorState state);

}  // namespace grove
