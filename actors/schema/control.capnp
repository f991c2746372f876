# Control plane: membership, health, status and commands, all through the
# coordinator. Field ordinals (@N) are explicit and only ever appended, so a
# newer peer can add fields without breaking an older one.
@0x93893771789b8197;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("grove::wire");

enum Role {
  unknown @0;
  coordinator @1;
  rollout @2;
  verifier @3;
  replay @4;
  learner @5;
  client @6;      # grove CLI and other tools: never registered
}

enum ActorState {
  starting @0;
  healthy @1;
  suspect @2;     # missed heartbeats, still inside the liveness window
  dead @3;        # missed the whole liveness window, or exited
  draining @4;    # finishing its work after a drain or stop command
  stopped @5;     # exited cleanly
}

struct Counter {
  name @0 :Text;
  value @1 :Float64;
}

struct Register {
  role @0 :Role;
  id @1 :Text;              # unique in the cluster, e.g. "rollout-0"
  host @2 :Text;
  pid @3 :Int32;
  dataEndpoint @4 :Text;    # where this actor serves data ("" if it serves none)
  startedAtMs @5 :Int64;    # wall clock, milliseconds since the epoch
  restarts @6 :UInt32;      # how often the supervisor restarted this id
  incarnation @7 :UInt64;   # random per process start: tells a restart from a re-register
  policyVersion @8 :Int64;
}

struct RegisterAck {
  accepted @0 :Bool;
  reason @1 :Text;
  heartbeatIntervalMs @2 :UInt32;
  livenessMisses @3 :UInt32;   # heartbeats missed before an actor is dead
  coordinatorEpoch @4 :UInt64; # changes when the coordinator restarts
  policyVersion @5 :Int64;     # the newest policy version the coordinator knows
}

struct Heartbeat {
  state @0 :ActorState;
  policyVersion @1 :Int64;
  counters @2 :List(Counter);  # the role's own figures (tokens/s, groups stored, ...)
  rssBytes @3 :UInt64;
  detail @4 :Text;             # free text the role wants shown (e.g. a precision plan)
}

struct HeartbeatAck {
  known @0 :Bool;               # false: the coordinator does not know the sender; re-register
  coordinatorEpoch @1 :UInt64;
  policyVersion @2 :Int64;
  command @3 :CommandKind;      # a pending command for the sender (none if nothing)
}

enum CommandKind {
  none @0;
  drain @1;   # finish in-flight work, stop taking new work, then exit
  stop @2;    # exit now (after saving what must be saved)
}

struct Command {
  kind @0 :CommandKind;
  target @1 :Text;  # actor id, or a role name for every actor of that role, or "*"
  reason @2 :Text;
}

struct CommandReply {
  matched @0 :UInt32;
}

struct StatusRequest {
  includeDead @0 :Bool;
}

struct ActorStatus {
  role @0 :Role;
  id @1 :Text;
  host @2 :Text;
  pid @3 :Int32;
  state @4 :ActorState;
  heartbeatAgeMs @5 :Int64;
  uptimeMs @6 :Int64;
  restarts @7 :UInt32;
  policyVersion @8 :Int64;
  counters @9 :List(Counter);
  rssBytes @10 :UInt64;
  exitReason @11 :Text;   # how a dead or stopped actor ended ("signal 9", "exit 1")
  dataEndpoint @12 :Text;
  detail @13 :Text;
}

struct StatusReply {
  actors @0 :List(ActorStatus);
  cluster @1 :List(Counter);     # learner step, staleness, queue depths, reward mean
  coordinatorEpoch @2 :UInt64;
  uptimeMs @3 :Int64;
  lastAuthRefusal @4 :Text;      # "PEER: reason" of the newest handshake the coordinator refused
}

struct LookupRequest {
  role @0 :Role;
}

struct Endpoint {
  id @0 :Text;
  address @1 :Text;
}

struct LookupReply {
  endpoints @0 :List(Endpoint);  # healthy actors of the role with a data endpoint
}

# An actor, or its supervisor, reports how a process ended.
struct ExitReport {
  id @0 :Text;
  reason @1 :Text;
  clean @2 :Bool;
}

struct ErrorReply {
  message @0 :Text;
}

# Appended for `grove scale`: the CLI asks the launcher (on the launcher's
# control socket, named in the run directory's cluster.json) to run `count`
# actors of `role`; the launcher starts or drains workers to match.
struct ScaleRequest {
  role @0 :Role;
  count @1 :UInt32;
}

struct ScaleReply {
  previous @0 :UInt32;
  count @1 :UInt32;
  message @2 :Text;
}

# Appended for the NCCL weight-broadcast group (docs/weights.md). Every
# member asks the coordinator with WeightGroupRequest and is answered with a
# WeightGroupReply naming the current epoch of the group. The learner is
# always rank 0 and creates the NCCL unique id of every epoch.
enum WeightGroupAction {
  poll @0;      # "which epoch am I in?"; a rollout worker that polls is a candidate member
  propose @1;   # learner: form epoch `epoch` with `uniqueId` over the current candidates
  failed @2;    # learner: epoch `epoch` failed (deadline or NCCL error); form a new one
}

struct WeightGroupRequest {
  action @0 :WeightGroupAction;
  epoch @1 :UInt64;      # propose: the new epoch (current + 1); failed: the failed one; poll: the one held (0: none)
  uniqueId @2 :Data;     # propose: the ncclUniqueId bytes of the new epoch
}

struct WeightGroupReply {
  epoch @0 :UInt64;          # 0: no group formed yet
  rank @1 :Int32;            # the sender's rank in `epoch`; -1: not a member
  size @2 :Int32;
  uniqueId @3 :Data;
  members @4 :List(Text);    # actor ids in rank order; members[0] is the learner
  failed @5 :Bool;           # `epoch` was reported failed: members abort and poll again
  reformNeeded @6 :Bool;     # learner only: the candidates differ from the members (propose)
  policyVersion @7 :Int64;   # the newest version the learner has published, as the coordinator knows it
}
