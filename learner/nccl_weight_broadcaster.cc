#include "learner/nccl_weight_broadcaster.h"

#include <glog/logging.h>

#include "actors/nccl_group.h"
#include "actors/nccl_weights.h"
#include "actors/rpc_client.h"
#include "actors/weight_group_client.h"

namespace grove::learner {

using actors::NcclClock;
using actors::NcclGroup;
using wire::WeightGroupAction;

Result<std::unique_ptr<NcclWeightBroadcaster>> NcclWeightBroadcaster::Start(NcclBroadcasterOptions options) {
  if (options.learner_id.empty() || options.coordinator.empty()) {
    return Status::InvalidArgument("NCCL broadcaster needs the learner id and the coordinator");
  }
  if (options.bucket_bytes < 4096) return Status::InvalidArgument("NCCL bucket must be >= 4096 bytes");
  if (options.poll_ms < 1 || options.deadline_ms < options.poll_ms) {
    return Status::InvalidArgument("NCCL broadcaster: need 1 <= poll_ms <= deadline_ms");
  }
  if (Status s = actors::InitCudaDevice(options.device); !s.ok()) {
    return Status::FailedPrecondition("NCCL broadcaster: " + s.ToString());
  }
  std::unique_ptr<NcclWeightBroadcaster> b(new NcclWeightBroadcaster(std::move(options)));
  b->thread_ = std::thread([p = b.get()] { p->Run(); });
  return b;
}

NcclWeightBroadcaster::~NcclWeightBroadcaster() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  stopping_ = true;
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void NcclWeightBroadcaster::Publish(std::shared_ptr<const actors::WeightSnapshot> snapshot) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    current_ = std::move(snapshot);
    ++publishes_;
  }
  wake_.notify_all();
}

NcclBroadcasterStats NcclWeightBroadcaster::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

bool NcclWeightBroadcaster::SleepFor(int64_t ms) {
  std::unique_lock<std::mutex> lock(mu_);
  wake_.wait_for(lock, std::chrono::milliseconds(ms), [&] { return stop_ || publishes_ != publishes_seen_; });
  publishes_seen_ = publishes_;
  return !stop_;
}

void NcclWeightBroadcaster::Run() {
  const NcclBroadcasterOptions& o = options_;
  actors::RpcClient rpc(o.learner_id);
  if (Status s = rpc.Connect(o.coordinator); !s.ok()) {
    LOG(ERROR) << "NCCL broadcaster: " << s;
    return;
  }
  const actors::NcclCancel stopping = [this] { return stopping_.load(); };
  std::unique_ptr<NcclGroup> group;
  actors::NcclStaging staging;
  uint64_t epoch = 0;
  int64_t sent_in_group = -1;           // newest version this epoch's members hold
  int64_t attempted_version = -1;       // the version of the last failures
  int attempts = 0;
  NcclClock::time_point failed_at{};    // when we last reported a failure

  auto report_failure = [&](const Status& why) {
    LOG(WARNING) << "weight group epoch " << epoch << ": " << why;
    group.reset();  // aborts the communicator
    auto r = actors::CallWeightGroup(rpc, WeightGroupAction::FAILED, epoch, "", o.rpc_timeout_ms);
    if (!r.ok()) LOG(WARNING) << "reporting the failure of epoch " << epoch << ": " << r.status();
    failed_at = NcclClock::now();
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.failures;
  };

  bool polled_now = true;
  while (!stopping_) {
    if (!polled_now && !SleepFor(o.poll_ms)) break;
    polled_now = false;
    auto view = actors::CallWeightGroup(rpc, WeightGroupAction::POLL, epoch, "", o.rpc_timeout_ms);
    if (!view.ok()) {
      LOG_EVERY_N(WARNING, 20) << "weight group poll: " << view.status();
      continue;
    }
    // An epoch this broadcaster did not form (a previous incarnation of the
    // learner did) carries nothing: form a fresh one.
    const bool foreign_epoch = view->epoch != epoch && view->size > 1;
    if (view->reform_needed || foreign_epoch) {
      // After a failure the survivors need a poll or two to re-confirm.
      if (NcclClock::now() - failed_at < std::chrono::milliseconds(2 * o.poll_ms)) continue;
      group.reset();
      auto id = NcclGroup::NewUniqueId();
      if (!id.ok()) {
        LOG(ERROR) << "weight group: " << id.status();
        continue;
      }
      auto formed = actors::CallWeightGroup(rpc, WeightGroupAction::PROPOSE, view->epoch + 1, *id,
                                            o.rpc_timeout_ms);
      if (!formed.ok()) {
        LOG(WARNING) << "weight group propose: " << formed.status();
        continue;
      }
      epoch = formed->epoch;
      sent_in_group = -1;
      LOG(INFO) << "weight group epoch " << epoch << ": " << formed->size << " ranks";
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.epoch = epoch;
        stats_.group_size = formed->size;
        ++stats_.epochs_formed;
      }
      if (formed->size > 1) {
        auto g = NcclGroup::Form(*id, 0, formed->size, o.device, actors::NcclDeadlineIn(o.deadline_ms), stopping);
        if (!g.ok()) {
          report_failure(g.status());
          continue;
        }
        group = std::move(*g);
      }
    }
    std::shared_ptr<const actors::WeightSnapshot> snap;
    {
      std::lock_guard<std::mutex> lock(mu_);
      snap = current_;
    }
    if (group == nullptr || snap == nullptr || snap->version == sent_in_group) continue;
    if (snap->version == attempted_version && attempts >= 2) continue;  // retried once already
    if (snap->version != attempted_version) {
      attempted_version = snap->version;
      attempts = 0;
    }
    ++attempts;
    actors::NcclSendTiming timing;
    Status s = actors::SendWeights(*group, *snap, staging, o.bucket_bytes,
                                   actors::NcclDeadlineIn(o.deadline_ms), stopping, &timing);
    if (!s.ok()) {
      report_failure(s);
      polled_now = true;  // re-form (after the grace) without a full sleep
      continue;
    }
    sent_in_group = snap->version;
    attempts = 0;
    std::lock_guard<std::mutex> lock(mu_);
    stats_.last_sent_version = snap->version;
    ++stats_.versions_sent;
    stats_.last_broadcast_ms = timing.broadcast_ms;
    stats_.last_stage_ms = timing.stage_ms;
    polled_now = true;  // a newer version may be waiting already
  }
}

}  // namespace grove::learner
