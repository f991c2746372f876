#include "replay/group_record.h"

#include <cstring>

namespace grove::replay {
namespace {

constexpr uint8_t kRecordFormat = 1;

void PutBigEndian64(std::string* out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) out->push_back(static_cast<char>((v >> shift) & 0xff));
}

uint64_t GetBigEndian64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

template <typename T>
void PutLittleEndian(std::string* out, T v) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));  // x86 and aarch64 Linux are little-endian
  out->append(bytes, sizeof(T));
}

template <typename T>
T GetLittleEndian(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

constexpr uint64_t kSignBit = uint64_t{1} << 63;

}  // namespace

std::string EncodeSampleKey(SampleKey key) {
  std::string out;
  out.reserve(16);
  PutBigEndian64(&out, static_cast<uint64_t>(key.policy_version) ^ kSignBit);
  PutBigEndian64(&out, key.arrival);
  return out;
}

Result<SampleKey> DecodeSampleKey(std::string_view bytes) {
  if (bytes.size() != 16) {
    return Status::Corruption("sample key has " + std::to_string(bytes.size()) + " bytes, expected 16");
  }
  SampleKey key;
  key.policy_version = static_cast<int64_t>(GetBigEndian64(bytes.data()) ^ kSignBit);
  key.arrival = GetBigEndian64(bytes.data() + 8);
  return key;
}

std::string VersionLowerBound(int64_t policy_version) {
  return EncodeSampleKey(SampleKey{policy_version, 0});
}

std::string EncodeSampleValueHeader(std::string_view group_id, int64_t policy_version) {
  std::string out;
  out.reserve(1 + 4 + group_id.size() + 8);
  out.push_back(static_cast<char>(kRecordFormat));
  PutLittleEndian<uint32_t>(&out, static_cast<uint32_t>(group_id.size()));
  out.append(group_id);
  PutLittleEndian<int64_t>(&out, policy_version);
  return out;
}

std::string EncodeSampleValue(std::string_view group_id, int64_t policy_version,
                              std::string_view payload) {
  std::string out = EncodeSampleValueHeader(group_id, policy_version);
  out.append(payload);
  return out;
}

Result<GroupRecord> DecodeSampleValue(std::string_view value, SampleKey key) {
  const std::string where = "record (version " + std::to_string(key.policy_version) + ", arrival " +
                            std::to_string(key.arrival) + ")";
  if (value.size() < 1 + 4 + 8) {
    return Status::Corruption(where + " is " + std::to_string(value.size()) +
                              " bytes, shorter than a record header");
  }
  if (static_cast<uint8_t>(value[0]) != kRecordFormat) {
    return Status::Corruption(where + " has record format " + std::to_string(static_cast<uint8_t>(value[0])) +
                              ", this build reads format " + std::to_string(kRecordFormat));
  }
  const uint32_t id_size = GetLittleEndian<uint32_t>(value.data() + 1);
  if (id_size == 0 || uint64_t{id_size} + 1 + 4 + 8 > value.size()) {
    return Status::Corruption(where + " declares a group id of " + std::to_string(id_size) +
                              " bytes, which does not fit its " + std::to_string(value.size()) + " bytes");
  }
  GroupRecord record;
  record.group_id.assign(value.data() + 5, id_size);
  record.policy_version = GetLittleEndian<int64_t>(value.data() + 5 + id_size);
  if (record.policy_version != key.policy_version) {
    return Status::Corruption(where + " holds policy version " + std::to_string(record.policy_version) +
                              ", which disagrees with its key");
  }
  record.payload.assign(value.data() + 5 + id_size + 8, value.size() - (5 + id_size + 8));
  record.arrival = key.arrival;
  return record;
}

}  // namespace grove::replay
