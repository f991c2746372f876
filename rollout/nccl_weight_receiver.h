// NcclWeightReceiver: a rollout worker's side of the NCCL weight group
// (docs/weights.md). Its own thread asks the coordinator which epoch to be
// in, joins it (NcclGroup::Form with the epoch's unique id and rank), and
// receives every version the learner broadcasts into a device staging
// buffer, then into a host snapshot verified against its checksum. The
// rollout loop picks the newest verified version up between requests with
// TakeNewer(), so a group of completions never mixes versions.
//
// No receive is left parked on the GPU between versions. A posted NCCL
// receive is a kernel that spins until the learner sends; while it spins,
// any CUDA call of this process that waits for the device to drain (a
// kernel's first launch under lazy module loading, cudaMalloc / cudaFree, a
// device synchronize: the engine's install does such things) waits for it
// too. The learner's next version needs this worker's samples, which need
// that install: a receive posted for a version not yet published deadlocks
// the run (issue 10: one NCCL worker, nothing moved for minutes). So the
// receiver posts the receive of the first version of each epoch at once
// (the learner sends its current version right after forming the epoch)
// and each later one only once the coordinator says that a newer version
// than the newest received in the epoch exists (`learner_version`, from
// this process's heartbeat replies, or the weight-group reply polled every
// poll_ms while the receiver waits; the learner hands a version to its
// broadcaster before it tells the coordinator about it, so the bytes are
// on their way). A header that then does not come within deadline_ms
// ends the epoch for this worker (the learner re-forms it when its next
// send misses its own deadline).
//
// While it waits the thread keeps polling the coordinator; an epoch that
// moved on or was reported failed cancels the wait and aborts the
// communicator, so a learner's re-formation never waits on this worker, and
// this worker never waits on a dead peer.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "actors/weight_transfer.h"
#include "base/result.h"

namespace grove::rollout {

struct NcclReceiverOptions {
  std::string coordinator;   // tcp://HOST:PORT
  std::string worker_id;     // the worker's registered actor id
  int device = 0;
  int64_t deadline_ms = 30000;   // forming an epoch; one version's header, and its payload
  int64_t poll_ms = 200;
  // Required: the newest policy version the learner has published as far as
  // this process knows (a rollout worker: the coordinator's, from its
  // heartbeat replies, ActorClient::coordinator_policy_version). It gates
  // every receive after an epoch's first (see the top of this header).
  std::function<int64_t()> learner_version;
  uint64_t max_bytes = uint64_t{16} << 30;
  int rpc_timeout_ms = 2000;
  // Test-only fault injection: called after a version's header arrived.
  std::function<void(int64_t version)> after_header;
  // Versions stay on `device` (verified there) instead of coming to a host
  // snapshot: for an engine that installs from device memory. Two payload
  // buffers of the model's size then alternate: the one TakeNewer last
  // handed out is never received into, so it stays valid until the next
  // TakeNewer that returns a version.
  bool to_device = false;
};

struct NcclReceiverStats {
  uint64_t epoch = 0;
  int32_t rank = -1;
  int64_t last_version = -1;
  uint64_t versions_received = 0;
  uint64_t failures = 0;
  double last_receive_ms = 0;  // header to verified version (host snapshot, or device slot)
};

class NcclWeightReceiver {
 public:
  static Result<std::unique_ptr<NcclWeightReceiver>> Start(NcclReceiverOptions options);
  ~NcclWeightReceiver();

  // The newest verified version if newer than have_version (moved out).
  // With to_device its flat is empty and *device_flat (required then) is
  // where its bytes lie on the device; nullptr otherwise.
  std::optional<actors::WeightSnapshot> TakeNewer(int64_t have_version, const float** device_flat = nullptr);
  NcclReceiverStats stats() const;

 private:
  explicit NcclWeightReceiver(NcclReceiverOptions options) : options_(std::move(options)) {}
  void Run();

  NcclReceiverOptions options_;
  mutable std::mutex mu_;
  std::optional<actors::WeightSnapshot> newest_;
  // to_device: the payload slot (1 or 2) newest_'s bytes lie in, and the
  // one the consumer holds (0: none); their addresses.
  int newest_slot_ = 0, held_slot_ = 0;
  const float* newest_device_ = nullptr;
  NcclReceiverStats stats_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace grove::rollout
