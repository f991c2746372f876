// Moving a policy's weights in large buckets: the learner cuts one flat
// buffer into WeightChunk messages after a WeightAnnounce that describes the
// tensors; a rollout worker reassembles and verifies them. The transport (one
// ZeroMQ request per chunk, or NCCL later) is the caller's; this header only
// knows the messages.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "actors/schema/data.capnp.h"
#include "base/result.h"

namespace grove::actors {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // in floats from the start of the flat buffer
  uint64_t count = 0;   // floats
};

// One published policy version: fp32 weights in one flat buffer. Immutable
// once published so that a serving thread can send it while the learner
// trains the next version.
struct WeightSnapshot {
  int64_t version = -1;
  std::vector<TensorSpec> tensors;
  std::vector<float> flat;
  uint64_t checksum = 0;  // WeightChecksum(flat)
};

// 64-bit checksum of the raw bytes (not cryptographic; catches torn or
// misordered transfers): kernels::WeightSumHost's value, computed by
// several threads for large buffers, so the GPU's WeightSumDevice gives the
// same for the same bytes on the device.
uint64_t WeightChecksum(const float* data, size_t count);

// Fills `out` with the version, layout, checksum and chunking of `snap`.
void FillWeightAnnounce(const WeightSnapshot& snap, uint64_t chunk_bytes,
                        wire::WeightAnnounce::Builder out);
// Fills `out` with bytes [offset, offset + len) of the flat buffer.
// Contract: offset + len <= flat size in bytes.
void FillWeightChunk(const WeightSnapshot& snap, uint64_t offset, uint64_t len,
                     wire::WeightChunk::Builder out);

// The version, checksum and tensor layout an announce describes, checked
// as Begin checks them (sizes against max_bytes, tensors inside the buffer,
// shapes matching sizes), without the flat buffer (left empty): for a
// transport that puts the bytes elsewhere (the worker's GPU).
Result<WeightSnapshot> ParseWeightAnnounce(wire::WeightAnnounce::Reader announce, uint64_t max_bytes);

// Reassembles one version. Every check that can fail on received bytes
// returns an error instead of trusting the sender.
class WeightAssembler {
 public:
  // Starts a version. Limits the announced size to `max_bytes`.
  Status Begin(wire::WeightAnnounce::Reader announce, uint64_t max_bytes);
  // Adds one chunk; chunks may come in any order; a repeated chunk is ignored.
  Status Add(wire::WeightChunk::Reader chunk);
  // For a transport that moves the whole buffer in one piece (NCCL): `fill`
  // writes all announced bytes straight into the snapshot's buffer (no
  // intermediate copy); Finish() still verifies the checksum.
  Status FillAll(const std::function<Status(void* dst, uint64_t bytes)>& fill);
  bool complete() const;
  int64_t version() const { return snap_ ? snap_->version : -1; }
  // The next byte offset still missing (for a pull-based receiver).
  uint64_t next_missing_offset() const;
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  // Verifies the checksum and hands over the snapshot.
  Result<WeightSnapshot> Finish();

 private:
  std::unique_ptr<WeightSnapshot> snap_;
  uint64_t total_bytes_ = 0;
  uint64_t chunk_bytes_ = 0;
  std::vector<bool> have_;  // per chunk
  uint64_t chunks_left_ = 0;
};

}  // namespace grove::actors
