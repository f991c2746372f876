// NcclWeightBroadcaster: the learner's side of the NCCL weight group
// (docs/weights.md). A thread of its own keeps the group's membership in
// step with the coordinator (the learner is rank 0 and creates each epoch's
// unique id) and broadcasts every published version, so the training loop
// only calls Publish() and never waits on a worker.
//
// Failure rule: a broadcast or a formation that misses its deadline or
// fails aborts the communicator and is reported to the coordinator; after a
// grace of two poll intervals (the survivors re-confirm) the learner forms
// the next epoch without the dead and sends the version once more. A version
// that fails twice is skipped; the next Publish() is sent as usual.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "actors/weight_transfer.h"
#include "base/result.h"

namespace grove::learner {

struct NcclBroadcasterOptions {
  std::string coordinator;   // tcp://HOST:PORT
  std::string learner_id;    // the learner's registered actor id
  int device = 0;            // CUDA device of rank 0
  uint64_t bucket_bytes = uint64_t{64} << 20;
  int64_t deadline_ms = 30000;  // per formation and per version
  int64_t poll_ms = 200;
  int rpc_timeout_ms = 2000;
};

struct NcclBroadcasterStats {
  uint64_t epoch = 0;
  int32_t group_size = 0;
  int64_t last_sent_version = -1;
  uint64_t versions_sent = 0;   // counted once per (epoch, version)
  uint64_t failures = 0;        // formations and broadcasts that failed
  uint64_t epochs_formed = 0;
  double last_broadcast_ms = 0;
  double last_stage_ms = 0;
};

class NcclWeightBroadcaster {
 public:
  static Result<std::unique_ptr<NcclWeightBroadcaster>> Start(NcclBroadcasterOptions options);
  ~NcclWeightBroadcaster();

  // Makes `snapshot` the version to send (replacing one not yet sent).
  void Publish(std::shared_ptr<const actors::WeightSnapshot> snapshot);
  NcclBroadcasterStats stats() const;

 private:
  explicit NcclWeightBroadcaster(NcclBroadcasterOptions options) : options_(std::move(options)) {}
  void Run();
  bool SleepFor(int64_t ms);  // until a Publish or `ms`; false when stopping

  NcclBroadcasterOptions options_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  uint64_t publishes_ = 0, publishes_seen_ = 0;
  std::shared_ptr<const actors::WeightSnapshot> current_;
  NcclBroadcasterStats stats_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace grove::learner
