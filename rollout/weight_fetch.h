// Fetching a newer policy version from the learner's WeightPublisher, chunk
// by chunk over one request/reply connection, with every received byte
// checked (sizes, offsets, version, checksum) before it becomes a policy.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "actors/weight_transfer.h"
#include "base/config.h"
#include "base/result.h"

namespace grove::rollout {

struct FetchOptions {
  int timeout_ms = 5000;               // per request
  uint64_t max_bytes = uint64_t{8} << 30;
  // Same-GPU weights: the UUID of this worker's GPU (actors::CudaDeviceUuid)
  // and its index here. A learner on that GPU answers with a CUDA IPC
  // handle, read on ipc_device. Empty: chunks only.
  std::string device_uuid;
  int ipc_device = -1;
  // WeightSource only: versions read through CUDA IPC or received over
  // NCCL stay on the worker's GPU (WeightSource::device_weights) instead of
  // coming to the host, for an engine that installs from device memory.
  bool ipc_to_device = false;
};

// nullopt when the learner holds nothing newer than have_version. Errors:
// Unavailable (learner unreachable), Corruption (bad bytes), Aborted (the
// version was dropped mid-transfer: call again for the newest).
Result<std::optional<actors::WeightSnapshot>> FetchNewerWeights(actors::RpcClient& learner, int64_t have_version,
                                                                 const FetchOptions& options);

// What the learner's publisher says of itself, without a transfer: its
// newest version and the UUID of the GPU it can export weights from ("" when
// it exports none). Errors as FetchNewerWeights (Unavailable before the
// learner's first version).
struct LearnerWeightsInfo {
  int64_t version = -1;
  std::string device_uuid;
};
Result<LearnerWeightsInfo> ProbeLearnerWeights(actors::RpcClient& learner, int timeout_ms);

// Versions pushed to this worker (the NCCL group, docs/weights.md) instead
// of fetched: received and verified in the background, taken between
// requests.
class WeightFeed {
 public:
  virtual ~WeightFeed() = default;
  // The newest verified version if newer than have_version. A feed started
  // with to_device returns it with an empty flat and its bytes at
  // *device_flat (valid until the next TakeNewer that returns a version).
  virtual std::optional<actors::WeightSnapshot> TakeNewer(int64_t have_version, const float** device_flat) = 0;
};

// Reads [weights]; null when the transport resolves to zmq (fetch with
// FetchNewerWeights). Errors: InvalidArgument (bad section),
// FailedPrecondition (transport = "nccl" without NCCL or a visible GPU).
// device: the GPU this worker's NCCL rank uses. learner_version: the newest
// version the learner has published as far as this process knows (the
// coordinator's); required for nccl (NcclReceiverOptions::learner_version
// says why). to_device: versions stay on `device` (NcclReceiverOptions).
Result<std::unique_ptr<WeightFeed>> StartWeightFeed(const Config& root, const std::string& worker_id,
                                                    const std::string& coordinator, int device = 0,
                                                    std::function<int64_t()> learner_version = nullptr,
                                                    bool to_device = false);

// Where a rollout worker's versions come from (docs/weights.md): fetched
// in chunks over ZeroMQ; pushed by the NCCL group (the learner is on another
// GPU); or read through a CUDA IPC handle (the learner is on this worker's
// GPU, where NCCL cannot have both). With a GPU and [weights] transport
// nccl/auto, the choice waits for the learner's first announce, which says
// which GPU the learner exports from: this worker's -> IPC; another -> NCCL;
// none (the learner resolved its transport to zmq) -> fetch.
class WeightSource {
 public:
  // gpu: the device this worker samples on (-1: none; the NCCL rank then
  // uses device 0). learner_version: as StartWeightFeed (needed once the
  // source turns to NCCL). Errors as StartWeightFeed.
  static Result<std::unique_ptr<WeightSource>> Start(const Config& root, const std::string& worker_id,
                                                     const std::string& coordinator, int gpu, FetchOptions fetch,
                                                     std::function<int64_t()> learner_version = nullptr);
  ~WeightSource();

  // "zmq", "nccl", "cuda-ipc", or "undecided".
  std::string name() const;
  // True while versions come through the learner's publisher (or the
  // choice is still open): TakeNewer needs `learner` then.
  bool needs_learner() const;
  // The newest version if newer than have_version (nullopt: none yet, or
  // undecided without a learner to ask). Errors as FetchNewerWeights, all
  // worth a retry, except Internal: the NCCL receiver could not start.
  // With FetchOptions::ipc_to_device, a version that came through CUDA IPC
  // or NCCL has an empty flat: its bytes are on this worker's GPU at
  // device_weights() (verified, valid until the next TakeNewer).
  Result<std::optional<actors::WeightSnapshot>> TakeNewer(actors::RpcClient* learner, int64_t have_version);
  // The device copy of the version the last TakeNewer returned, or null
  // (it came to the host).
  const float* device_weights() const { return device_weights_; }

 private:
  enum class Mode { kUndecided, kFetch, kIpc, kNccl };
  WeightSource() = default;
  Status Decide(actors::RpcClient& learner);

  Config root_;
  std::string worker_id_, coordinator_;
  std::function<int64_t()> learner_version_;
  int nccl_device_ = 0;
  FetchOptions fetch_;
  Mode mode_ = Mode::kFetch;
  std::unique_ptr<WeightFeed> feed_;
  std::shared_ptr<void> ipc_staging_;  // actors::IpcDeviceStaging (CUDA builds)
  const float* device_weights_ = nullptr;
};

}  // namespace grove::rollout
