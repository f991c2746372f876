#include "rollout/weight_fetch.h"

#include <glog/logging.h>

#include "actors/weights_transport.h"
#ifdef GROVE_WITH_NCCL
#include "actors/nccl_group.h"
#include "rollout/nccl_weight_receiver.h"
#endif

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

namespace {

#ifdef GROVE_WITH_NCCL
class NcclFeed : public WeightFeed {
 public:
  explicit NcclFeed(std::unique_ptr<NcclWeightReceiver> r) : r_(std::move(r)) {}
  std::optional<actors::WeightSnapshot> TakeNewer(int64_t have_version) override { return r_->TakeNewer(have_version); }

 private:
  std::unique_ptr<NcclWeightReceiver> r_;
};
#endif

}  // namespace

Result<std::unique_ptr<WeightFeed>> StartWeightFeed(const Config& root, const std::string& worker_id,
                                                    const std::string& coordinator) {
  GROVE_ASSIGN_OR_RETURN(actors::WeightsTransportOptions w, actors::WeightsTransportOptions::FromConfig(root));
#ifdef GROVE_WITH_NCCL
  const bool nccl_usable = actors::CudaDeviceCount() > 0;
#else
  const bool nccl_usable = false;
#endif
  GROVE_ASSIGN_OR_RETURN(actors::WeightTransport t, w.Choose(nccl_usable));
  if (t == actors::WeightTransport::kZmq) return std::unique_ptr<WeightFeed>();
#ifdef GROVE_WITH_NCCL
  NcclReceiverOptions o;
  o.coordinator = coordinator;
  o.worker_id = worker_id;
  o.device = 0;  // the first GPU this process sees (the launcher picks it)
  o.deadline_ms = w.deadline_ms;
  o.poll_ms = w.poll_ms;
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<NcclWeightReceiver> r, NcclWeightReceiver::Start(o));
  LOG(INFO) << "weights: received over NCCL";
  return std::unique_ptr<WeightFeed>(new NcclFeed(std::move(r)));
#else
  return Status::Internal("unreachable");
#endif
}

}  // namespace grove::rollout
