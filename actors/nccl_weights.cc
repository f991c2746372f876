#include "actors/nccl_weights.h"

#include <cstring>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <cuda_runtime_api.h>

#include "actors/cuda_status.h"
#include "kernels/weight_checksum.h"

namespace grove::actors {
namespace {

constexpr uint64_t kHeaderMagic = 0x47525657'4e43434cull;  // "GRVW" "NCCL"
constexpr uint64_t kMaxAnnounceBytes = uint64_t{64} << 20;

struct Header {
  uint64_t magic;
  int64_t version;
  uint64_t total_bytes;
  uint64_t checksum;
  uint64_t announce_bytes;
  uint64_t bucket_bytes;
};
static_assert(sizeof(Header) == 48);

double MsSince(NcclClock::time_point t0) {
  return std::chrono::duration<double, std::milli>(NcclClock::now() - t0).count();
}

// Header then announce, both in staging slot 0 (announce 8-byte aligned
// after the header).
Status SendPreamble(NcclGroup& group, const WeightSnapshot& snap, uint64_t total_bytes,
                    size_t bucket_bytes, NcclStaging& staging, NcclDeadline deadline,
                    const NcclCancel& cancelled) {
  capnp::MallocMessageBuilder msg;
  FillWeightAnnounce(snap, bucket_bytes, msg.initRoot<wire::WeightAnnounce>());
  kj::Array<capnp::word> words = capnp::messageToFlatArray(msg);
  auto announce = words.asBytes();
  Header h{kHeaderMagic, snap.version, total_bytes, snap.checksum, announce.size(), bucket_bytes};
  GROVE_ASSIGN_OR_RETURN(void* ctl, staging.Get(0, sizeof(Header) + announce.size(), group.device()));
  char* dev = static_cast<char*>(ctl);
  cudaStream_t stream = static_cast<cudaStream_t>(group.stream());
  // Pageable sources: the copies finish before the calls return.
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(dev, &h, sizeof(h), cudaMemcpyHostToDevice, stream), "header copy"));
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(dev + sizeof(h), announce.begin(), announce.size(),
                                               cudaMemcpyHostToDevice, stream), "announce copy"));
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "preamble copy"));
  GROVE_RETURN_IF_ERROR(group.Broadcast(dev, sizeof(h), 0, deadline, cancelled));
  return group.Broadcast(dev + sizeof(h), announce.size(), 0, deadline, cancelled);
}

Status CheckSendArgs(const NcclGroup& group, size_t bucket_bytes) {
  if (group.rank() != 0) return Status::FailedPrecondition("only rank 0 sends weights");
  if (bucket_bytes < 4096) return Status::InvalidArgument("weight bucket must be at least 4096 bytes");
  return Status::OK();
}

}  // namespace

Result<void*> NcclStaging::Get(int slot, size_t bytes, int device) {
  if (slot < 0 || slot >= kSlots) return Status::InvalidArgument("no staging slot " + std::to_string(slot));
  if (device_ >= 0 && device != device_)
    return Status::InvalidArgument("staging lives on device " + std::to_string(device_));
  device_ = device;
  return slots_[slot].Reserve(bytes, device, "weight staging");
}

Status SendWeights(NcclGroup& group, const WeightSnapshot& snap, NcclStaging& staging,
                   size_t bucket_bytes, NcclDeadline deadline, const NcclCancel& cancelled,
                   NcclSendTiming* timing) {
  GROVE_RETURN_IF_ERROR(CheckSendArgs(group, bucket_bytes));
  const size_t bytes = snap.flat.size() * sizeof(float);
  if (bytes == 0) return Status::InvalidArgument("no weights to send");
  auto t0 = NcclClock::now();
  GROVE_ASSIGN_OR_RETURN(void* payload, staging.Get(1, bytes, group.device()));
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaMemcpy(payload, snap.flat.data(), bytes, cudaMemcpyHostToDevice),
                               "weights to device"));
  if (timing != nullptr) timing->stage_ms = MsSince(t0);
  auto t1 = NcclClock::now();
  GROVE_RETURN_IF_ERROR(SendPreamble(group, snap, bytes, bucket_bytes, staging, deadline, cancelled));
  GROVE_RETURN_IF_ERROR(group.Broadcast(payload, bytes, bucket_bytes, deadline, cancelled));
  if (timing != nullptr) timing->broadcast_ms = MsSince(t1);
  return Status::OK();
}

Status SendDeviceWeights(NcclGroup& group, const WeightSnapshot& snap, const void* device_flat,
                         size_t bytes, NcclStaging& staging, size_t bucket_bytes,
                         NcclDeadline deadline, const NcclCancel& cancelled) {
  GROVE_RETURN_IF_ERROR(CheckSendArgs(group, bucket_bytes));
  if (bytes == 0 || bytes % sizeof(float) != 0 || device_flat == nullptr) {
    return Status::InvalidArgument("device weights must be a non-empty multiple of 4 bytes");
  }
  GROVE_RETURN_IF_ERROR(SendPreamble(group, snap, bytes, bucket_bytes, staging, deadline, cancelled));
  // NCCL's root reads its buffer only; the cast does not write through it.
  return group.Broadcast(const_cast<void*>(device_flat), bytes, bucket_bytes, deadline, cancelled);
}

Result<WeightSnapshot> ReceiveWeights(NcclGroup& group, NcclStaging& staging,
                                      const NcclReceiveOptions& options,
                                      NcclDeadline header_deadline, const NcclCancel& cancelled,
                                      NcclReceiveTiming* timing, const float** device_flat) {
  if (group.rank() == 0) return Status::FailedPrecondition("rank 0 sends weights, it does not receive");
  const bool on_device = options.device_slot != 0;
  if (on_device && (options.device_slot < 1 || options.device_slot > 2 || device_flat == nullptr))
    return Status::InvalidArgument("a device receive needs payload slot 1 or 2 and somewhere to put its address");
  // A receiver that gives up after the header leaves the sender's next
  // broadcasts unmatched: abort, so the epoch is re-formed.
  auto refuse = [&](Status s) {
    group.Abort();
    return s;
  };
  cudaStream_t stream = static_cast<cudaStream_t>(group.stream());
  GROVE_ASSIGN_OR_RETURN(void* ctl, staging.Get(0, 4096, group.device()));
  Header h;
  GROVE_RETURN_IF_ERROR(group.Broadcast(ctl, sizeof(h), 0, header_deadline, cancelled));
  auto t0 = NcclClock::now();
  const NcclDeadline deadline = NcclDeadlineIn(options.payload_timeout_ms);
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaMemcpy(&h, ctl, sizeof(h), cudaMemcpyDeviceToHost), "header copy"));
  if (h.magic != kHeaderMagic) return refuse(Status::Corruption("weight header: bad magic"));
  if (h.announce_bytes == 0 || h.announce_bytes > kMaxAnnounceBytes || h.announce_bytes % 8 != 0) {
    return refuse(Status::Corruption("weight header: announce of " + std::to_string(h.announce_bytes) + " bytes"));
  }
  if (h.bucket_bytes < 4096) return refuse(Status::Corruption("weight header: bucket too small"));
  if (h.total_bytes > options.max_bytes) {
    return refuse(Status::ResourceExhausted("weight header: " + std::to_string(h.total_bytes) +
                                            " bytes exceed the limit of " + std::to_string(options.max_bytes)));
  }
  if (options.after_header) options.after_header(h.version);

  // Every broadcast of the version first (their sizes come from the
  // header), so the sender is never kept waiting by this side's host work;
  // then the announce and the bytes are checked.
  GROVE_ASSIGN_OR_RETURN(ctl, staging.Get(0, h.announce_bytes, group.device()));
  GROVE_RETURN_IF_ERROR(group.Broadcast(ctl, h.announce_bytes, 0, deadline, cancelled));
  GROVE_ASSIGN_OR_RETURN(void* payload, staging.Get(on_device ? options.device_slot : 1, h.total_bytes, group.device()));
  GROVE_RETURN_IF_ERROR(group.Broadcast(payload, h.total_bytes, h.bucket_bytes, deadline, cancelled));
  if (timing != nullptr) timing->broadcast_ms = MsSince(t0);
  auto t1 = NcclClock::now();
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(h.announce_bytes / 8);
  GROVE_RETURN_IF_ERROR(CudaStatus(cudaMemcpy(words.begin(), ctl, h.announce_bytes, cudaMemcpyDeviceToHost),
                               "announce copy"));
  WeightAssembler assembler;
  Result<WeightSnapshot> layout = Status::Internal("announce not read");
  Status begun;
  try {
    capnp::ReaderOptions ro;
    ro.traversalLimitInWords = words.size() * 2;
    capnp::FlatArrayMessageReader reader(words.asPtr(), ro);
    auto announce = reader.getRoot<wire::WeightAnnounce>();
    if (announce.getVersion() != h.version || announce.getTotalBytes() != h.total_bytes ||
        announce.getChecksum() != h.checksum) {
      begun = Status::Corruption("weight announce disagrees with its header");
    } else if (on_device) {
      layout = ParseWeightAnnounce(announce, options.max_bytes);
      begun = layout.status();
    } else {
      begun = assembler.Begin(announce, options.max_bytes);
    }
  } catch (const kj::Exception& e) {
    begun = Status::Corruption("weight announce does not decode: " + std::string(e.getDescription().cStr()));
  }
  // All calls of this version matched: the group stays usable.
  if (!begun.ok()) return begun;
  if (on_device) {
    // The bytes stay where NCCL put them; their sum is taken there.
    GROVE_ASSIGN_OR_RETURN(void* scratch, staging.Get(3, sizeof(uint64_t), group.device()));
    GROVE_ASSIGN_OR_RETURN(uint64_t sum, kernels::WeightSumDevice(payload, h.total_bytes,
                                                                  static_cast<uint64_t*>(scratch), stream));
    if (timing != nullptr) timing->verify_ms = MsSince(t1);
    if (sum != h.checksum)
      return Status::Corruption("weights of version " + std::to_string(h.version) + " fail their checksum");
    *device_flat = static_cast<const float*>(payload);
    return layout;
  }
  GROVE_RETURN_IF_ERROR(assembler.FillAll([&](void* dst, uint64_t bytes) {
    return CudaStatus(cudaMemcpyAsync(dst, payload, bytes, cudaMemcpyDeviceToHost, stream) == cudaSuccess
                      ? cudaStreamSynchronize(stream)
                      : cudaGetLastError(),
                  "weights to host");
  }));
  if (timing != nullptr) timing->copy_ms = MsSince(t1);
  auto t2 = NcclClock::now();
  Result<WeightSnapshot> snap = assembler.Finish();
  if (timing != nullptr) timing->verify_ms = MsSince(t2);
  return snap;
}

}  // namespace grove::actors
