#include "actors/weight_transfer.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include "kernels/weight_checksum.h"

namespace grove::actors {
namespace {

WeightSnapshot RandomSnapshot(uint32_t seed, int64_t version) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0, 1);
  WeightSnapshot s;
  s.version = version;
  s.tensors = {{"a", {3, 5}, 0, 15}, {"b", {7}, 15, 7}, {"c", {2, 2, 2}, 22, 8}};
  s.flat.resize(30);
  for (float& x : s.flat) x = n(rng);
  s.checksum = WeightChecksum(s.flat.data(), s.flat.size());
  return s;
}

// Serializes and re-reads a message, as the transport would.
template <typename Fill, typename T>
kj::Array<capnp::word> RoundTrip(Fill fill) {
  capnp::MallocMessageBuilder mb;
  fill(mb.initRoot<T>());
  return capnp::messageToFlatArray(mb);
}

TEST(WeightTransfer, ShuffledChunksReassembleBitExact) {
  WeightSnapshot s = RandomSnapshot(1, 42);
  const uint64_t chunk = 16;  // bytes: 4 floats, last chunk short (120 bytes total)
  auto ann = RoundTrip<std::function<void(wire::WeightAnnounce::Builder)>, wire::WeightAnnounce>(
      [&](auto b) { FillWeightAnnounce(s, chunk, b); });
  capnp::FlatArrayMessageReader ar(ann);
  WeightAssembler asm_;
  ASSERT_TRUE(asm_.Begin(ar.getRoot<wire::WeightAnnounce>(), 1 << 20).ok());
  std::vector<uint64_t> offsets;
  for (uint64_t o = 0; o < s.flat.size() * 4; o += chunk) offsets.push_back(o);
  std::shuffle(offsets.begin(), offsets.end(), std::mt19937(7));
  offsets.push_back(offsets.front());  // a repeated chunk is harmless
  for (size_t i = 0; i < offsets.size(); ++i) {
    const uint64_t o = offsets[i];
    EXPECT_EQ(asm_.complete(), i + 1 == offsets.size());  // only the repeat comes after the end
    uint64_t len = std::min<uint64_t>(chunk, s.flat.size() * 4 - o);
    auto c = RoundTrip<std::function<void(wire::WeightChunk::Builder)>, wire::WeightChunk>(
        [&](auto b) { FillWeightChunk(s, o, len, b); });
    capnp::FlatArrayMessageReader cr(c);
    ASSERT_TRUE(asm_.Add(cr.getRoot<wire::WeightChunk>()).ok());
  }
  ASSERT_TRUE(asm_.complete());
  Result<WeightSnapshot> got = asm_.Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->version, 42);
  EXPECT_EQ(0, std::memcmp(got->flat.data(), s.flat.data(), s.flat.size() * 4));
  ASSERT_EQ(got->tensors.size(), 3u);
  EXPECT_EQ(got->tensors[2].name, "c");
  EXPECT_EQ(got->tensors[2].offset, 22u);
  EXPECT_EQ(got->tensors[2].shape, (std::vector<int64_t>{2, 2, 2}));
}

TEST(WeightTransfer, RejectsBadInput) {
  WeightSnapshot s = RandomSnapshot(2, 3);
  capnp::MallocMessageBuilder mb;
  auto a = mb.initRoot<wire::WeightAnnounce>();
  FillWeightAnnounce(s, 16, a);
  WeightAssembler w;
  // Over the size limit.
  EXPECT_EQ(w.Begin(a.asReader(), 64).code(), StatusCode::kResourceExhausted);
  // A tensor outside the buffer.
  a.getTensors()[1].setOffset(1000);
  EXPECT_EQ(w.Begin(a.asReader(), 1 << 20).code(), StatusCode::kCorruption);
  FillWeightAnnounce(s, 16, a);
  ASSERT_TRUE(w.Begin(a.asReader(), 1 << 20).ok());
  capnp::MallocMessageBuilder cb;
  auto c = cb.initRoot<wire::WeightChunk>();
  FillWeightChunk(s, 0, 16, c);
  c.setVersion(4);  // wrong version
  EXPECT_EQ(w.Add(c.asReader()).code(), StatusCode::kInvalidArgument);
  FillWeightChunk(s, 8, 16, c);  // misaligned offset
  EXPECT_EQ(w.Add(c.asReader()).code(), StatusCode::kCorruption);
  FillWeightChunk(s, 0, 12, c);  // short chunk
  EXPECT_EQ(w.Add(c.asReader()).code(), StatusCode::kCorruption);
  EXPECT_EQ(w.Finish().status().code(), StatusCode::kFailedPrecondition);
}

// Found by the weight_chunks fuzz target: the element count of a shape was
// computed modulo 2^64, so [2^32, 2^32] passed as a 0-byte tensor.
TEST(WeightTransfer, ShapeWhoseElementCountOverflowsIsRefused) {
  WeightSnapshot s = RandomSnapshot(4, 1);
  capnp::MallocMessageBuilder mb;
  auto a = mb.initRoot<wire::WeightAnnounce>();
  FillWeightAnnounce(s, 16, a);
  auto t = a.getTensors()[1];
  t.setBytes(0);
  auto shape = t.initShape(2);
  shape.set(0, int64_t{1} << 32);
  shape.set(1, int64_t{1} << 32);
  WeightAssembler w;
  Status st = w.Begin(a.asReader(), 1 << 20);
  EXPECT_EQ(st.code(), StatusCode::kCorruption);
  EXPECT_NE(st.message().find("overflows"), std::string::npos) << st;
}

TEST(WeightTransfer, ChecksumCatchesFlippedBit) {
  WeightSnapshot s = RandomSnapshot(3, 1);
  capnp::MallocMessageBuilder mb;
  auto a = mb.initRoot<wire::WeightAnnounce>();
  FillWeightAnnounce(s, 1024, a);
  WeightAssembler w;
  ASSERT_TRUE(w.Begin(a.asReader(), 1 << 20).ok());
  WeightSnapshot corrupt = s;
  reinterpret_cast<uint8_t*>(corrupt.flat.data())[37] ^= 0x10;
  capnp::MallocMessageBuilder cb;
  auto c = cb.initRoot<wire::WeightChunk>();
  FillWeightChunk(corrupt, 0, s.flat.size() * 4, c);
  ASSERT_TRUE(w.Add(c.asReader()).ok());
  EXPECT_EQ(w.Finish().status().code(), StatusCode::kCorruption);
}

// Any flipped bit (also in the 4-byte tail past the last whole word), two
// swapped 32-byte blocks, and two swapped words change the checksum; equal
// bytes give equal sums.
TEST(WeightTransfer, ChecksumSeesEveryWordAndItsPlace) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> w(8 * 37 + 5);  // 37 whole blocks and a 20-byte tail
  for (float& x : w) x = u(rng);
  const uint64_t base = WeightChecksum(w.data(), w.size());
  EXPECT_EQ(WeightChecksum(std::vector<float>(w).data(), w.size()), base);
  for (size_t byte = 0; byte < w.size() * 4; byte += 3) {
    std::vector<float> f = w;
    reinterpret_cast<uint8_t*>(f.data())[byte] ^= uint8_t(1u << (byte % 8));
    ASSERT_NE(WeightChecksum(f.data(), f.size()), base) << "byte " << byte;
  }
  std::vector<float> blocks = w;
  std::swap_ranges(blocks.begin() + 8 * 3, blocks.begin() + 8 * 4, blocks.begin() + 8 * 20);
  EXPECT_NE(WeightChecksum(blocks.data(), blocks.size()), base);
  std::vector<float> words = w;
  std::swap_ranges(words.begin() + 8 * 5, words.begin() + 8 * 5 + 2, words.begin() + 8 * 5 + 4);
  EXPECT_NE(WeightChecksum(words.data(), words.size()), base);
  EXPECT_NE(WeightChecksum(w.data(), w.size() - 1), base);
}

// The checksum is kernels::WeightSumHost's value (the GPU's WeightSumDevice
// gives the same, tests/kernels/weight_checksum_test.cc), also where it
// splits a large buffer across threads (>= 64 MiB: two or more ranges; an
// odd float count leaves a 4-byte tail word), and a word moved from one
// thread's range into another's changes it.
TEST(WeightTransfer, ChecksumIsTheWeightSumAlsoAcrossThreads) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (size_t floats : {size_t{1}, size_t{2}, size_t{8 * 37 + 5}, (size_t{17} << 20) + 3}) {
    std::vector<float> w(floats);
    for (float& x : w) x = u(rng);
    const uint64_t sum = WeightChecksum(w.data(), w.size());
    EXPECT_EQ(sum, kernels::WeightSumHost(w.data(), w.size() * 4)) << floats << " floats";
    if (floats > (size_t{16} << 20)) {
      std::swap(w[10], w[floats - 10]);  // first range <-> last range
      EXPECT_NE(WeightChecksum(w.data(), w.size()), sum);
    }
  }
}

}  // namespace
}  // namespace grove::actors
