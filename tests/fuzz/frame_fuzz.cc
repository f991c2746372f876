// Fuzz target: actors::DecodeFrame, the one decoder every socket runs on
// bytes from the network, for every Envelope body kind.
//
// Input: byte 0 chooses what the receiver expects and how the bytes arrive;
// the rest is the frame.
//   bits 0-5: 0..kLastKind -> expect exactly that body kind; above -> any kind
//   bit 6:    zero-copy path (an aligned buffer owned by a shared_ptr)
// A frame that decodes is then read completely through Cap'n Proto's
// reflection -- every field of the active union member, every list element,
// every Text and Data byte -- as a role's handler might, which must not fault
// either: DecodeFrame promises that a Frame it returns is safe to read.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>

#include <capnp/dynamic.h>
#include <capnp/schema.h>

#include "actors/codec.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using grove::actors::BodyKind;

constexpr int kLastKind = static_cast<int>(BodyKind::WEIGHT_GROUP_REPLY);

// Touches every value reachable from `value`; returns a digest so the reads
// cannot be optimized away.
uint64_t ReadAll(const capnp::DynamicValue::Reader& value, int depth) {
  if (depth > 80) return 0;  // DecodeFrame's nesting limit is far below this
  switch (value.getType()) {
    case capnp::DynamicValue::VOID:
      return 1;
    case capnp::DynamicValue::BOOL:
      return value.as<bool>() ? 3 : 2;
    case capnp::DynamicValue::INT:
      return static_cast<uint64_t>(value.as<int64_t>());
    case capnp::DynamicValue::UINT:
      return value.as<uint64_t>();
    case capnp::DynamicValue::FLOAT: {
      double d = value.as<double>();
      uint64_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      return bits;
    }
    case capnp::DynamicValue::TEXT: {
      capnp::Text::Reader t = value.as<capnp::Text>();
      return grove::fuzz::Digest(t.begin(), t.size());
    }
    case capnp::DynamicValue::DATA: {
      capnp::Data::Reader d = value.as<capnp::Data>();
      return grove::fuzz::Digest(d.begin(), d.size());
    }
    case capnp::DynamicValue::ENUM: {
      auto e = value.as<capnp::DynamicEnum>();
      return e.getRaw() + (e.getEnumerant() == nullptr ? 7 : 0);
    }
    case capnp::DynamicValue::LIST: {
      uint64_t h = 0;
      for (auto item : value.as<capnp::DynamicList>()) h = h * 31 + ReadAll(item, depth + 1);
      return h;
    }
    case capnp::DynamicValue::STRUCT: {
      auto s = value.as<capnp::DynamicStruct>();
      uint64_t h = 0;
      // Non-union fields, then the active union member (reading an inactive
      // one is a programming error in Cap'n Proto, not a decoding one).
      for (auto field : s.getSchema().getNonUnionFields()) h = h * 31 + ReadAll(s.get(field), depth + 1);
      KJ_IF_MAYBE(active, s.which()) { h = h * 31 + ReadAll(s.get(*active), depth + 1); }
      return h;
    }
    default:
      return 0;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  const uint8_t* frame = data + 1;
  const size_t frame_size = size - 1;
  const int kind = mode & 0x3f;
  const bool zero_copy = (mode & 0x40) != 0;

  grove::actors::FrameStats stats;
  grove::actors::DecodeLimits limits;
  limits.max_frame_bytes = 1 << 20;  // keeps each run fast; the logic is size-independent
  auto decode_as = [&](std::initializer_list<BodyKind> expected) {
    if (!zero_copy) return grove::actors::DecodeFrame(frame, frame_size, expected, &stats, limits);
    // Word-aligned storage owned by the frame, as the socket layer hands it.
    std::shared_ptr<capnp::word[]> owned(new capnp::word[frame_size / sizeof(capnp::word) + 1]);
    std::memcpy(owned.get(), frame, frame_size);
    return grove::actors::DecodeFrame(std::shared_ptr<void>(owned, owned.get()), owned.get(), frame_size,
                                      expected, &stats, limits);
  };
  auto decode = [&]() {
    return kind <= kLastKind ? decode_as({static_cast<BodyKind>(kind)}) : decode_as({});
  };
  auto decoded = decode();
  if (!decoded.ok()) {
    GROVE_FUZZ_CHECK(stats.Total() == 1);  // every rejection is counted exactly once
    return 0;
  }
  GROVE_FUZZ_CHECK(stats.Total() == 0);
  const grove::actors::Frame& f = decoded.value();
  GROVE_FUZZ_CHECK(kind > kLastKind || f.kind() == static_cast<BodyKind>(kind));
  GROVE_FUZZ_CHECK(f.envelope().getMagic() == grove::wire::K_MAGIC);
  GROVE_FUZZ_CHECK(!grove::actors::BodyKindName(f.kind()).empty());
  try {
    grove::fuzz::Sink(ReadAll(capnp::DynamicStruct::Reader(f.envelope()), 0));
  } catch (const kj::Exception& e) {
    // A frame DecodeFrame accepted must read without throwing.
    grove::fuzz::Fail(__FILE__, __LINE__, e.getDescription().cStr());
  }
  return 0;
}
