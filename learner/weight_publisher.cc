#include "learner/weight_publisher.h"

#include <glog/logging.h>

#include "actors/transport_gpus.h"
#include "actors/weights_transport.h"
#ifdef GROVE_WITH_NCCL
#include "actors/nccl_group.h"
#include "learner/ipc_weight_export.h"
#include "learner/nccl_weight_broadcaster.h"
#endif

namespace grove::learner {

Result<std::unique_ptr<WeightPublisher>> WeightPublisher::Start(const std::string& bind, std::string sender_id,
                                                                uint64_t chunk_bytes) {
  if (chunk_bytes == 0 || chunk_bytes % sizeof(float) != 0 || chunk_bytes > actors::kMaxFrameBytes / 2)
    return Status::InvalidArgument("weight chunk_bytes must be a positive multiple of 4 below half the frame limit");
  std::unique_ptr<WeightPublisher> p(new WeightPublisher(std::move(sender_id), chunk_bytes));
  p->socket_ = std::make_unique<actors::RouterSocket>();
  GROVE_ASSIGN_OR_RETURN(p->endpoint_, p->socket_->Bind(bind));
  p->thread_ = std::thread([raw = p.get()] { raw->Serve(); });
  return p;
}

WeightPublisher::~WeightPublisher() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void WeightPublisher::SetDeviceExport(std::unique_ptr<DeviceWeightExport> device) {
  std::lock_guard<std::mutex> lock(mu_);
  device_ = std::move(device);
}

void WeightPublisher::Publish(std::shared_ptr<const actors::WeightSnapshot> snapshot, const float* device_flat) {
  std::shared_ptr<DeviceWeightExport> device;
  {
    std::lock_guard<std::mutex> lock(mu_);
    device = device_;
  }
  // Before the version is announced, so an IPC announce never names bytes
  // not yet on the device.
  if (device) {
    Status s = device->Publish(*snapshot, device_flat);
    if (!s.ok()) LOG(WARNING) << "weights: device copy of version " << snapshot->version << ": " << s;
  }
  std::lock_guard<std::mutex> lock(mu_);
  previous_ = std::move(current_);
  current_ = std::move(snapshot);
}

int64_t WeightPublisher::version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_ ? current_->version : -1;
}

uint64_t WeightPublisher::frames_rejected() const { return socket_->stats().Total(); }

std::shared_ptr<const actors::WeightSnapshot> WeightPublisher::Find(int64_t version) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (current_ && current_->version == version) return current_;
  if (previous_ && previous_->version == version) return previous_;
  return nullptr;
}

void WeightPublisher::Serve() {
  using actors::BodyKind;
  while (!stop_) {
    std::optional<actors::Incoming> in = socket_->Receive(100);
    if (!in) continue;
    Result<actors::Frame> frame = actors::DecodeFrame(in->payload.data(), in->payload.size(),
                                                      {BodyKind::WEIGHT_REQUEST}, &socket_->stats());
    if (!frame.ok()) continue;  // counted and logged once per kind by the codec
    auto env = frame->envelope();
    auto req = env.getBody().getWeightRequest();
    capnp::MallocMessageBuilder mb;
    auto out = actors::InitEnvelope(mb, sender_id_, env.getRequestId());
    if (!req.getWantChunk()) {
      std::shared_ptr<const actors::WeightSnapshot> cur;
      std::shared_ptr<DeviceWeightExport> device;
      {
        std::lock_guard<std::mutex> lock(mu_);
        cur = current_;
        device = device_;
      }
      const bool same_gpu = device && req.hasDeviceUuid() && req.getDeviceUuid().size() > 0 &&
                            std::string(reinterpret_cast<const char*>(req.getDeviceUuid().begin()),
                                        req.getDeviceUuid().size()) == device->device_uuid();
      if (!cur) {
        out.getBody().initError().setMessage("no policy version published yet");
      } else if (cur->version <= req.getHaveVersion()) {
        // Nothing newer: an announce of the version alone, without layout.
        out.getBody().initWeightAnnounce().setVersion(cur->version);
      } else if (same_gpu && !device->FillAnnounce(*cur, out.getBody().initWeightAnnounce())) {
        // The first worker on the learner's GPU (exports are lazy), or a
        // version the export missed: copy it now and announce the handle.
        Status exported = device->Export(*cur);
        if (!exported.ok()) {
          LOG_EVERY_N(WARNING, 20) << "weights: device copy of version " << cur->version << ": " << exported;
        }
        if (!exported.ok() || !device->FillAnnounce(*cur, out.getBody().initWeightAnnounce()))
          actors::FillWeightAnnounce(*cur, chunk_bytes_, out.getBody().initWeightAnnounce());
      } else if (!same_gpu) {
        actors::FillWeightAnnounce(*cur, chunk_bytes_, out.getBody().initWeightAnnounce());
      }
      if (device && out.getBody().isWeightAnnounce()) {
        const std::string& uuid = device->device_uuid();
        out.getBody().getWeightAnnounce().setDeviceUuid(
            kj::arrayPtr(reinterpret_cast<const kj::byte*>(uuid.data()), uuid.size()));
      }
    } else {
      std::shared_ptr<const actors::WeightSnapshot> snap = Find(req.getVersion());
      const uint64_t total = snap ? snap->flat.size() * sizeof(float) : 0;
      const uint64_t off = req.getOffset();
      if (!snap) {
        out.getBody().initError().setMessage("weights of version " + std::to_string(req.getVersion()) +
                                             " are no longer held; fetch the newest");
      } else if (off % chunk_bytes_ != 0 || off >= total) {
        out.getBody().initError().setMessage("bad weight chunk offset " + std::to_string(off));
      } else {
        const uint64_t len = std::min(chunk_bytes_, total - off);
        actors::FillWeightChunk(*snap, off, len, out.getBody().initWeightChunk());
        bytes_served_ += len;
      }
    }
    Status s = socket_->Send(in->peer, actors::EncodeFrame(mb));
    if (!s.ok()) VLOG(1) << "weight reply to a gone peer: " << s;
    ++requests_served_;
  }
}

namespace {

#ifdef GROVE_WITH_NCCL
class NcclBroadcast : public WeightBroadcast {
 public:
  explicit NcclBroadcast(std::unique_ptr<NcclWeightBroadcaster> b) : b_(std::move(b)) {}
  void Publish(std::shared_ptr<const actors::WeightSnapshot> snapshot) override { b_->Publish(std::move(snapshot)); }

 private:
  std::unique_ptr<NcclWeightBroadcaster> b_;
};
#endif

}  // namespace

Result<std::unique_ptr<DeviceWeightExport>> StartDeviceWeightExport(const Config& root, int gpu) {
  GROVE_ASSIGN_OR_RETURN(actors::WeightsTransportOptions w, actors::WeightsTransportOptions::FromConfig(root));
  GROVE_ASSIGN_OR_RETURN(actors::WeightTransport t, w.Choose(actors::TransportGpuCount() > gpu));
  if (t == actors::WeightTransport::kZmq) return std::unique_ptr<DeviceWeightExport>();
#ifdef GROVE_WITH_NCCL
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<DeviceWeightExport> e, IpcWeightExport::Create(gpu));
  LOG(INFO) << "weights: CUDA IPC for rollout workers on GPU " << gpu;
  return e;
#else
  return Status::Internal("unreachable");
#endif
}

Result<std::unique_ptr<WeightBroadcast>> StartWeightBroadcast(const Config& root, const std::string& learner_id,
                                                              const std::string& coordinator) {
  GROVE_ASSIGN_OR_RETURN(actors::WeightsTransportOptions w, actors::WeightsTransportOptions::FromConfig(root));
  GROVE_ASSIGN_OR_RETURN(actors::WeightTransport t, w.Choose(actors::TransportGpuCount() > 0));
  if (t == actors::WeightTransport::kZmq) return std::unique_ptr<WeightBroadcast>();
#ifdef GROVE_WITH_NCCL
  NcclBroadcasterOptions o;
  o.coordinator = coordinator;
  o.learner_id = learner_id;
  o.device = 0;  // the first GPU this process sees (the launcher picks it)
  o.bucket_bytes = w.bucket_bytes;
  o.deadline_ms = w.deadline_ms;
  o.poll_ms = w.poll_ms;
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<NcclWeightBroadcaster> b, NcclWeightBroadcaster::Start(o));
  LOG(INFO) << "weights: NCCL broadcast in " << (w.bucket_bytes >> 20) << " MiB buckets, ZeroMQ beside it";
  return std::unique_ptr<WeightBroadcast>(new NcclBroadcast(std::move(b)));
#else
  return Status::Internal("unreachable");
#endif
}

}  // namespace grove::learner
