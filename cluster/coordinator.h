// Coordinator: the one server every actor registers with. It owns the
// registry (membership, health), the work queue (prompts, leases, staleness
// gate), routes commands and answers status and lookup requests.
//
// Protocol (one ROUTER socket; every request gets one reply with the same
// requestId, except frames that fail to decode, which are counted and
// dropped):
//   register      -> registerAck      statusRequest -> statusReply
//   heartbeat     -> heartbeatAck     lookupRequest -> lookupReply
//   command       -> commandReply     exitReport    -> commandReply
//   workRequest   -> promptBatch      promptDone    -> commandReply (matched = released)
//   weightGroupRequest -> weightGroupReply (the NCCL weight-broadcast group;
//                         see cluster/weight_group_membership.h)
// Requests from an actor that is not registered (workRequest, promptDone)
// get an `error` reply.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "actors/socket.h"
#include "base/config.h"
#include "cluster/prompt_source.h"
#include "cluster/registry.h"
#include "cluster/weight_group_membership.h"
#include "cluster/work_queue.h"

namespace grove {

struct CoordinatorOptions {
  std::string bind = "tcp://127.0.0.1:0";
  HealthTiming timing;
  WorkQueueLimits work;
  // Control messages are small; a frame above this is counted as oversized.
  size_t max_frame_bytes = size_t{4} << 20;
  // The first prompt id this coordinator hands out. 0: start at
  // wall-clock-ms << 20, so a restarted coordinator never reuses an id of
  // its predecessor (ids name groups downstream) unless it handed out more
  // than 2^20 prompts per millisecond of its life.
  uint64_t first_prompt_id = 0;
  // Where `grove run coordinator` serves Prometheus text at /metrics
  // (HOST:PORT, port 0: any free port; "" or "off": no metrics server).
  std::string metrics_bind = "127.0.0.1:0";

  // Reads the [coordinator] section: heartbeat_interval_ms, suspect_misses,
  // liveness_misses, prompts_per_step, max_staleness, max_frame_bytes, bind, metrics_bind.
  static Result<CoordinatorOptions> FromConfig(const Config& root);
};

class Coordinator {
 public:
  // `source` may be null: work requests are then answered "retry later".
  Coordinator(CoordinatorOptions options, std::unique_ptr<PromptSource> source);

  // Binds the control socket; returns the actual endpoint.
  Result<std::string> Bind();
  // Serves until should_stop() returns true (checked at least every
  // heartbeat interval / 2).
  void Serve(const std::function<bool()>& should_stop);

  uint64_t epoch() const { return epoch_; }
  const actors::FrameStats& frame_stats() { return socket_.stats(); }

 private:
  void Handle(actors::Incoming& in);
  void SweepAndRequeue();
  void FillStatus(wire::StatusReply::Builder reply, bool include_dead);
  int64_t LearnerVersion() const;
  void HandleWeightGroup(const std::string& sender, wire::WeightGroupRequest::Reader req,
                         wire::Envelope::Builder reply, int64_t now);

  CoordinatorOptions options_;
  std::unique_ptr<PromptSource> source_;
  actors::RouterSocket socket_;
  Registry registry_;
  WorkQueue queue_;
  WeightGroupMembership weight_group_;
  uint64_t epoch_;
  int64_t started_ms_;
  int64_t learner_version_ = 0;
  int64_t learner_wasted_ = 0;  // groups the learner never trained on (its "groups_wasted")
  // The first learner to register here already had a version > 0: this
  // coordinator replaced one that handed out prompts. At that learner's first
  // heartbeat (which carries groups_wasted) the gate assumes its predecessor
  // handed out all it was allowed but one step's worth, instead of opening
  // for every step since the start (prompts that would only go stale).
  bool learner_seen_ = false;
  bool gate_baseline_pending_ = false;
  uint64_t unreachable_replies_ = 0;
};

}  // namespace grove
