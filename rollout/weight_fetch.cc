#include "rollout/weight_fetch.h"

#include <functional>
#include <limits>

#include <glog/logging.h>

#include "actors/transport_gpus.h"
#include "actors/weights_transport.h"
#ifdef GROVE_WITH_NCCL
#include "actors/nccl_group.h"
#include "actors/cuda_ipc.h"
#include "rollout/nccl_weight_receiver.h"
#endif

namespace grove::rollout {

namespace {

// Reads the version an IPC announce names (into the host, or onto this
// worker's GPU).
using IpcReader = std::function<Result<actors::WeightSnapshot>(wire::WeightAnnounce::Reader)>;

Result<std::optional<actors::WeightSnapshot>> Fetch(actors::RpcClient& learner, int64_t have_version,
                                                    const FetchOptions& options, const IpcReader& ipc_read) {
  using actors::BodyKind;
  actors::WeightAssembler assembler;
  {
    capnp::MallocMessageBuilder mb;
    auto env = actors::InitEnvelope(mb, learner.sender_id(), 0);
    auto req = env.getBody().initWeightRequest();
    req.setHaveVersion(have_version);
    if (!options.device_uuid.empty())
      req.setDeviceUuid(kj::arrayPtr(reinterpret_cast<const kj::byte*>(options.device_uuid.data()),
                                     options.device_uuid.size()));
    GROVE_ASSIGN_OR_RETURN(actors::Frame reply, learner.Call(mb, {BodyKind::WEIGHT_ANNOUNCE}, options.timeout_ms));
    auto ann = reply.envelope().getBody().getWeightAnnounce();
    if (ann.getVersion() <= have_version) return std::optional<actors::WeightSnapshot>();
    if (ann.hasIpcHandle() && ann.getIpcHandle().size() > 0) {
      GROVE_ASSIGN_OR_RETURN(actors::WeightSnapshot snap, ipc_read(ann));
      return std::optional<actors::WeightSnapshot>(std::move(snap));
    }
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

}  // namespace

Result<std::optional<actors::WeightSnapshot>> FetchNewerWeights(actors::RpcClient& learner, int64_t have_version,
                                                                 const FetchOptions& options) {
  return Fetch(learner, have_version, options, [&](wire::WeightAnnounce::Reader ann) -> Result<actors::WeightSnapshot> {
#ifdef GROVE_WITH_NCCL
    actors::IpcReadOptions ro;
    ro.device = options.ipc_device;
    return actors::ReceiveIpcWeights(ann, options.max_bytes, ro);
#else
    (void)ann;
    return Status::FailedPrecondition("the learner sent a CUDA IPC handle to a build without CUDA");
#endif
  });
}

Result<LearnerWeightsInfo> ProbeLearnerWeights(actors::RpcClient& learner, int timeout_ms) {
  using actors::BodyKind;
  capnp::MallocMessageBuilder mb;
  auto env = actors::InitEnvelope(mb, learner.sender_id(), 0);
  // Claims to hold every version: the answer is the bare announce.
  env.getBody().initWeightRequest().setHaveVersion(std::numeric_limits<int64_t>::max());
  GROVE_ASSIGN_OR_RETURN(actors::Frame reply, learner.Call(mb, {BodyKind::WEIGHT_ANNOUNCE}, timeout_ms));
  auto ann = reply.envelope().getBody().getWeightAnnounce();
  LearnerWeightsInfo info;
  info.version = ann.getVersion();
  if (ann.hasDeviceUuid()) {
    auto u = ann.getDeviceUuid();
    info.device_uuid.assign(reinterpret_cast<const char*>(u.begin()), u.size());
  }
  return info;
}

namespace {

#ifdef GROVE_WITH_NCCL
class NcclFeed : public WeightFeed {
 public:
  explicit NcclFeed(std::unique_ptr<NcclWeightReceiver> r) : r_(std::move(r)) {}
  std::optional<actors::WeightSnapshot> TakeNewer(int64_t have_version, const float** device_flat) override {
    return r_->TakeNewer(have_version, device_flat);
  }

 private:
  std::unique_ptr<NcclWeightReceiver> r_;
};
#endif

}  // namespace

Result<std::unique_ptr<WeightFeed>> StartWeightFeed(const Config& root, const std::string& worker_id,
                                                    const std::string& coordinator, int device,
                                                    std::function<int64_t()> learner_version, bool to_device) {
  GROVE_ASSIGN_OR_RETURN(actors::WeightsTransportOptions w, actors::WeightsTransportOptions::FromConfig(root));
  GROVE_ASSIGN_OR_RETURN(actors::WeightTransport t, w.Choose(actors::TransportGpuCount() > 0));
  if (t == actors::WeightTransport::kZmq) return std::unique_ptr<WeightFeed>();
#ifdef GROVE_WITH_NCCL
  NcclReceiverOptions o;
  o.coordinator = coordinator;
  o.worker_id = worker_id;
  o.device = device;
  o.deadline_ms = w.deadline_ms;
  o.poll_ms = w.poll_ms;
  o.learner_version = std::move(learner_version);
  o.to_device = to_device;
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<NcclWeightReceiver> r, NcclWeightReceiver::Start(o));
  LOG(INFO) << "weights: received over NCCL" << (to_device ? ", kept on the GPU" : "");
  return std::unique_ptr<WeightFeed>(new NcclFeed(std::move(r)));
#else
  (void)worker_id;
  (void)coordinator;
  (void)device;
  (void)learner_version;
  (void)to_device;
  return Status::Internal("unreachable");
#endif
}

Result<std::unique_ptr<WeightSource>> WeightSource::Start(const Config& root, const std::string& worker_id,
                                                          const std::string& coordinator, int gpu,
                                                          FetchOptions fetch,
                                                          std::function<int64_t()> learner_version) {
  GROVE_ASSIGN_OR_RETURN(actors::WeightsTransportOptions w, actors::WeightsTransportOptions::FromConfig(root));
  GROVE_ASSIGN_OR_RETURN(actors::WeightTransport t, w.Choose(actors::TransportGpuCount() > 0));
  std::unique_ptr<WeightSource> src(new WeightSource());
  src->root_ = root;
  src->worker_id_ = worker_id;
  src->coordinator_ = coordinator;
  src->learner_version_ = std::move(learner_version);
  src->nccl_device_ = gpu >= 0 ? gpu : 0;
  src->fetch_ = std::move(fetch);
  src->fetch_.device_uuid.clear();
  if (t == actors::WeightTransport::kZmq) {
    src->mode_ = Mode::kFetch;
    return src;
  }
#ifdef GROVE_WITH_NCCL
  // NCCL or CUDA IPC: which one depends on the learner's GPU, known from
  // its first announce.
  GROVE_ASSIGN_OR_RETURN(src->fetch_.device_uuid, actors::CudaDeviceUuid(src->nccl_device_));
  src->fetch_.ipc_device = src->nccl_device_;
  src->mode_ = Mode::kUndecided;
#endif
  return src;
}

WeightSource::~WeightSource() = default;

std::string WeightSource::name() const {
  switch (mode_) {
    case Mode::kUndecided: return "undecided";
    case Mode::kFetch: return "zmq";
    case Mode::kIpc: return "cuda-ipc";
    case Mode::kNccl: return "nccl";
  }
  return "";
}

bool WeightSource::needs_learner() const { return mode_ != Mode::kNccl; }

Status WeightSource::Decide(actors::RpcClient& learner) {
  GROVE_ASSIGN_OR_RETURN(LearnerWeightsInfo info, ProbeLearnerWeights(learner, fetch_.timeout_ms));
  if (info.device_uuid.empty()) {
    // A learner that exports no GPU copy resolved its own transport to zmq
    // (no GPU, or no NCCL): it broadcasts nothing, so fetch.
    mode_ = Mode::kFetch;
    fetch_.device_uuid.clear();
    LOG(INFO) << "weights: the learner offers no GPU transport: ZeroMQ";
    return Status::OK();
  }
  if (info.device_uuid == fetch_.device_uuid) {
    mode_ = Mode::kIpc;
    LOG(INFO) << "weights: the learner is on this worker's GPU " << fetch_.ipc_device << ": CUDA IPC";
    return Status::OK();
  }
  Result<std::unique_ptr<WeightFeed>> feed =
      StartWeightFeed(root_, worker_id_, coordinator_, nccl_device_, learner_version_, fetch_.ipc_to_device);
  if (!feed.ok() || !*feed)
    return Status::Internal("weights: the NCCL receiver did not start: " +
                            (feed.ok() ? std::string("transport resolved to zmq") : feed.status().ToString()));
  feed_ = std::move(*feed);
  mode_ = Mode::kNccl;
  LOG(INFO) << "weights: the learner is on another GPU: NCCL on GPU " << nccl_device_;
  return Status::OK();
}

Result<std::optional<actors::WeightSnapshot>> WeightSource::TakeNewer(actors::RpcClient* learner,
                                                                      int64_t have_version) {
  device_weights_ = nullptr;
  if (mode_ == Mode::kNccl) return feed_->TakeNewer(have_version, &device_weights_);
  if (learner == nullptr) return std::optional<actors::WeightSnapshot>();
  if (mode_ == Mode::kUndecided) {
    // Nothing published yet, or the learner away: the caller asks again.
    GROVE_RETURN_IF_ERROR(Decide(*learner));
    if (mode_ == Mode::kNccl) return feed_->TakeNewer(have_version, &device_weights_);
  }
#ifdef GROVE_WITH_NCCL
  if (mode_ == Mode::kIpc && fetch_.ipc_to_device) {
    if (!ipc_staging_) ipc_staging_ = std::make_shared<actors::IpcDeviceStaging>();
    auto* staging = static_cast<actors::IpcDeviceStaging*>(ipc_staging_.get());
    const float* on_device = nullptr;
    actors::IpcReadOptions ro;
    ro.device = fetch_.ipc_device;
    IpcReader to_device = [&](wire::WeightAnnounce::Reader ann) {
      return actors::ReadIpcWeightSlot(ann, fetch_.max_bytes, *staging, &on_device, ro);
    };
    // Aborted: the slot moved on to a newer version while we looked (the
    // learner reuses its two slots): the next announce names the newest.
    Result<std::optional<actors::WeightSnapshot>> got = Fetch(*learner, have_version, fetch_, to_device);
    for (int again = 0; again < 2 && !got.ok() && got.status().code() == StatusCode::kAborted; ++again)
      got = Fetch(*learner, have_version, fetch_, to_device);
    if (got.ok() && got->has_value() && (*got)->flat.empty()) device_weights_ = on_device;
    return got;
  }
#endif
  return FetchNewerWeights(*learner, have_version, fetch_);
}

}  // namespace grove::rollout
