#include "rollout/weight_fetch.h"

namespace grove::rollout {

Result<std::optional<actors::WeightSnapshot>> FetchNewerWeights(actors::RpcClient& learner, int64_t have_version,
                                                                 const FetchOptions& options) {
  using actors::BodyKind;
  actors::WeightAssembler assembler;
  {
    capnp::MallocMessageBuilder mb;
    auto env = actors::InitEnvelope(mb, learner.sender_id(), 0);
    env.getBody().initWeightRequest().setHaveVersion(have_version);
    GROVE_ASSIGN_OR_RETURN(actors::Frame reply, learner.Call(mb, {BodyKind::WEIGHT_ANNOUNCE}, options.timeout_ms));
    auto ann = reply.envelope().getBody().getWeightAnnounce();
    if (ann.getVersion() <= have_version) return std::optional<actors::WeightSnapshot>();
    GROVE_RETURN_IF_ERROR(assembler.Begin(ann, options.max_bytes));
  }
  while (!assembler.complete()) {
    capnp::MallocMessageBuilder mb;
    auto env = actors::InitEnvelope(mb, learner.sender_id(), 0);
    auto req = env.getBody().initWeightRequest();
    req.setHaveVersion(have_version);
    req.setWantChunk(true);
    req.setVersion(assembler.version());
    req.setOffset(assembler.next_missing_offset());
    Result<actors::Frame> reply = learner.Call(mb, {BodyKind::WEIGHT_CHUNK}, options.timeout_ms);
    if (!reply.ok()) {
      if (reply.status().code() == StatusCode::kFailedPrecondition)  // the learner's error reply
        return Status::Aborted(reply.status().message());
      return reply.status();
    }
    GROVE_RETURN_IF_ERROR(assembler.Add(reply->envelope().getBody().getWeightChunk()));
  }
  GROVE_ASSIGN_OR_RETURN(actors::WeightSnapshot snap, assembler.Finish());
  return std::optional<actors::WeightSnapshot>(std::move(snap));
}

}  // namespace grove::rollout
