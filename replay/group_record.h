// GroupRecord: one scored group as the replay store keeps it, and the byte
// layout of its keys and values on disk.
//
// The store is payload-agnostic: `payload` is the serialized Cap'n Proto
// ScoredGroup, opaque here. Keys sort by policy version, then arrival, so the
// learner's oldest-first reads and retention's range deletes are sequential.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/result.h"

namespace grove::replay {

struct GroupRecord {
  std::string group_id;        // unique across the store's lifetime window
  int64_t policy_version = 0;  // the policy version that generated the group
  std::string payload;         // serialized ScoredGroup, opaque to the store
  uint64_t arrival = 0;        // assigned by the store on insert; 0 before
};

// Where a group lives: (policy version, arrival). Orders like its encoding.
struct SampleKey {
  int64_t policy_version = 0;
  uint64_t arrival = 0;
  auto operator<=>(const SampleKey&) const = default;
};

// 16 bytes: big-endian version with the sign bit flipped (so negative
// versions sort first), then big-endian arrival. Byte order == SampleKey order.
std::string EncodeSampleKey(SampleKey key);
Result<SampleKey> DecodeSampleKey(std::string_view bytes);
// The smallest encoded key of `policy_version` (arrival 0).
std::string VersionLowerBound(int64_t policy_version);

// Value in the samples column family:
//   u8 record format (1) | u32 id length (LE) | id | i64 policy version (LE) | payload
// The version is repeated in the value so a value moved under the wrong key is
// caught when it is parsed.
std::string EncodeSampleValue(std::string_view group_id, int64_t policy_version,
                              std::string_view payload);
// The value without its payload: EncodeSampleValueHeader(...) + payload ==
// EncodeSampleValue(...). Lets a writer hand RocksDB the payload in place.
std::string EncodeSampleValueHeader(std::string_view group_id, int64_t policy_version);
// Corruption (naming what is wrong) when the bytes are not a record of this
// format, or the version disagrees with `key`.
Result<GroupRecord> DecodeSampleValue(std::string_view value, SampleKey key);

}  // namespace grove::replay
