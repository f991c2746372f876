// Codec: one Envelope <-> one frame (the bytes of one ZeroMQ message).
//
// A frame is the Cap'n Proto flat-array encoding of an Envelope (segment
// table + segments, unpacked). Decoding never trusts the sender: the frame is
// size-checked, copied into word-aligned storage, read with explicit
// traversal and nesting limits, and the Envelope's magic and body kind are
// checked before anyone sees it. Every rejected frame is counted by why it
// was rejected (FrameStats) and logged once per reason per process, so a
// peer spraying garbage cannot flood the log.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>

#include "actors/schema/envelope.capnp.h"
#include "base/result.h"

namespace grove::actors {

using BodyKind = wire::Envelope::Body::Which;

// The largest frame any grove socket accepts (also ZMQ_MAXMSGSIZE). Weight
// chunks are the largest messages; they are sent in buckets well below this.
inline constexpr size_t kMaxFrameBytes = size_t{256} << 20;  // 256 MiB

// Read limits for one frame. The traversal limit bounds the words a reader
// may visit (defeats amplification through shared pointers); the nesting
// limit bounds pointer depth (defeats stack exhaustion).
struct DecodeLimits {
  size_t max_frame_bytes = kMaxFrameBytes;
  uint64_t traversal_limit_words = kMaxFrameBytes / 8 * 2;
  int nesting_limit = 32;
};

// Why a frame was rejected.
enum class FrameError : int {
  kGarbage = 0,   // not a Cap'n Proto message, or magic is wrong
  kTruncated,     // the segment table promises more bytes than arrived
  kOversized,     // larger than the limit
  kWrongKind,     // a valid Envelope whose body this receiver does not take
  kUnknownKind,   // a body kind newer than this build knows
};
inline constexpr int kFrameErrorCount = 5;
std::string_view FrameErrorName(FrameError e);  // "garbage", "truncated", ...

// Per-socket (or per-process) rejected-frame counters; thread-safe.
class FrameStats {
 public:
  void Count(FrameError e, std::string_view detail);
  uint64_t Get(FrameError e) const { return counts_[static_cast<int>(e)].load(); }
  uint64_t Total() const;

 private:
  std::array<std::atomic<uint64_t>, kFrameErrorCount> counts_{};
};

// A decoded frame: owns its bytes and exposes the Envelope reader over them.
// Movable, not copyable; the reader is valid as long as this object lives.
class Frame {
 public:
  Frame(Frame&&) noexcept = default;
  Frame& operator=(Frame&&) noexcept = default;

  wire::Envelope::Reader envelope() const { return envelope_; }
  BodyKind kind() const { return envelope_.getBody().which(); }
  size_t size_bytes() const { return size_words_ * sizeof(capnp::word); }

 private:
  friend Result<Frame> DecodeFrame(std::shared_ptr<void>, const void*, size_t,
                                   std::initializer_list<BodyKind>, FrameStats*,
                                   const DecodeLimits&);
  Frame() = default;
  std::shared_ptr<void> owner_;       // keeps the received bytes alive (zero-copy case)
  kj::Array<capnp::word> words_;      // a word-aligned copy (when the bytes were unaligned)
  size_t size_words_ = 0;
  std::unique_ptr<capnp::FlatArrayMessageReader> reader_;
  wire::Envelope::Reader envelope_;
};

// Starts an Envelope in `message` with magic, sender, request id and the
// current wall-clock time; the caller then sets one body member.
wire::Envelope::Builder InitEnvelope(capnp::MessageBuilder& message, std::string_view sender,
                                     uint64_t request_id);

// Encodes a built Envelope to frame bytes (one copy of the message). For
// large payloads, build the Data field with
// message.getOrphanage().referenceExternalData(...) so the payload is copied
// only here, not also into the builder.
std::string EncodeFrame(capnp::MessageBuilder& message);

// Decodes `size` bytes. `expected` lists the body kinds this receiver takes
// (empty: any known kind). On rejection returns Corruption (garbage, wrong or
// unknown kind), DataLoss-like Corruption for truncation, or
// ResourceExhausted for oversized frames, and counts it in `stats` if given.
Result<Frame> DecodeFrame(const void* data, size_t size, std::initializer_list<BodyKind> expected,
                          FrameStats* stats, const DecodeLimits& limits = DecodeLimits());
// Zero-copy variant: `owner` keeps `data` alive and unchanged for the
// Frame's lifetime; word-aligned bytes are read in place (others are copied).
Result<Frame> DecodeFrame(std::shared_ptr<void> owner, const void* data, size_t size,
                          std::initializer_list<BodyKind> expected, FrameStats* stats,
                          const DecodeLimits& limits = DecodeLimits());

// The name of a body kind as written in the schema ("heartbeat"), or
// "unknown(<n>)".
std::string BodyKindName(BodyKind kind);

// Milliseconds since the Unix epoch, and on a monotonic clock.
int64_t WallClockMs();
int64_t MonotonicMs();

}  // namespace grove::actors
