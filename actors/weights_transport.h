// The [weights] section: how policy versions travel from the learner to the
// rollout workers (docs/weights.md). Unknown keys are rejected.
//   transport   = "zmq" | "nccl" | "auto"   (auto: nccl where this build has
//                 NCCL and the process sees a GPU, else zmq)
//   bucket_mb   = 64      NCCL bucket size, MiB (ZeroMQ keeps learner.weight_chunk_bytes)
//   deadline_ms = 30000   bound on forming a group and on one version's transfer
//   poll_ms     = 200     how often group members ask the coordinator
#pragma once

#include <cstdint>
#include <string>

#include "base/config.h"
#include "base/result.h"

namespace grove::actors {

enum class WeightTransport { kZmq, kNccl, kAuto };

struct WeightsTransportOptions {
  WeightTransport transport = WeightTransport::kZmq;
  uint64_t bucket_bytes = uint64_t{64} << 20;
  int64_t deadline_ms = 30000;
  int64_t poll_ms = 200;

  static Result<WeightsTransportOptions> FromConfig(const Config& root);
  // The transport to use, kAuto resolved: nccl when `nccl_usable` (this
  // build has NCCL and the process sees a GPU). FailedPrecondition for an
  // explicit "nccl" that is not usable here.
  Result<WeightTransport> Choose(bool nccl_usable) const;
};

std::string WeightTransportName(WeightTransport t);

}  // namespace grove::actors
