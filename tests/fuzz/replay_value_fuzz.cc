// Fuzz target: the replay store's decoders of what it reads back from RocksDB
// (a disk, a restored backup, a file someone copied in): DecodeSampleKey and
// DecodeSampleValue.
//
// Input: bytes 0-15 are the key (fewer when the input is shorter); the rest
// is the value. A key that does not decode is still fuzzed: the value is then
// decoded under the key (version 0, arrival 0) and under a key whose version
// is the one the value claims at its fixed offset, so both the match and the
// mismatch paths run.
//
// Promises checked: a decoded key re-encodes to the same 16 bytes; a decoded
// value re-encodes (EncodeSampleValue) to exactly the input bytes, header and
// payload alike, and carries the key's version.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "replay/group_record.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

namespace replay = grove::replay;

void CheckValue(std::string_view value, replay::SampleKey key) {
  grove::Result<replay::GroupRecord> record = replay::DecodeSampleValue(value, key);
  if (!record.ok()) {
    GROVE_FUZZ_CHECK(!record.status().message().empty());
    return;
  }
  GROVE_FUZZ_CHECK(record->policy_version == key.policy_version);
  GROVE_FUZZ_CHECK(replay::EncodeSampleValue(record->group_id, record->policy_version, record->payload) == value);
  GROVE_FUZZ_CHECK(replay::EncodeSampleValueHeader(record->group_id, record->policy_version) + record->payload ==
                   value);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const std::string_view key_bytes = bytes.substr(0, 16);
  const std::string_view value = bytes.substr(key_bytes.size());

  grove::Result<replay::SampleKey> key = replay::DecodeSampleKey(key_bytes);
  if (key.ok()) {
    GROVE_FUZZ_CHECK(replay::EncodeSampleKey(*key) == key_bytes);
    CheckValue(value, *key);
  } else {
    GROVE_FUZZ_CHECK(key_bytes.size() != 16);  // every 16 bytes are some key
    CheckValue(value, replay::SampleKey{});
  }
  // The version the value claims (after format byte, id length and id).
  if (value.size() >= 5) {
    uint32_t id_len;
    std::memcpy(&id_len, value.data() + 1, 4);
    if (value.size() - 5 >= id_len && value.size() - 5 - id_len >= 8) {
      int64_t version;
      std::memcpy(&version, value.data() + 5 + id_len, 8);
      CheckValue(value, replay::SampleKey{version, 1});
    }
  }
  return 0;
}
