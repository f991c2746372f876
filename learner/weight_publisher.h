// WeightPublisher: serves the learner's published policy versions to rollout
// workers over ZeroMQ, pull-based: a worker asks for the newest version's
// announce, then for its chunks one request at a time (a worker that joins
// late, or dies half way, costs the learner nothing). It runs on its own
// thread so that serving never waits for a training step, and it keeps the
// newest two versions so a transfer that started before a publish can end.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "actors/socket.h"
#include "actors/weight_transfer.h"
#include "base/config.h"
#include "base/result.h"

namespace grove::learner {

// Same-GPU weights (docs/weights.md, CUDA IPC): a device copy of the
// published versions that a rollout worker on the learner's GPU reads
// through an IPC handle instead of fetching chunks. Lazy: nothing is copied
// until a worker on this GPU has asked once (Export); from then on every
// Publish copies. Thread-safe: Publish is called by the training loop,
// Export and FillAnnounce by the publisher's thread.
class DeviceWeightExport {
 public:
  virtual ~DeviceWeightExport() = default;
  // The UUID of the GPU the copies lie on (actors::CudaDeviceUuid).
  virtual const std::string& device_uuid() const = 0;
  // True once a worker on this GPU asked (Publish copies from then on).
  virtual bool wanted() const = 0;
  // Copies `snapshot` to the device when wanted(), else does nothing.
  // device_flat: the same bytes already on the export's GPU (the GPU
  // learner's fp32 masters, complete when called, unchanged until it
  // returns): copied device to device; null: from snapshot.flat. The newest
  // two versions stay readable; a reader still copying an older one sees
  // the slot's sequence lock move (actors/cuda_ipc.h) and asks again.
  virtual Status Publish(const actors::WeightSnapshot& snapshot, const float* device_flat) = 0;
  // A worker on this GPU asked for `snapshot`: wanted() from now on, and the
  // version is copied (from the host) unless held or older than one held.
  virtual Status Export(const actors::WeightSnapshot& snapshot) = 0;
  // An IPC announce of `snapshot` when its bytes are held; false otherwise
  // (the publisher then announces chunks).
  virtual bool FillAnnounce(const actors::WeightSnapshot& snapshot, wire::WeightAnnounce::Builder out) = 0;
};

class WeightPublisher {
 public:
  // Binds `bind` (port 0 picks a free port). chunk_bytes: the bucket size.
  static Result<std::unique_ptr<WeightPublisher>> Start(const std::string& bind, std::string sender_id,
                                                        uint64_t chunk_bytes);
  ~WeightPublisher();

  const std::string& endpoint() const { return endpoint_; }
  // Also offers every version published from now on through `device`
  // (workers on its GPU get an IPC announce); null: chunks only.
  void SetDeviceExport(std::unique_ptr<DeviceWeightExport> device);
  // device_flat: the snapshot's bytes on the device export's GPU, if the
  // caller has them there (DeviceWeightExport::Publish); may be null.
  void Publish(std::shared_ptr<const actors::WeightSnapshot> snapshot, const float* device_flat = nullptr);
  int64_t version() const;

  uint64_t bytes_served() const { return bytes_served_.load(); }
  uint64_t requests_served() const { return requests_served_.load(); }
  uint64_t frames_rejected() const;

 private:
  WeightPublisher(std::string sender_id, uint64_t chunk_bytes)
      : sender_id_(std::move(sender_id)), chunk_bytes_(chunk_bytes) {}
  void Serve();
  std::shared_ptr<const actors::WeightSnapshot> Find(int64_t version) const;

  std::string sender_id_;
  uint64_t chunk_bytes_;
  std::unique_ptr<actors::RouterSocket> socket_;
  std::string endpoint_;
  mutable std::mutex mu_;
  std::shared_ptr<const actors::WeightSnapshot> current_, previous_;
  std::shared_ptr<DeviceWeightExport> device_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> bytes_served_{0}, requests_served_{0};
  std::thread thread_;
};

// The NCCL broadcast that [weights] transport may add beside the ZeroMQ
// publisher (docs/weights.md): the publisher keeps serving either way (for
// workers without a GPU, and as the fallback).
class WeightBroadcast {
 public:
  virtual ~WeightBroadcast() = default;
  virtual void Publish(std::shared_ptr<const actors::WeightSnapshot> snapshot) = 0;
};

// Reads [weights]: the device copy for workers on this learner's GPU, null
// when the transport resolves to zmq or the build has no CUDA. gpu: the
// learner's device.
Result<std::unique_ptr<DeviceWeightExport>> StartDeviceWeightExport(const Config& root, int gpu);

// Reads [weights]; null when the transport resolves to zmq. Errors:
// InvalidArgument (bad section), FailedPrecondition (transport = "nccl" in a
// build without NCCL or a process that sees no GPU).
Result<std::unique_ptr<WeightBroadcast>> StartWeightBroadcast(const Config& root, const std::string& learner_id,
                                                              const std::string& coordinator);

}  // namespace grove::learner
