#include "actors/codec.h"

#include <chrono>
#include <cstring>

#include <capnp/dynamic.h>
#include <capnp/schema.h>
#include <glog/logging.h>
#include <kj/exception.h>

namespace grove::actors {
namespace {

constexpr uint16_t kLastKnownKind = static_cast<uint16_t>(BodyKind::WEIGHT_GROUP_REPLY);

// Walks every struct, list of structs and Text reachable from `value`, so a
// malformed pointer or an unterminated Text throws here, inside the decoder,
// rather than later in a role's handler.
void Validate(const capnp::DynamicValue::Reader& value, int depth) {
  if (depth > 64) KJ_FAIL_REQUIRE("message nests too deep");
  switch (value.getType()) {
    case capnp::DynamicValue::TEXT:
      value.as<capnp::Text>();  // checks the NUL terminator
      break;
    case capnp::DynamicValue::DATA:
      value.as<capnp::Data>();
      break;
    case capnp::DynamicValue::STRUCT: {
      auto s = value.as<capnp::DynamicStruct>();
      for (auto field : s.getSchema().getFields()) {
        if (!s.has(field)) continue;
        auto t = field.getType();
        if (t.isStruct() || t.isText() || t.isData() || t.isList()) Validate(s.get(field), depth + 1);
      }
      break;
    }
    case capnp::DynamicValue::LIST: {
      auto l = value.as<capnp::DynamicList>();
      auto elem = l.getSchema().getElementType();
      if (elem.isStruct() || elem.isText() || elem.isData() || elem.isList()) {
        for (auto item : l) Validate(item, depth + 1);
      }
      break;
    }
    default:
      break;
  }
}

std::atomic<bool> g_logged[kFrameErrorCount];

}  // namespace

std::string_view FrameErrorName(FrameError e) {
  switch (e) {
    case FrameError::kGarbage: return "garbage";
    case FrameError::kTruncated: return "truncated";
    case FrameError::kOversized: return "oversized";
    case FrameError::kWrongKind: return "wrong_kind";
    case FrameError::kUnknownKind: return "unknown_kind";
  }
  return "?";
}

void FrameStats::Count(FrameError e, std::string_view detail) {
  counts_[static_cast<int>(e)].fetch_add(1);
  if (!g_logged[static_cast<int>(e)].exchange(true)) {
    LOG(WARNING) << "dropped a " << FrameErrorName(e) << " frame: " << detail
                 << " (further " << FrameErrorName(e) << " frames are counted, not logged)";
  }
}

uint64_t FrameStats::Total() const {
  uint64_t total = 0;
  for (const auto& c : counts_) total += c.load();
  return total;
}

int64_t WallClockMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t MonotonicMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

wire::Envelope::Builder InitEnvelope(capnp::MessageBuilder& message, std::string_view sender,
                                     uint64_t request_id) {
  auto env = message.initRoot<wire::Envelope>();
  env.setMagic(wire::K_MAGIC);
  env.setSender(capnp::Text::Reader(sender.data(), sender.size()));
  env.setRequestId(request_id);
  env.setSentAtMs(WallClockMs());
  return env;
}

std::string EncodeFrame(capnp::MessageBuilder& message) {
  // Serialize straight into the string: one copy of the segments, no more.
  const size_t bytes = capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word);
  std::string out(bytes, '\0');
  kj::ArrayOutputStream stream(
      kj::arrayPtr(reinterpret_cast<kj::byte*>(out.data()), out.size()));
  capnp::writeMessage(stream, message);
  return out;
}

std::string BodyKindName(BodyKind kind) {
  auto schema = capnp::Schema::from<wire::Envelope::Body>();
  KJ_IF_MAYBE(field, schema.getFieldByDiscriminant(static_cast<uint16_t>(kind))) {
    auto name = field->getProto().getName();
    return std::string(name.cStr(), name.size());
  }
  return "unknown(" + std::to_string(static_cast<uint16_t>(kind)) + ")";
}

Result<Frame> DecodeFrame(const void* data, size_t size, std::initializer_list<BodyKind> expected,
                          FrameStats* stats, const DecodeLimits& limits) {
  return DecodeFrame(nullptr, data, size, expected, stats, limits);
}

Result<Frame> DecodeFrame(std::shared_ptr<void> owner, const void* data, size_t size,
                          std::initializer_list<BodyKind> expected, FrameStats* stats,
                          const DecodeLimits& limits) {
  auto reject = [&](FrameError e, Status status) -> Result<Frame> {
    if (stats != nullptr) stats->Count(e, status.message());
    return status;
  };
  if (size > limits.max_frame_bytes) {
    return reject(FrameError::kOversized,
                  Status::ResourceExhausted("frame of " + std::to_string(size) + " bytes exceeds " +
                                            std::to_string(limits.max_frame_bytes)));
  }
  if (size < sizeof(capnp::word)) {
    return reject(FrameError::kGarbage,
                  Status::Corruption("frame of " + std::to_string(size) + " bytes is too short"));
  }
  Frame frame;
  const size_t words = size / sizeof(capnp::word);
  kj::ArrayPtr<const capnp::word> view;
  if (owner != nullptr && reinterpret_cast<uintptr_t>(data) % alignof(capnp::word) == 0) {
    frame.owner_ = std::move(owner);
    view = kj::arrayPtr(static_cast<const capnp::word*>(data), words);
  } else {
    frame.words_ = kj::heapArray<capnp::word>(words);
    std::memcpy(frame.words_.begin(), data, words * sizeof(capnp::word));
    view = frame.words_.asPtr();
  }
  frame.size_words_ = words;

  // The segment table says how long the message is; compare with what arrived.
  size_t promised = 0;
  try {
    promised = capnp::expectedSizeInWordsFromPrefix(view);
  } catch (const kj::Exception& e) {
    return reject(FrameError::kGarbage, Status::Corruption("bad segment table"));
  }
  if (promised > limits.max_frame_bytes / sizeof(capnp::word)) {
    return reject(FrameError::kGarbage,
                  Status::Corruption("segment table promises an absurd size"));
  }
  if (promised > words) {
    return reject(FrameError::kTruncated,
                  Status::Corruption("frame truncated: " + std::to_string(size) + " bytes of " +
                                     std::to_string(promised * sizeof(capnp::word))));
  }
  if (promised != words || size % sizeof(capnp::word) != 0) {
    return reject(FrameError::kGarbage,
                  Status::Corruption("frame has trailing bytes after the message"));
  }

  // Validation walks the whole message once on its own budget: a message
  // that costs more than twice its size (plus slack) to walk is amplifying
  // through shared pointers, and is refused here. The reader the role gets
  // has a fresh budget of four such walks, so a frame that passed can be
  // read whole without a traversal-limit exception in a handler. (With one
  // shared budget, validation could spend nearly all of it and the role's
  // first full read threw; found by fuzzing.)
  const uint64_t walk_budget = std::min<uint64_t>(limits.traversal_limit_words, uint64_t{words} * 2 + 1024);
  capnp::ReaderOptions check_options;
  check_options.traversalLimitInWords = walk_budget;
  check_options.nestingLimit = limits.nesting_limit;
  capnp::ReaderOptions options;
  options.traversalLimitInWords = walk_budget * 4;  // four full reads of what passed
  options.nestingLimit = limits.nesting_limit;
  try {
    capnp::FlatArrayMessageReader check(view, check_options);
    auto env = check.getRoot<wire::Envelope>();
    if (env.getMagic() != wire::K_MAGIC) {
      return reject(FrameError::kGarbage, Status::Corruption("bad magic"));
    }
    auto which = static_cast<uint16_t>(env.getBody().which());
    if (which > kLastKnownKind) {
      return reject(FrameError::kUnknownKind,
                    Status::Corruption("unknown body kind " + std::to_string(which)));
    }
    Validate(capnp::DynamicStruct::Reader(env), 0);
    frame.reader_ = std::make_unique<capnp::FlatArrayMessageReader>(view, options);
    frame.envelope_ = frame.reader_->getRoot<wire::Envelope>();
  } catch (const kj::Exception& e) {
    return reject(FrameError::kGarbage,
                  Status::Corruption(std::string("malformed message: ") + e.getDescription().cStr()));
  }
  if (expected.size() != 0) {
    bool ok = false;
    for (BodyKind k : expected) ok = ok || k == frame.kind();
    if (!ok) {
      return reject(FrameError::kWrongKind,
                    Status::Corruption("unexpected body kind " + BodyKindName(frame.kind())));
    }
  }
  return Result<Frame>(std::move(frame));
}

}  // namespace grove::actors
