#include "actors/weights_transport.h"

namespace grove::actors {

Result<WeightsTransportOptions> WeightsTransportOptions::FromConfig(const Config& root) {
  WeightsTransportOptions o;
  Config c = root.Section("weights");
  GROVE_RETURN_IF_ERROR(c.CheckKeys({"transport", "bucket_mb", "deadline_ms", "poll_ms"}));
  GROVE_ASSIGN_OR_RETURN(std::string transport, c.String("transport", "zmq"));
  if (transport == "zmq") {
    o.transport = WeightTransport::kZmq;
  } else if (transport == "nccl") {
    o.transport = WeightTransport::kNccl;
  } else if (transport == "auto") {
    o.transport = WeightTransport::kAuto;
  } else {
    return Status::InvalidArgument("weights.transport must be \"zmq\", \"nccl\" or \"auto\", not \"" +
                                   transport + "\"");
  }
  GROVE_ASSIGN_OR_RETURN(int64_t bucket_mb, c.Int("bucket_mb", 64));
  GROVE_ASSIGN_OR_RETURN(o.deadline_ms, c.Int("deadline_ms", o.deadline_ms));
  GROVE_ASSIGN_OR_RETURN(o.poll_ms, c.Int("poll_ms", o.poll_ms));
  // Large enough to amortize a launch per bucket; 255 keeps room to use the
  // same size for ZeroMQ chunks (256 MiB frames) later.
  if (bucket_mb < 1 || bucket_mb > 255) return Status::InvalidArgument("weights.bucket_mb must be in [1, 255]");
  if (o.deadline_ms < 100 || o.deadline_ms > 3600000) {
    return Status::InvalidArgument("weights.deadline_ms must be in [100, 3600000]");
  }
  if (o.poll_ms < 1 || o.poll_ms * 2 > o.deadline_ms) {
    return Status::InvalidArgument("weights.poll_ms must be >= 1 and at most half of deadline_ms");
  }
  o.bucket_bytes = static_cast<uint64_t>(bucket_mb) << 20;
  return o;
}

Result<WeightTransport> WeightsTransportOptions::Choose(bool nccl_usable) const {
  if (transport == WeightTransport::kAuto) return nccl_usable ? WeightTransport::kNccl : WeightTransport::kZmq;
  if (transport == WeightTransport::kNccl && !nccl_usable) {
    return Status::FailedPrecondition("weights.transport = \"nccl\", but this build has no NCCL or no GPU is visible");
  }
  return transport;
}

std::string WeightTransportName(WeightTransport t) {
  switch (t) {
    case WeightTransport::kZmq: return "zmq";
    case WeightTransport::kNccl: return "nccl";
    case WeightTransport::kAuto: return "auto";
  }
  return "unknown";
}

}  // namespace grove::actors
