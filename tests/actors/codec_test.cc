// Codec tests: every Envelope body kind round-trips with random contents;
// garbage, truncated, oversized, wrong-kind and unknown-kind frames are
// rejected with the right error and counted, never crash.
#include "actors/codec.h"

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>

#include <capnp/any.h>
#include <capnp/dynamic.h>
#include <capnp/schema.h>
#include <gtest/gtest.h>
#include <kj/string.h>

namespace grove::actors {
namespace {

// Fills every field of `s` with random values (lists of 0-3 elements,
// nested structs recursively), so a round trip compares real contents.
void FillRandom(capnp::DynamicStruct::Builder s, std::mt19937_64& rng, int depth);

void FillValue(capnp::DynamicStruct::Builder s, capnp::StructSchema::Field f,
               std::mt19937_64& rng, int depth) {
  using capnp::schema::Type;
  auto type = f.getType();
  switch (type.which()) {
    case Type::BOOL: s.set(f, static_cast<bool>(rng() & 1)); break;
    case Type::INT8: case Type::INT16: case Type::INT32: case Type::INT64:
      s.set(f, static_cast<int64_t>(rng() % 20000) - 10000); break;
    case Type::UINT8: case Type::UINT16: case Type::UINT32: case Type::UINT64:
      s.set(f, static_cast<uint64_t>(rng() % 200)); break;
    case Type::FLOAT32: case Type::FLOAT64:
      s.set(f, static_cast<double>(rng() % 1000) / 8.0); break;
    case Type::TEXT: s.set(f, capnp::Text::Reader(kj::str("t", rng() % 100000).cStr())); break;
    case Type::DATA: {
      std::string bytes(rng() % 64, '\0');
      for (auto& c : bytes) c = static_cast<char>(rng());
      s.set(f, capnp::Data::Reader(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
      break;
    }
    case Type::ENUM: {
      auto enumerants = type.asEnum().getEnumerants();
      s.set(f, capnp::DynamicEnum(enumerants[static_cast<unsigned>(rng() % enumerants.size())]));
      break;
    }
    case Type::STRUCT:
      if (depth < 4) FillRandom(s.init(f).as<capnp::DynamicStruct>(), rng, depth + 1);
      break;
    case Type::LIST: {
      const unsigned n = static_cast<unsigned>(rng() % 4);
      auto list = s.init(f, n).as<capnp::DynamicList>();
      auto elem = type.asList().getElementType();
      for (unsigned i = 0; i < n; ++i) {
        if (elem.isStruct()) {
          if (depth < 4) FillRandom(list[i].as<capnp::DynamicStruct>(), rng, depth + 1);
        } else if (elem.isText()) {
          list.set(i, capnp::Text::Reader(kj::str("e", i).cStr()));
        } else if (elem.isFloat32() || elem.isFloat64()) {
          list.set(i, static_cast<double>(rng() % 1000) / 4.0);
        } else if (elem.isInt8() || elem.isInt16() || elem.isInt32() || elem.isInt64()) {
          list.set(i, static_cast<int64_t>(rng() % 1000) - 500);
        } else if (elem.isUInt8() || elem.isUInt16() || elem.isUInt32() || elem.isUInt64()) {
          list.set(i, static_cast<uint64_t>(rng() % 250));
        }
      }
      break;
    }
    default: break;  // void
  }
}

void FillRandom(capnp::DynamicStruct::Builder s, std::mt19937_64& rng, int depth) {
  for (auto f : s.getSchema().getNonUnionFields()) FillValue(s, f, rng, depth);
}

std::string EnvelopeOfKind(uint16_t kind, std::mt19937_64& rng, std::string* text = nullptr) {
  capnp::MallocMessageBuilder msg;
  auto env = InitEnvelope(msg, "sender-1", rng());
  capnp::DynamicStruct::Builder body = capnp::toDynamic(env.getBody());
  auto field = body.getSchema().getFieldByDiscriminant(kind);
  KJ_IF_MAYBE(f, field) {
    if (f->getType().isStruct()) {
      FillRandom(body.init(*f).as<capnp::DynamicStruct>(), rng, 0);
    } else {
      body.set(*f, capnp::VOID);
    }
  }
  if (text != nullptr) *text = kj::str(env.asReader()).cStr();
  return EncodeFrame(msg);
}

TEST(Codec, EveryBodyKindRoundTrips) {
  std::mt19937_64 rng(std::random_device{}());
  auto union_fields = capnp::Schema::from<wire::Envelope::Body>().getUnionFields();
  ASSERT_EQ(union_fields.size(), static_cast<unsigned>(BodyKind::WEIGHT_GROUP_REPLY) + 1);
  for (auto field : union_fields) {
    const uint16_t kind = field.getProto().getDiscriminantValue();
    for (int trial = 0; trial < 5; ++trial) {
      std::string sent_text;
      std::string bytes = EnvelopeOfKind(kind, rng, &sent_text);
      FrameStats stats;
      auto frame = DecodeFrame(bytes.data(), bytes.size(), {static_cast<BodyKind>(kind)}, &stats);
      ASSERT_TRUE(frame.ok()) << BodyKindName(static_cast<BodyKind>(kind)) << ": " << frame.status();
      EXPECT_EQ(static_cast<uint16_t>(frame->kind()), kind);
      EXPECT_EQ(std::string(frame->envelope().getSender().cStr()), "sender-1");
      EXPECT_EQ(frame->envelope().getMagic(), wire::K_MAGIC);
      // Same contents, field by field (capnp's text rendering of every field).
      EXPECT_EQ(std::string(kj::str(frame->envelope()).cStr()), sent_text);
      EXPECT_EQ(stats.Total(), 0u);
    }
    EXPECT_EQ(BodyKindName(static_cast<BodyKind>(kind)), field.getProto().getName().cStr());
  }
}

TEST(Codec, RejectsGarbageAndCountsIt) {
  std::mt19937_64 rng(std::random_device{}());
  FrameStats stats;
  uint64_t rejected = 0;
  for (int i = 0; i < 2000; ++i) {
    std::string bytes(rng() % 512, '\0');
    for (auto& c : bytes) c = static_cast<char>(rng());
    auto frame = DecodeFrame(bytes.data(), bytes.size(), {}, &stats);
    if (!frame.ok()) {
      ++rejected;
      EXPECT_NE(frame.status().code(), StatusCode::kOk);
    }
  }
  // Random bytes almost never carry the magic at the right place.
  EXPECT_EQ(rejected, 2000u);
  EXPECT_EQ(stats.Total(), 2000u);
  EXPECT_GT(stats.Get(FrameError::kGarbage), 0u);
  EXPECT_EQ(stats.Get(FrameError::kWrongKind), 0u);
}

TEST(Codec, EveryTruncationIsRejected) {
  std::mt19937_64 rng(7);
  std::string bytes = EnvelopeOfKind(static_cast<uint16_t>(BodyKind::SAMPLE_GROUP), rng);
  FrameStats stats;
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto frame = DecodeFrame(bytes.data(), n, {}, &stats);
    ASSERT_FALSE(frame.ok()) << "prefix of " << n << " bytes accepted";
  }
  EXPECT_EQ(stats.Total(), bytes.size());
  EXPECT_GT(stats.Get(FrameError::kTruncated), bytes.size() / 2);
  // Extra bytes after a valid message are garbage too.
  std::string longer = bytes + std::string(8, '\0');
  EXPECT_FALSE(DecodeFrame(longer.data(), longer.size(), {}, &stats).ok());
}

TEST(Codec, OversizedWrongKindUnknownKindAndBadMagic) {
  std::mt19937_64 rng(11);
  FrameStats stats;
  std::string heartbeat = EnvelopeOfKind(static_cast<uint16_t>(BodyKind::HEARTBEAT), rng);

  auto big = DecodeFrame(heartbeat.data(), heartbeat.size(), {}, &stats,
                         DecodeLimits{.max_frame_bytes = heartbeat.size() - 8});
  EXPECT_EQ(big.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(stats.Get(FrameError::kOversized), 1u);

  auto wrong = DecodeFrame(heartbeat.data(), heartbeat.size(), {BodyKind::REGISTER}, &stats);
  EXPECT_EQ(wrong.status().code(), StatusCode::kCorruption);
  EXPECT_EQ(stats.Get(FrameError::kWrongKind), 1u);
  EXPECT_TRUE(DecodeFrame(heartbeat.data(), heartbeat.size(),
                          {BodyKind::REGISTER, BodyKind::HEARTBEAT}, &stats).ok());

  // A body kind from a newer peer: patch the union discriminant past the last.
  capnp::MallocMessageBuilder msg;
  InitEnvelope(msg, "future", 1).getBody().setNone();
  auto group = capnp::Schema::from<wire::Envelope::Body>().getProto().getStruct();
  auto data = msg.getRoot<capnp::AnyStruct>().getDataSection();
  const size_t offset = group.getDiscriminantOffset() * 2;
  ASSERT_LE(offset + 2, data.size());
  data[offset] = 200;
  data[offset + 1] = 0;
  std::string future = EncodeFrame(msg);
  auto unknown = DecodeFrame(future.data(), future.size(), {}, &stats);
  EXPECT_FALSE(unknown.ok());
  EXPECT_EQ(stats.Get(FrameError::kUnknownKind), 1u);

  // Another Cap'n Proto type, or a wrong magic, is garbage.
  capnp::MallocMessageBuilder other;
  other.initRoot<wire::Prompt>().setText("hello");
  std::string prompt = EncodeFrame(other);
  const uint64_t garbage_before = stats.Get(FrameError::kGarbage);
  EXPECT_FALSE(DecodeFrame(prompt.data(), prompt.size(), {}, &stats).ok());
  capnp::MallocMessageBuilder magic;
  InitEnvelope(magic, "x", 1).setMagic(0xdeadbeef);
  std::string bad_magic = EncodeFrame(magic);
  EXPECT_FALSE(DecodeFrame(bad_magic.data(), bad_magic.size(), {}, &stats).ok());
  EXPECT_EQ(stats.Get(FrameError::kGarbage), garbage_before + 2);
}

TEST(Codec, CorruptPointersInsideTheBodyAreCaughtAtDecode) {
  // Flip bytes inside a valid frame: whatever decodes must be fully readable
  // (the decoder validated every pointer and text); the rest is rejected.
  std::mt19937_64 rng(std::random_device{}());
  std::string base = EnvelopeOfKind(static_cast<uint16_t>(BodyKind::SCORED_GROUP), rng);
  FrameStats stats;
  for (int i = 0; i < 3000; ++i) {
    std::string bytes = base;
    for (int k = 0; k < 3; ++k) bytes[8 + rng() % (bytes.size() - 8)] = static_cast<char>(rng());
    auto frame = DecodeFrame(bytes.data(), bytes.size(), {}, &stats);
    if (frame.ok()) {
      EXPECT_NO_THROW((void)kj::str(frame->envelope()));
    }
  }
}

// Found by fuzzing (tests/fuzz/regressions/frame): validation and the
// role's reads shared one traversal budget, so a frame whose shared pointers
// made validation cost several times its size was accepted, and the role's
// first full read threw (an uncaught kj::Exception in a handler). A frame
// that decodes now reads whole, twice over.
TEST(Codec, AcceptedFrameReadsWholeAfterValidation) {
  const char* root = std::getenv("GROVE_SOURCE_DIR");
  ASSERT_NE(root, nullptr);
  std::ifstream in(std::string(root) + "/tests/fuzz/regressions/frame/regress-traversal-budget-spent-by-validation",
                   std::ios::binary);
  ASSERT_TRUE(in.good());
  std::string input((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(input.size(), 9u);
  FrameStats stats;
  auto frame = DecodeFrame(input.data() + 1, input.size() - 1, {}, &stats);  // byte 0 is the target's mode
  if (frame.ok()) {
    EXPECT_NO_THROW((void)kj::str(frame->envelope()));
    EXPECT_NO_THROW((void)kj::str(frame->envelope()));
  } else {
    EXPECT_EQ(stats.Get(FrameError::kGarbage), 1u) << frame.status();
  }
}

}  // namespace
}  // namespace grove::actors
