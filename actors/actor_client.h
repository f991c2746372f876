// ActorClient: every role's link to the coordinator.
//
// Start() registers (role, id, host, pid, data endpoint, incarnation) and
// starts a heartbeat thread in the Paranoid Pirate style: one heartbeat per
// interval (the interval and liveness come from the coordinator's
// RegisterAck); a reply resets the liveness counter; after `liveness` misses
// in a row the coordinator is presumed gone and the thread backs off
// exponentially (interval, 2x, ... up to max_backoff_ms) while it keeps
// trying. A reply saying the coordinator does not know us, or a new
// coordinator epoch, makes the thread register again: a restarted
// coordinator relearns the cluster from its survivors.
//
// Each heartbeat carries the role's counters, policy version, detail text,
// state and RSS, set through the setters below from any thread. Commands
// (drain, stop) ride on heartbeat replies and stick in command().
//
// The request methods (Lookup, RequestWork, PromptDone) are thread-safe and
// use their own socket, separate from the heartbeat thread's.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "actors/prompt.h"
#include "actors/schema/envelope.capnp.h"
#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "base/result.h"

namespace grove::actors {

struct ActorClientOptions {
  wire::Role role = wire::Role::UNKNOWN;
  std::string id;                  // unique in the cluster
  std::string coordinator;         // tcp://HOST:PORT
  std::string data_endpoint;       // where this actor serves data ("" if none)
  uint32_t restarts = 0;           // from the launcher
  int request_timeout_ms = 2000;   // Lookup / RequestWork / PromptDone
  int register_timeout_ms = 10000; // Start() gives up after this
  int max_backoff_ms = 4000;       // cap of the reconnect back-off
};

struct PeerEndpoint {
  std::string id;
  std::string address;
};

struct WorkBatch {
  std::vector<Prompt> prompts;     // empty: nothing now; wait retry_after_ms
  int64_t policy_version = 0;      // newest version the coordinator knows
  uint32_t retry_after_ms = 0;
};

class ActorClient {
 public:
  explicit ActorClient(ActorClientOptions options);
  ~ActorClient();  // stops the heartbeat thread (without a final report)
  ActorClient(const ActorClient&) = delete;
  ActorClient& operator=(const ActorClient&) = delete;

  // Registers, retrying until register_timeout_ms, then starts heartbeating.
  Status Start();

  // Figures shown in `grove status`; carried by the next heartbeat (a
  // changed policy version makes that heartbeat go at once).
  void SetCounter(const std::string& name, double value);
  void SetPolicyVersion(int64_t version);
  void SetDetail(std::string detail);
  void SetState(wire::ActorState state);  // healthy after Start(); draining ...

  // The strongest command received so far (none < drain < stop).
  wire::CommandKind command() const { return command_.load(); }
  // The newest policy version the coordinator has announced.
  int64_t coordinator_policy_version() const { return coordinator_version_.load(); }
  // Number of successful registrations (1 after Start; more after the
  // coordinator restarted).
  uint64_t registrations() const { return registrations_.load(); }
  // True while heartbeats are answered.
  bool connected() const { return connected_.load(); }

  // Healthy actors of `role` that serve data, as the coordinator knows them.
  Result<std::vector<PeerEndpoint>> Lookup(wire::Role role);
  // Pull-based work: asks for up to max_prompts prompts to sample under
  // `policy_version`. The prompts are leased to this actor until PromptDone.
  Result<WorkBatch> RequestWork(uint32_t max_prompts, int64_t policy_version);
  Status PromptDone(const std::vector<uint64_t>& prompt_ids);

  // Last words: a heartbeat with `final_state` (stopped, or dead on an
  // error), then an ExitReport, then the heartbeat thread ends.
  void Shutdown(wire::ActorState final_state, const std::string& exit_reason, bool clean);

  const ActorClientOptions& options() const { return options_; }

 private:
  Status RegisterOnce(RpcClient& rpc, int timeout_ms);
  void HeartbeatLoop();
  void FillHeartbeat(wire::Heartbeat::Builder hb);
  bool SleepFor(int ms);  // false when asked to stop

  ActorClientOptions options_;
  uint64_t incarnation_;
  int64_t started_at_ms_;

  std::unique_ptr<RpcClient> heartbeat_rpc_;  // heartbeat thread only (and Start/Shutdown)
  std::mutex request_mu_;
  std::unique_ptr<RpcClient> request_rpc_;

  mutable std::mutex state_mu_;  // guards the figures below
  std::map<std::string, double> counters_;
  std::string detail_;
  int64_t policy_version_ = 0;
  wire::ActorState state_ = wire::ActorState::STARTING;

  std::atomic<wire::CommandKind> command_{wire::CommandKind::NONE};
  std::atomic<int64_t> coordinator_version_{0};
  std::atomic<uint64_t> registrations_{0};
  std::atomic<bool> connected_{false};
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> interval_ms_{1000};
  std::atomic<int> liveness_{3};

  std::mutex wake_mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  bool beat_now_ = false;  // SetPolicyVersion changed the version: beat before the interval ends
  std::thread thread_;
};

// Resident set size of this process in bytes (0 if unknown).
uint64_t CurrentRssBytes();

}  // namespace grove::actors
