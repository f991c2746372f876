// Fuzz target: actors::WeightAssembler, which rebuilds a policy's weights
// from a WeightAnnounce and WeightChunks that arrive from the network.
//
// The messages are built from the input's fields (their Cap'n Proto framing
// is the `frame` target's), so the fuzzer spends its time on the
// assembler's own checks: sizes, offsets, shapes, versions, repeats, order.
//
// Input (little-endian):
//   u8 flags       bit 0: announce the checksum of what the chunks will
//                  assemble (so Finish can succeed); bit 1: max 64 KiB
//   u8 version | u32 total_bytes | u16 chunk_bytes | u8 tensors (mod 8)
//   per tensor: u8 dtype (0 = f32) | u32 offset | u32 bytes | u8 rank (mod 5)
//               | rank x i64 dims
//   then chunks until the input ends: u8 flags (bit 0: another version;
//   bit 1: offset is a chunk index) | u32 offset | u16 length | bytes
//   (fewer when the input ends first).
//
// Promises checked: Begin refuses sizes over the limit and never allocates
// more; a chunk the assembler accepts lies inside the buffer; Finish succeeds
// exactly when every chunk came and the checksum matches, and then the
// buffer holds, at each chunk, the first accepted bytes for it; every tensor
// of a finished snapshot lies inside the buffer and its shape's product
// (computed without overflow) is its element count.
#include <capnp/message.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "actors/weight_transfer.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

namespace wire = grove::wire;

class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size) : p_(data), left_(size) {}
  template <typename T>
  T Take() {
    T v{};
    size_t n = left_ < sizeof(T) ? left_ : sizeof(T);
    std::memcpy(&v, p_, n);
    p_ += n;
    left_ -= n;
    return v;
  }
  std::string Bytes(size_t n) {
    if (n > left_) n = left_;
    std::string s(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    left_ -= n;
    return s;
  }
  bool empty() const { return left_ == 0; }

 private:
  const uint8_t* p_;
  size_t left_;
};

struct Chunk {
  int64_t version;
  uint64_t offset;
  std::string data;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Cursor in(data, size);
  const uint8_t flags = in.Take<uint8_t>();
  const uint64_t max_bytes = (flags & 2) ? (uint64_t{1} << 16) : (uint64_t{1} << 20);
  const int64_t version = in.Take<uint8_t>();
  const uint64_t total = in.Take<uint32_t>();
  const uint64_t chunk_bytes = in.Take<uint16_t>();

  capnp::MallocMessageBuilder announce_message;
  auto announce = announce_message.initRoot<wire::WeightAnnounce>();
  announce.setVersion(version);
  announce.setTotalBytes(total);
  announce.setChunkBytes(chunk_bytes);
  const unsigned num_tensors = in.Take<uint8_t>() % 8;
  auto tensors = announce.initTensors(num_tensors);
  for (unsigned i = 0; i < num_tensors; ++i) {
    auto t = tensors[i];
    t.setName("t" + std::to_string(i));
    t.setDtype(in.Take<uint8_t>() == 0 ? wire::DType::F32 : wire::DType::BF16);
    t.setOffset(in.Take<uint32_t>());
    t.setBytes(in.Take<uint32_t>());
    const unsigned rank = in.Take<uint8_t>() % 5;
    auto shape = t.initShape(rank);
    for (unsigned d = 0; d < rank; ++d) shape.set(d, in.Take<int64_t>());
  }
  std::vector<Chunk> chunks;
  while (!in.empty() && chunks.size() < 4096) {
    const uint8_t chunk_flags = in.Take<uint8_t>();
    Chunk c;
    c.version = (chunk_flags & 1) ? version + 1 : version;
    const uint64_t raw = in.Take<uint32_t>();
    c.offset = (chunk_flags & 2) ? raw * chunk_bytes : raw;
    c.data = in.Bytes(in.Take<uint16_t>());
    chunks.push_back(std::move(c));
  }

  // What the buffer should hold: the first well-formed chunk at each index.
  std::map<uint64_t, const Chunk*> expected;
  const bool sizes_ok = total > 0 && total % 4 == 0 && total <= max_bytes && chunk_bytes > 0 && chunk_bytes % 4 == 0;
  if (sizes_ok) {
    for (const Chunk& c : chunks) {
      if (c.version != version || c.offset % chunk_bytes != 0 || c.offset >= total) continue;
      const uint64_t want = std::min<uint64_t>(chunk_bytes, total - c.offset);
      if (c.data.size() == want) expected.emplace(c.offset, &c);
    }
  }
  std::vector<float> model(sizes_ok ? total / 4 : 0, 0.0f);
  for (const auto& [offset, c] : expected) std::memcpy(reinterpret_cast<char*>(model.data()) + offset, c->data.data(), c->data.size());
  if (flags & 1) announce.setChecksum(grove::actors::WeightChecksum(model.data(), model.size()));

  grove::actors::WeightAssembler assembler;
  grove::Status begun = assembler.Begin(announce.asReader(), max_bytes);
  if (!begun.ok()) {
    GROVE_FUZZ_CHECK(!assembler.complete());
    return 0;
  }
  GROVE_FUZZ_CHECK(sizes_ok);  // Begin accepted only sizes it can hold
  for (const Chunk& c : chunks) {
    capnp::MallocMessageBuilder m;
    auto chunk = m.initRoot<wire::WeightChunk>();
    chunk.setVersion(c.version);
    chunk.setOffset(c.offset);
    chunk.setData(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(c.data.data()), c.data.size()));
    grove::Status added = assembler.Add(chunk.asReader());
    auto it = expected.find(c.offset);
    const bool well_formed = it != expected.end() && c.version == version &&
                             c.data.size() == it->second->data.size();
    GROVE_FUZZ_CHECK(added.ok() == well_formed);
    GROVE_FUZZ_CHECK(assembler.next_missing_offset() <= total);
  }
  const uint64_t num_chunks = (total + chunk_bytes - 1) / chunk_bytes;
  GROVE_FUZZ_CHECK(assembler.complete() == (expected.size() == num_chunks));
  grove::Result<grove::actors::WeightSnapshot> snap = assembler.Finish();
  if (!snap.ok()) return 0;
  GROVE_FUZZ_CHECK(expected.size() == num_chunks);
  GROVE_FUZZ_CHECK(snap->version == version);
  GROVE_FUZZ_CHECK(snap->flat.size() == model.size());
  GROVE_FUZZ_CHECK(std::memcmp(snap->flat.data(), model.data(), model.size() * sizeof(float)) == 0);
  for (const grove::actors::TensorSpec& t : snap->tensors) {
    GROVE_FUZZ_CHECK(t.offset <= snap->flat.size() && t.count <= snap->flat.size() - t.offset);
    // The true product: 0 when any dimension is 0 (even after a huge one),
    // otherwise exact in 128 bits until it passes 2^64.
    unsigned __int128 elems = 1;
    bool zero = false, over = false;
    for (int64_t d : t.shape) {
      GROVE_FUZZ_CHECK(d >= 0);
      zero = zero || d == 0;
      if (!over) elems *= static_cast<uint64_t>(d);
      over = over || elems > UINT64_MAX;
    }
    if (zero) elems = 0;
    GROVE_FUZZ_CHECK((zero || !over) && elems == t.count);
  }
  return 0;
}
