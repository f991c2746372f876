#include "rollout/nccl_weight_receiver.h"

#include <algorithm>

#include <glog/logging.h>

#include "actors/nccl_group.h"
#include "actors/nccl_weights.h"
#include "actors/rpc_client.h"
#include "actors/weight_group_client.h"

namespace grove::rollout {

using actors::NcclClock;
using actors::NcclGroup;
using wire::WeightGroupAction;

Result<std::unique_ptr<NcclWeightReceiver>> NcclWeightReceiver::Start(NcclReceiverOptions options) {
  if (options.worker_id.empty() || options.coordinator.empty()) {
    return Status::InvalidArgument("NCCL receiver needs the worker id and the coordinator");
  }
  if (options.poll_ms < 1 || options.deadline_ms < options.poll_ms) {
    return Status::InvalidArgument("NCCL receiver: need 1 <= poll_ms <= deadline_ms");
  }
  if (!options.learner_version) {
    return Status::InvalidArgument("NCCL receiver: needs learner_version (which versions are on their way)");
  }
  if (Status s = actors::InitCudaDevice(options.device); !s.ok()) {
    return Status::FailedPrecondition("NCCL receiver: " + s.ToString());
  }
  std::unique_ptr<NcclWeightReceiver> r(new NcclWeightReceiver(std::move(options)));
  r->thread_ = std::thread([p = r.get()] { p->Run(); });
  return r;
}

NcclWeightReceiver::~NcclWeightReceiver() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

std::optional<actors::WeightSnapshot> NcclWeightReceiver::TakeNewer(int64_t have_version, const float** device_flat) {
  if (device_flat != nullptr) *device_flat = nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  if (!newest_ || newest_->version <= have_version) return std::nullopt;
  std::optional<actors::WeightSnapshot> out = std::move(newest_);
  newest_.reset();
  if (newest_slot_ != 0) {
    held_slot_ = newest_slot_;
    newest_slot_ = 0;
    if (device_flat != nullptr) *device_flat = newest_device_;
  }
  return out;
}

NcclReceiverStats NcclWeightReceiver::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void NcclWeightReceiver::Run() {
  const NcclReceiverOptions& o = options_;
  actors::RpcClient rpc(o.worker_id);
  if (Status s = rpc.Connect(o.coordinator); !s.ok()) {
    LOG(ERROR) << "NCCL receiver: " << s;
    return;
  }
  std::unique_ptr<NcclGroup> group;
  actors::NcclStaging staging;
  uint64_t epoch = 0;         // the epoch `group` belongs to
  uint64_t given_up = 0;      // an epoch this worker failed to join: wait for the next
  int64_t newest_in_epoch = -1;  // the newest version received in `epoch`
  NcclClock::time_point next_poll{};
  // The learner's newest version as the coordinator's weight-group replies
  // tell it (every poll_ms while a receive waits for one): sooner than this
  // process's heartbeat replies (learner_version) do.
  int64_t polled_version = -1;

  // Polled inside every NCCL wait: stop, or the coordinator moved the group
  // on (a new epoch, or this one failed).
  auto epoch_moved = [&]() -> bool {
    if (stop_) return true;
    if (NcclClock::now() < next_poll) return false;
    next_poll = NcclClock::now() + std::chrono::milliseconds(o.poll_ms);
    auto v = actors::CallWeightGroup(rpc, WeightGroupAction::POLL, epoch, "", o.rpc_timeout_ms);
    if (v.ok()) polled_version = std::max(polled_version, v->policy_version);
    return v.ok() && (v->epoch != epoch || v->failed);
  };

  while (!stop_) {
    if (group == nullptr) {
      auto v = actors::CallWeightGroup(rpc, WeightGroupAction::POLL, epoch, "", o.rpc_timeout_ms);
      if (!v.ok() || v->rank <= 0 || v->failed || v->epoch == given_up || v->epoch == epoch) {
        if (!v.ok()) {
          LOG_EVERY_N(WARNING, 20) << "weight group poll: " << v.status();
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(o.poll_ms));
        continue;
      }
      epoch = v->epoch;
      next_poll = NcclClock::now() + std::chrono::milliseconds(o.poll_ms);
      auto g = NcclGroup::Form(v->unique_id, v->rank, v->size, o.device,
                               actors::NcclDeadlineIn(o.deadline_ms), epoch_moved);
      if (!g.ok()) {
        LOG(WARNING) << "joining weight group epoch " << epoch << ": " << g.status();
        given_up = epoch;
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.failures;
        continue;
      }
      group = std::move(*g);
      newest_in_epoch = -1;
      LOG(INFO) << "joined weight group epoch " << epoch << " as rank " << group->rank() << " of "
                << group->size();
      std::lock_guard<std::mutex> lock(mu_);
      stats_.epoch = epoch;
      stats_.rank = group->rank();
    }
    // After the epoch's first version: post the next receive only once a
    // newer version is published (header comment: a parked receive kernel
    // deadlocks this process's own CUDA work).
    if (newest_in_epoch >= 0 && std::max(o.learner_version(), polled_version) <= newest_in_epoch) {
      if (epoch_moved()) {
        group.reset();
        given_up = epoch;
        continue;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(std::min<int64_t>(o.poll_ms, 10)));
      continue;
    }
    actors::NcclReceiveOptions ro;
    ro.max_bytes = o.max_bytes;
    ro.payload_timeout_ms = o.deadline_ms;
    ro.after_header = o.after_header;
    if (o.to_device) {
      // Never into the slot the consumer holds; into the other free one if
      // there is one, else over the version waiting untaken (older than the
      // one coming, which takes its place).
      std::lock_guard<std::mutex> lock(mu_);
      ro.device_slot = held_slot_ == 1 || (held_slot_ == 0 && newest_slot_ == 1) ? 2 : 1;
      if (newest_ && newest_slot_ == ro.device_slot) {
        newest_.reset();
        newest_slot_ = 0;
      }
    }
    actors::NcclReceiveTiming timing;
    const float* on_device = nullptr;
    Result<actors::WeightSnapshot> got = actors::ReceiveWeights(
        *group, staging, ro, actors::NcclDeadlineIn(o.deadline_ms), epoch_moved, &timing, &on_device);
    if (!got.ok()) {
      // Aborted: the epoch moved on (normal on joins and deaths). Anything
      // else is a failure of this epoch; either way it is done.
      if (got.status().code() != StatusCode::kAborted) {
        LOG(WARNING) << "weight group epoch " << epoch << ": " << got.status();
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.failures;
      }
      group.reset();
      given_up = epoch;
      continue;
    }
    newest_in_epoch = std::max(newest_in_epoch, got->version);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.last_version = got->version;
    ++stats_.versions_received;
    stats_.last_receive_ms = timing.broadcast_ms + timing.copy_ms + timing.verify_ms;
    newest_ = std::move(*got);
    newest_slot_ = ro.device_slot;
    newest_device_ = on_device;
  }
}

}  // namespace grove::rollout
