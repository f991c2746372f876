// Fetching a newer policy version from the learner's WeightPublisher, chunk
// by chunk over one request/reply connection, with every received byte
// checked (sizes, offsets, version, checksum) before it becomes a policy.
#pragma once

#include <cstdint>
#include <optional>

#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "actors/weight_transfer.h"
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

}  // namespace grove::rollout
