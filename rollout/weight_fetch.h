// Fetching a newer policy version from the learner's WeightPublisher, chunk
// by chunk over one request/reply connection, with every received byte
// checked (sizes, offsets, version, checksum) before it becomes a policy.
#pragma once

#include <cstdint>
#include <optional>

#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "actors/weight_transfer.h"
#include "base/config.h"
#include "base/result.h"

namespace grove::rollout {

struct FetchOptions {
  int timeout_ms = 5000;               // per request
  uint64_t max_bytes = uint64_t{8} << 30;
};

// nullopt when the learner holds nothing newer than have_version. Errors:
// Unavailable (learner unreachable), Corruption (bad bytes), Aborted (the
// version was dropped mid-transfer: call again for the newest).
Result<std::optional<actors::WeightSnapshot>> FetchNewerWeights(actors::RpcClient& learner, int64_t have_version,
                                                                 const FetchOptions& options);

// Versions pushed to this worker (the NCCL group, docs/weights.md) instead
// of fetched: received and verified in the background, taken between
// requests.
class WeightFeed {
 public:
  virtual ~WeightFeed() = default;
  // The newest verified version if newer than have_version.
  virtual std::optional<actors::WeightSnapshot> TakeNewer(int64_t have_version) = 0;
};

// Reads [weights]; null when the transport resolves to zmq (fetch with
// FetchNewerWeights). Errors: InvalidArgument (bad section),
// FailedPrecondition (transport = "nccl" without NCCL or a visible GPU).
Result<std::unique_ptr<WeightFeed>> StartWeightFeed(const Config& root, const std::string& worker_id,
                                                    const std::string& coordinator);

}  // namespace grove::rollout
