// Weights between two processes on the same GPU, where NCCL cannot be used
// (one rank per GPU per communicator): the learner exports a device buffer,
// an "IPC slot", as a CUDA IPC handle inside a WeightAnnounce sent over
// ZeroMQ; the rollout worker opens the handle and copies the bytes out,
// device to device, never through the host.
//
// A slot is one cudaMalloc'ed allocation: a header of kIpcSlotHeaderBytes,
// then the weights. The writer reuses its slots, so a reader can meet a
// slot while it is rewritten; the header is a sequence lock:
//   writer (WriteIpcWeightSlot), all on one stream, in order: the header
//     with an odd generation (writing), the bytes, their WeightSum
//     (kernels/weight_checksum.h) computed on the device, then the header
//     with the next, even generation, the version, the size and that sum;
//   reader (ReadIpcWeightSlot): the header (an even generation holding the
//     announced version and size, else Aborted: the slot moved on, ask the
//     publisher again), the bytes into its own device buffer, then the
//     header again: a generation that changed means the slot was rewritten
//     while it copied (a torn read): it copies again while the slot still
//     holds the announced version, up to `attempts` times, else Aborted.
//     Then the WeightSum of its copy, computed on its device, must equal the
//     header's (Corruption otherwise): every byte it installs is the byte
//     the writer summed.
// The writer sums the bytes it wrote to the slot; that they are the
// announced version's bytes (the announce's checksum, the same WeightSum
// computed on the host snapshot) is the writer's own contract: it copies
// them from that snapshot or from the device buffer the snapshot was
// downloaded from. ReceiveIpcWeights (the host copy, for a CPU engine)
// checks the announce's checksum on the host too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "actors/device_buffer.h"
#include "actors/schema/data.capnp.h"
#include "actors/weight_transfer.h"
#include "base/result.h"

namespace grove::actors {

inline constexpr size_t kIpcSlotHeaderBytes = 256;

// The IPC handle bytes of a cudaMalloc'ed allocation on `device`.
Result<std::string> ExportCudaIpcHandle(const void* device_ptr, int device);

// Writes one version into the slot at `slot` (device memory on the current
// device, at least kIpcSlotHeaderBytes + bytes) from `src` (device memory
// when src_on_device, else host), as the sequence lock above says, on
// `stream` (a cudaStream_t); returns when all of it is done. The slot's
// generation is read from its header (fresh memory starts at 0); one
// writer per slot at a time. `scratch`: one device uint64. `checksum`: the
// announce's (WeightChecksum of the bytes), kept in the header.
Status WriteIpcWeightSlot(void* slot, const void* src, bool src_on_device, size_t bytes, int64_t version,
                          uint64_t checksum, uint64_t* scratch, void* stream);

// The learner: the announce of `snap` (layout, checksum, version) whose
// bytes lie in the slot `slot` on `device` (snap.flat may be empty; `bytes`
// is their size).
Status FillIpcWeightAnnounce(const WeightSnapshot& snap, const void* slot, size_t bytes, int device,
                             wire::WeightAnnounce::Builder out);

// The reader's device memory, reused from version to version (grown when a
// version is larger): the copy of the weights, a scratch word, a stream.
// One per reader thread; its device is fixed by the first read.
class IpcDeviceStaging {
 public:
  IpcDeviceStaging() = default;
  ~IpcDeviceStaging();
  IpcDeviceStaging(const IpcDeviceStaging&) = delete;
  IpcDeviceStaging& operator=(const IpcDeviceStaging&) = delete;
  // At least `bytes` of device memory on `device` (contents undefined).
  Result<float*> Reserve(size_t bytes, int device);
  uint64_t* scratch() const { return static_cast<uint64_t*>(scratch_.data()); }
  void* stream() const { return stream_; }
  int device() const { return scratch_.device(); }

 private:
  DeviceBuffer data_, scratch_;
  void* stream_ = nullptr;  // cudaStream_t
};

struct IpcReadOptions {
  int device = -1;    // where to open the handle; -1: the announce's ipcDevice
  int attempts = 3;   // torn reads copied again while the slot keeps the version
  // Test hook: called between the first and second half of each copy with
  // the attempt (0-based) and the mapped slot (to rewrite it mid-read).
  std::function<void(int attempt, void* slot)> mid_copy;
};

struct IpcReadStats {
  int torn = 0;            // copies that met a rewrite and were redone
  double copy_ms = 0;      // the device-to-device copy(ies)
  double verify_ms = 0;    // headers and the device WeightSum
};

// The worker: the version an IPC announce names, copied into staging on
// this process's device and verified (header comment). The result's flat is
// empty; its bytes are at *device_flat (staging's buffer, valid until the
// next read with the same staging). Errors: InvalidArgument (no handle),
// Corruption / ResourceExhausted (announce or bytes that do not hold up),
// Aborted (the slot moved on to another version, or kept being rewritten:
// fetch the newest announce again), Unavailable (CUDA).
Result<WeightSnapshot> ReadIpcWeightSlot(wire::WeightAnnounce::Reader announce, uint64_t max_bytes,
                                         IpcDeviceStaging& staging, const float** device_flat,
                                         const IpcReadOptions& options = {}, IpcReadStats* stats = nullptr);

// The same into a host snapshot (for an engine on the CPU, and tests):
// ReadIpcWeightSlot, then a copy to the host and the announce's checksum.
Result<WeightSnapshot> ReceiveIpcWeights(wire::WeightAnnounce::Reader announce, uint64_t max_bytes,
                                         const IpcReadOptions& options = {}, IpcReadStats* stats = nullptr);

// The 16 bytes of `device`'s UUID (the same GPU has the same UUID in every
// process, whatever CUDA_VISIBLE_DEVICES numbers it).
Result<std::string> CudaDeviceUuid(int device);

}  // namespace grove::actors
