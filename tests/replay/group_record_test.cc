#include "replay/group_record.h"

#include <algorithm>
#include <random>

#include <gtest/gtest.h>

namespace grove::replay {
namespace {

TEST(SampleKeyTest, EncodingOrderMatchesKeyOrderOnRandomKeys) {
  std::mt19937_64 rng(12345);
  std::vector<SampleKey> keys;
  for (int i = 0; i < 2000; ++i) {
    int64_t version;
    switch (i % 4) {
      case 0: version = static_cast<int64_t>(rng()); break;          // any sign, any size
      case 1: version = static_cast<int64_t>(rng() % 64) - 32; break;  // around zero
      case 2: version = (i % 8 == 2) ? INT64_MIN : INT64_MAX; break;
      default: version = static_cast<int64_t>(rng() % 5); break;
    }
    keys.push_back(SampleKey{version, rng() % 3 == 0 ? rng() : rng() % 100});
  }
  for (size_t i = 0; i + 1 < keys.size(); ++i) {
    const std::string a = EncodeSampleKey(keys[i]), b = EncodeSampleKey(keys[i + 1]);
    ASSERT_EQ(a.size(), 16u);
    EXPECT_EQ(keys[i] < keys[i + 1], a < b) << i;
    EXPECT_EQ(keys[i] == keys[i + 1], a == b) << i;
    Result<SampleKey> back = DecodeSampleKey(a);
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, keys[i]);
  }
  EXPECT_LT(VersionLowerBound(-1), VersionLowerBound(0));
  EXPECT_LE(VersionLowerBound(7), EncodeSampleKey({7, 0}));
  EXPECT_LT(EncodeSampleKey({6, UINT64_MAX}), VersionLowerBound(7));
}

TEST(SampleKeyTest, WrongLengthIsCorruption) {
  EXPECT_EQ(DecodeSampleKey("short").status().code(), StatusCode::kCorruption);
}

TEST(SampleValueTest, RoundTripsAndRejectsDamage) {
  const std::string payload("\0\1\2binary\xff", 10);
  const std::string value = EncodeSampleValue("group-9", -4, payload);
  EXPECT_EQ(EncodeSampleValueHeader("group-9", -4) + payload, value);
  Result<GroupRecord> r = DecodeSampleValue(value, SampleKey{-4, 77});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->group_id, "group-9");
  EXPECT_EQ(r->policy_version, -4);
  EXPECT_EQ(r->payload, payload);
  EXPECT_EQ(r->arrival, 77u);

  // Stored under another version's key.
  EXPECT_EQ(DecodeSampleValue(value, SampleKey{5, 77}).status().code(), StatusCode::kCorruption);
  // Unknown record format.
  std::string bad_format = value;
  bad_format[0] = 9;
  EXPECT_EQ(DecodeSampleValue(bad_format, SampleKey{-4, 1}).status().code(), StatusCode::kCorruption);
  // Every truncation that cuts into the header or id fails cleanly.
  for (size_t n = 0; n < 1 + 4 + 7 + 8; ++n) {
    EXPECT_EQ(DecodeSampleValue(value.substr(0, n), SampleKey{-4, 1}).status().code(), StatusCode::kCorruption)
        << n;
  }
  // An id length larger than the value.
  std::string bad_len = value;
  bad_len[1] = '\x7f';
  bad_len[4] = '\x7f';
  EXPECT_EQ(DecodeSampleValue(bad_len, SampleKey{-4, 1}).status().code(), StatusCode::kCorruption);
}

}  // namespace
}  // namespace grove::replay
