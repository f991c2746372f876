// WeightGroupMembership: the coordinator's plan of the NCCL weight-broadcast
// group (docs/weights.md). Single-threaded (the coordinator's loop owns it);
// times are monotonic milliseconds passed in, so tests drive the clock.
//
// An NCCL communicator has fixed members, so the group lives in epochs. The
// learner is rank 0 of every epoch and creates its unique id; the rollout
// workers that poll are the candidates. The learner is told to re-form
// (reform_needed) whenever the live candidates differ from the members of
// the current epoch: a worker joined, died, or the epoch failed. A failed
// epoch admits only candidates that polled after the failure was reported,
// so a worker killed mid-broadcast (which never polls again) is left out of
// the next epoch at once, before the heartbeat sweep declares it dead.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "actors/weight_group_client.h"
#include "base/status.h"

namespace grove {

using actors::WeightGroupView;

class WeightGroupMembership {
 public:
  // A candidate that has not polled for `candidate_ttl_ms` is not admitted
  // to a new epoch (it is gone or stopped using NCCL).
  explicit WeightGroupMembership(int64_t candidate_ttl_ms) : candidate_ttl_ms_(candidate_ttl_ms) {}

  // A rollout worker's poll: records it as a candidate and answers its view.
  WeightGroupView PollWorker(const std::string& id, int64_t now_ms);
  // The learner's poll: its view plus whether to re-form (`alive` asks the
  // registry; empty: every candidate counts as alive).
  WeightGroupView PollLearner(const std::string& learner_id, int64_t now_ms,
                              const std::function<bool(const std::string&)>& alive = nullptr);

  // The learner forms epoch `epoch` (must be current + 1) with `unique_id`
  // over the live candidates (`alive` asks the registry). An epoch of the
  // learner alone (size 1) is formed when no worker is left.
  // Errors: InvalidArgument (wrong epoch, empty id, another learner).
  Status Propose(const std::string& learner_id, uint64_t epoch, std::string unique_id,
                 int64_t now_ms, const std::function<bool(const std::string&)>& alive);
  // The learner reports that `epoch` failed. A report for an older epoch is
  // ignored (the group moved on already).
  Status Fail(const std::string& learner_id, uint64_t epoch, int64_t now_ms);

  // The registry declared `id` dead, or it exited: drop it as a candidate.
  // A learner that is gone frees the group for the next learner.
  void Forget(const std::string& id);

  uint64_t epoch() const { return epoch_; }
  const std::vector<std::string>& members() const { return members_; }
  // Ids that would be members of a new epoch formed now.
  std::vector<std::string> Desired(int64_t now_ms,
                                   const std::function<bool(const std::string&)>& alive) const;

 private:
  WeightGroupView View(const std::string& id) const;

  int64_t candidate_ttl_ms_;
  std::string learner_id_;  // the learner that proposed the current epoch
  uint64_t epoch_ = 0;
  std::string unique_id_;
  std::vector<std::string> members_;
  bool failed_ = false;
  int64_t failed_at_ms_ = 0;
  std::map<std::string, int64_t> candidates_;  // worker id -> last poll (monotonic ms)
};

}  // namespace grove
