#include "actors/cuda_ipc.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include <cuda_runtime_api.h>

#include "actors/cuda_status.h"
#include "kernels/weight_checksum.h"

namespace grove::actors {
namespace {

constexpr uint64_t kSlotMagic = 0x47525657'49504353ull;  // "GRVW" "IPCS"

// The slot's sequence lock and what it guards (cuda_ipc.h).
struct SlotHeader {
  uint64_t magic;
  uint64_t generation;  // odd: being written
  int64_t version;
  uint64_t bytes;
  uint64_t device_sum;  // kernels::WeightSum of the bytes as written
  uint64_t checksum;    // the announce's WeightChecksum of them (host-computed)
};
static_assert(sizeof(SlotHeader) <= kIpcSlotHeaderBytes);

Status CudaOk(cudaError_t e, const char* what) { return CudaStatus(e, what, StatusCode::kUnavailable); }

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

Status PutHeader(void* slot, const SlotHeader& h, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(slot, &h, sizeof(h), cudaMemcpyHostToDevice, stream), "slot header write"));
  return CudaOk(cudaStreamSynchronize(stream), "slot header write");
}

Result<SlotHeader> GetHeader(const void* slot, cudaStream_t stream) {
  SlotHeader h;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(&h, slot, sizeof(h), cudaMemcpyDeviceToHost, stream), "slot header read"));
  GROVE_RETURN_IF_ERROR(CudaOk(cudaStreamSynchronize(stream), "slot header read"));
  if (h.magic != kSlotMagic) return Status::Corruption("CUDA IPC buffer is not a weight slot (bad magic)");
  return h;
}

// Half of `bytes`, rounded down to whole 8-byte words.
size_t Half(size_t bytes) { return (bytes / 2) & ~size_t{7}; }

}  // namespace

Result<std::string> ExportCudaIpcHandle(const void* device_ptr, int device) {
  if (device_ptr == nullptr) return Status::InvalidArgument("IPC export of a null buffer");
  GROVE_RETURN_IF_ERROR(CudaOk(cudaSetDevice(device), "cudaSetDevice"));
  cudaIpcMemHandle_t h;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaIpcGetMemHandle(&h, const_cast<void*>(device_ptr)), "cudaIpcGetMemHandle"));
  return std::string(h.reserved, sizeof(h.reserved));
}

Status WriteIpcWeightSlot(void* slot, const void* src, bool src_on_device, size_t bytes, int64_t version,
                          uint64_t checksum, uint64_t* scratch, void* stream_ptr) {
  if (slot == nullptr || src == nullptr || scratch == nullptr) return Status::InvalidArgument("IPC slot write: null argument");
  if (bytes == 0 || bytes % sizeof(float) != 0)
    return Status::InvalidArgument("IPC slot write: weights must be a non-empty multiple of 4 bytes");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  // The generation goes on from the slot's own header; a slot whose last
  // write died mid-way (odd) continues from the next even number.
  uint64_t generation = 0;
  Result<SlotHeader> old = GetHeader(slot, stream);
  if (old.ok()) generation = old->generation + (old->generation % 2);
  else if (old.status().code() != StatusCode::kCorruption) return old.status();  // CUDA trouble; bad magic: fresh
  const cudaMemcpyKind kind = src_on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice;
  char* data = static_cast<char*>(slot) + kIpcSlotHeaderBytes;
  // Odd first: from here on a reader that meets the slot knows it changes.
  GROVE_RETURN_IF_ERROR(PutHeader(slot, SlotHeader{kSlotMagic, generation + 1, -1, 0, 0, 0}, stream));
  GROVE_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(data, src, bytes, kind, stream), "slot write"));
  GROVE_ASSIGN_OR_RETURN(uint64_t sum, kernels::WeightSumDevice(data, bytes, scratch, stream));
  return PutHeader(slot, SlotHeader{kSlotMagic, generation + 2, version, bytes, sum, checksum}, stream);
}

Status FillIpcWeightAnnounce(const WeightSnapshot& snap, const void* slot, size_t bytes, int device,
                             wire::WeightAnnounce::Builder out) {
  if (bytes == 0 || bytes % sizeof(float) != 0) {
    return Status::InvalidArgument("IPC weights must be a non-empty multiple of 4 bytes");
  }
  GROVE_ASSIGN_OR_RETURN(std::string handle, ExportCudaIpcHandle(slot, device));
  // The layout comes from FillWeightAnnounce; the size is the slot's.
  FillWeightAnnounce(snap, bytes, out);
  out.setTotalBytes(bytes);
  out.setIpcHandle(kj::arrayPtr(reinterpret_cast<const kj::byte*>(handle.data()), handle.size()));
  out.setIpcDevice(device);
  return Status::OK();
}

IpcDeviceStaging::~IpcDeviceStaging() {
  if (stream_ == nullptr) return;
  cudaSetDevice(scratch_.device());
  cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

Result<float*> IpcDeviceStaging::Reserve(size_t bytes, int device) {
  GROVE_ASSIGN_OR_RETURN(void* scratch, scratch_.Reserve(sizeof(uint64_t), device, "IPC staging"));
  (void)scratch;
  if (stream_ == nullptr) {
    cudaStream_t s;
    GROVE_RETURN_IF_ERROR(CudaOk(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
    stream_ = s;
  }
  GROVE_ASSIGN_OR_RETURN(void* data, data_.Reserve(bytes, device, "IPC weights"));
  return static_cast<float*>(data);
}

Result<WeightSnapshot> ReadIpcWeightSlot(wire::WeightAnnounce::Reader announce, uint64_t max_bytes,
                                         IpcDeviceStaging& staging, const float** device_flat,
                                         const IpcReadOptions& options, IpcReadStats* stats) {
  if (!announce.hasIpcHandle() || announce.getIpcHandle().size() == 0)
    return Status::InvalidArgument("weight announce carries no IPC handle");
  if (device_flat == nullptr) return Status::InvalidArgument("ReadIpcWeightSlot: no place for the result");
  GROVE_ASSIGN_OR_RETURN(WeightSnapshot snap, ParseWeightAnnounce(announce, max_bytes));
  const size_t bytes = announce.getTotalBytes();
  cudaIpcMemHandle_t h;
  auto raw = announce.getIpcHandle();
  if (raw.size() != sizeof(h.reserved)) {
    return Status::InvalidArgument("CUDA IPC handle has " + std::to_string(raw.size()) + " bytes, expected " +
                                   std::to_string(sizeof(h.reserved)));
  }
  std::memcpy(h.reserved, raw.begin(), sizeof(h.reserved));
  const int device = options.device >= 0 ? options.device : announce.getIpcDevice();
  GROVE_ASSIGN_OR_RETURN(float* dst, staging.Reserve(bytes, device));
  cudaStream_t stream = static_cast<cudaStream_t>(staging.stream());
  void* slot = nullptr;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaIpcOpenMemHandle(&slot, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle"));
  auto read = [&]() -> Result<WeightSnapshot> {
    const char* data = static_cast<const char*>(slot) + kIpcSlotHeaderBytes;
    const int attempts = std::max(1, options.attempts);
    for (int attempt = 0; attempt < attempts; ++attempt) {
      auto t0 = std::chrono::steady_clock::now();
      GROVE_ASSIGN_OR_RETURN(SlotHeader before, GetHeader(slot, stream));
      if (before.generation % 2 != 0) {  // the writer is at it: it takes a moment
        if (stats) ++stats->torn;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      if (before.version != snap.version || before.bytes != bytes) {
        return Status::Aborted("the IPC slot holds version " + std::to_string(before.version) + " now, not " +
                               std::to_string(snap.version) + ": fetch the newest announce");
      }
      if (before.checksum != snap.checksum)
        return Status::Corruption("the IPC slot's checksum disagrees with the announce's");
      if (stats) stats->verify_ms += MsSince(t0);
      auto t1 = std::chrono::steady_clock::now();
      const size_t half = Half(bytes);
      GROVE_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(dst, data, half, cudaMemcpyDeviceToDevice, stream), "IPC copy"));
      if (options.mid_copy) {
        GROVE_RETURN_IF_ERROR(CudaOk(cudaStreamSynchronize(stream), "IPC copy"));
        options.mid_copy(attempt, slot);
      }
      GROVE_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(reinterpret_cast<char*>(dst) + half, data + half, bytes - half,
                                                   cudaMemcpyDeviceToDevice, stream), "IPC copy"));
      GROVE_RETURN_IF_ERROR(CudaOk(cudaStreamSynchronize(stream), "IPC copy"));
      if (stats) stats->copy_ms += MsSince(t1);
      auto t2 = std::chrono::steady_clock::now();
      // Stream order: this header read comes after the copy finished.
      GROVE_ASSIGN_OR_RETURN(SlotHeader after, GetHeader(slot, stream));
      if (after.generation != before.generation) {  // rewritten while we copied: torn
        if (stats) {
          ++stats->torn;
          stats->verify_ms += MsSince(t2);
        }
        continue;
      }
      GROVE_ASSIGN_OR_RETURN(uint64_t sum, kernels::WeightSumDevice(dst, bytes, staging.scratch(), stream));
      if (stats) stats->verify_ms += MsSince(t2);
      if (sum != before.device_sum)
        return Status::Corruption("weights of version " + std::to_string(snap.version) +
                                  " fail their device checksum after the IPC copy");
      *device_flat = dst;
      return snap;
    }
    return Status::Aborted("the IPC slot of version " + std::to_string(snap.version) + " was rewritten during " +
                           std::to_string(attempts) + " copies: fetch the newest announce");
  };
  Result<WeightSnapshot> out = read();
  Status closed = CudaOk(cudaIpcCloseMemHandle(slot), "cudaIpcCloseMemHandle");
  if (!out.ok()) return out.status();
  GROVE_RETURN_IF_ERROR(closed);
  return out;
}

Result<WeightSnapshot> ReceiveIpcWeights(wire::WeightAnnounce::Reader announce, uint64_t max_bytes,
                                         const IpcReadOptions& options, IpcReadStats* stats) {
  IpcDeviceStaging staging;
  const float* on_device = nullptr;
  GROVE_ASSIGN_OR_RETURN(WeightSnapshot snap, ReadIpcWeightSlot(announce, max_bytes, staging, &on_device, options, stats));
  snap.flat.resize(announce.getTotalBytes() / sizeof(float));
  GROVE_RETURN_IF_ERROR(CudaOk(cudaMemcpy(snap.flat.data(), on_device, snap.flat.size() * sizeof(float),
                                          cudaMemcpyDeviceToHost), "IPC weights to the host"));
  if (WeightChecksum(snap.flat.data(), snap.flat.size()) != snap.checksum)
    return Status::Corruption("weights of version " + std::to_string(snap.version) + " fail their checksum");
  return snap;
}

Result<std::string> CudaDeviceUuid(int device) {
  cudaDeviceProp prop;
  GROVE_RETURN_IF_ERROR(CudaOk(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  return std::string(prop.uuid.bytes, sizeof(prop.uuid.bytes));
}

}  // namespace grove::actors
