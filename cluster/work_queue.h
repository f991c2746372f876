// WorkQueue: the coordinator's pull-based prompt queue with leases and the
// staleness gate. Single-threaded (the coordinator's loop owns it).
//
// Prompts handed to a worker are leased to it until PromptDone. A worker
// that dies or leaves gets its leased prompts re-queued at the front, so
// they go out again before any new prompt. New prompts are pulled from the
// PromptSource only while the total handed out stays within
//   prompts_per_step * (learner_version + 1 + max_staleness)
// plus `wasted`: groups the learner reports it never trained on (dropped
// by the replay store as too stale, or refused as invalid), whose prompts
// must be replaced or the gate would starve the learner.
// (prompts_per_step <= 0 disables the gate; max_staleness 0 = synchronous:
// a step's prompts only go out once the learner has finished the previous
// step). Re-queued prompts were counted when first handed out and are never
// gated again.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "actors/prompt.h"
#include "cluster/prompt_source.h"

namespace grove {

struct WorkQueueLimits {
  int64_t prompts_per_step = 0;
  int64_t max_staleness = 1;
};

class WorkQueue {
 public:
  enum class Empty { kNone, kStalenessGate, kSourceDry };
  struct Grant {
    std::vector<Prompt> prompts;
    Empty why_empty = Empty::kNone;  // set when prompts is empty
  };

  // `source` may be null (no prompts until the lead plugs one in); it must
  // outlive the queue.
  // Prompt ids are first_id, first_id + 1, ...
  WorkQueue(PromptSource* source, WorkQueueLimits limits, uint64_t first_id = 1);

  Grant Take(const std::string& worker, uint32_t max_prompts, int64_t learner_version,
             int64_t wasted = 0);
  // Releases the worker's leases on these ids; returns how many it held.
  size_t Done(const std::string& worker, const std::vector<uint64_t>& ids);
  // Re-queues everything leased to `worker` at the front; returns how many.
  size_t Requeue(const std::string& worker);

  // Counts at least `n` prompts as handed out: a restarted coordinator's
  // estimate of what its predecessor handed out, so the gate does not open
  // wide again. Returns true if that raised the count.
  bool AssumeHandedOut(uint64_t n);

  // The most prompts that may have been handed out at this learner version
  // (-1: unlimited).
  int64_t Allowance(int64_t learner_version, int64_t wasted = 0) const;

  size_t requeued_depth() const { return requeued_.size(); }
  size_t leased() const;
  // Prompts leased to `worker` now (0 for one the queue never saw).
  size_t leased(const std::string& worker) const;
  uint64_t handed_out() const { return handed_out_; }
  uint64_t done() const { return done_; }

 private:
  PromptSource* source_;
  WorkQueueLimits limits_;
  uint64_t next_id_ = 1;
  uint64_t handed_out_ = 0;  // distinct prompts pulled from the source (or assumed)
  uint64_t done_ = 0;
  std::deque<Prompt> requeued_;
  std::map<std::string, std::map<uint64_t, Prompt>> leases_;  // worker -> id -> prompt
};

}  // namespace grove
