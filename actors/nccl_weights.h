// One policy version over an NcclGroup: rank 0 sends, every other rank
// receives, and the receiver checks what arrived exactly as the ZeroMQ path
// does (sizes against its limit, the WeightAnnounce's tensor layout, the
// checksum of every byte), so NCCL and ZeroMQ deliver the same
// WeightSnapshot. Three broadcasts per version:
//   1. a fixed 48-byte header: magic, version, total bytes, checksum, the
//      size of the announce, the bucket size;
//   2. the serialized WeightAnnounce (tensor names, shapes, offsets);
//   3. the flat weights, in buckets of the sender's bucket size.
// Header and announce are tiny; the receiver learns the payload's size and
// bucketing from the header, so both sides always issue matching calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "actors/device_buffer.h"
#include "actors/nccl_group.h"
#include "actors/weight_transfer.h"
#include "base/result.h"

namespace grove::actors {

// Device buffers reused from version to version (grown when a version is
// larger), on the group's device. One per sender or receiver thread.
class NcclStaging {
 public:
  static constexpr int kSlots = 4;
  // Device address of at least `bytes` bytes for `slot` (0: header and
  // announce; 1 and 2: payloads; 3: a checksum's scratch word), contents
  // undefined. Only the slots asked for are ever allocated; all on the
  // device of the first.
  Result<void*> Get(int slot, size_t bytes, int device);

 private:
  DeviceBuffer slots_[kSlots];
  int device_ = -1;
};

struct NcclSendTiming {
  double stage_ms = 0;      // host -> device copy of the flat buffer
  double broadcast_ms = 0;  // header + announce + payload broadcasts
};

// Rank 0: broadcasts `snap` (its flat host buffer is staged to the device
// first). All waits end by `deadline`.
Status SendWeights(NcclGroup& group, const WeightSnapshot& snap, NcclStaging& staging,
                   size_t bucket_bytes, NcclDeadline deadline, const NcclCancel& cancelled,
                   NcclSendTiming* timing = nullptr);
// Rank 0 with weights already on the device: `device_flat` holds
// snap.flat's bytes (snap.flat itself may be empty; snap.tensors, version
// and checksum describe them, and `bytes` is their size).
Status SendDeviceWeights(NcclGroup& group, const WeightSnapshot& snap, const void* device_flat,
                         size_t bytes, NcclStaging& staging, size_t bucket_bytes,
                         NcclDeadline deadline, const NcclCancel& cancelled);

struct NcclReceiveOptions {
  uint64_t max_bytes = uint64_t{16} << 30;  // a larger announced version is refused
  int64_t payload_timeout_ms = 30000;       // from the header to the last byte
  // Called once the header of a version arrived, before its payload (a
  // fault-injection point for tests; empty in production).
  std::function<void(int64_t version)> after_header;
  // 0: the bytes go on to a host snapshot, verified there. 1 or 2: they
  // stay in that payload slot of the staging, verified on the device (the
  // WeightSum of kernels/weight_checksum.h, which the version's checksum
  // is); the snapshot's flat is left empty. A receiver that alternates the
  // two slots can hand one version to its consumer while it receives the
  // next.
  int device_slot = 0;
};

struct NcclReceiveTiming {
  double broadcast_ms = 0;  // from the header's arrival to the last bucket
  double copy_ms = 0;       // host buffer + device -> host (0 with a device slot)
  double verify_ms = 0;     // checksum (on the host, or the device)
};

// Ranks > 0: waits for the next version until `header_deadline` (or
// `cancelled`), then receives it. Errors: as NcclGroup::Broadcast, and
// Corruption / ResourceExhausted for a header or announce that does not
// hold up (the group is then aborted too: the sender's next calls would not
// match ours), Corruption for bytes that fail the checksum (the group stays
// usable). With options.device_slot, *device_flat (required then) is the
// slot's address, valid until that slot is received into again.
Result<WeightSnapshot> ReceiveWeights(NcclGroup& group, NcclStaging& staging,
                                      const NcclReceiveOptions& options,
                                      NcclDeadline header_deadline, const NcclCancel& cancelled,
                                      NcclReceiveTiming* timing = nullptr, const float** device_flat = nullptr);

}  // namespace grove::actors
