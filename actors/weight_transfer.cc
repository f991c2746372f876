#include "actors/weight_transfer.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "kernels/weight_checksum.h"

namespace grove::actors {

uint64_t WeightChecksum(const float* data, size_t count) {
  // kernels::WeightSum: a sum of one mixed term per 8-byte word (the word
  // and its index), so threads sum disjoint ranges and add the partial sums;
  // the GPU computes the same value in one pass (WeightSumDevice), so a
  // version's checksum can be made and checked wherever its bytes lie. A
  // 6.7 GB model is summed on every publish and every receive: one thread
  // takes ~1.5 s, the memory bus allows several times that.
  const size_t bytes = count * sizeof(float);
  const size_t words = kernels::WeightSumWords(bytes);
  constexpr size_t kWordsPerThread = size_t{4} << 20;  // 32 MiB: threads only for large buffers
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t threads = std::min<size_t>({hw, 16, std::max<size_t>(1, words / kWordsPerThread)});
  if (threads <= 1) return kernels::WeightSumHost(data, bytes);
  std::vector<uint64_t> partial(threads, 0);
  std::vector<std::thread> pool;
  const size_t per = (words + threads - 1) / threads;
  for (size_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      partial[t] = kernels::WeightSumRange(data, bytes, std::min(words, t * per), std::min(words, (t + 1) * per));
    });
  for (std::thread& th : pool) th.join();
  uint64_t sum = 0;
  for (uint64_t v : partial) sum += v;
  return kernels::WeightSumFinish(sum, bytes);
}

void FillWeightAnnounce(const WeightSnapshot& snap, uint64_t chunk_bytes,
                        wire::WeightAnnounce::Builder out) {
  out.setVersion(snap.version);
  out.setTotalBytes(snap.flat.size() * sizeof(float));
  out.setChunkBytes(chunk_bytes);
  out.setChecksum(snap.checksum);
  auto tensors = out.initTensors(snap.tensors.size());
  for (size_t i = 0; i < snap.tensors.size(); ++i) {
    const TensorSpec& t = snap.tensors[i];
    auto b = tensors[i];
    b.setName(t.name);
    b.setDtype(wire::DType::F32);
    auto shape = b.initShape(t.shape.size());
    for (size_t d = 0; d < t.shape.size(); ++d) shape.set(d, t.shape[d]);
    b.setOffset(t.offset * sizeof(float));
    b.setBytes(t.count * sizeof(float));
  }
}

void FillWeightChunk(const WeightSnapshot& snap, uint64_t offset, uint64_t len,
                     wire::WeightChunk::Builder out) {
  out.setVersion(snap.version);
  out.setOffset(offset);
  const auto* base = reinterpret_cast<const kj::byte*>(snap.flat.data());
  out.setData(kj::arrayPtr(base + offset, len));
}

Result<WeightSnapshot> ParseWeightAnnounce(wire::WeightAnnounce::Reader a, uint64_t max_bytes) {
  const uint64_t total = a.getTotalBytes();
  if (total == 0 || total % sizeof(float) != 0)
    return Status::Corruption("weight announce: total bytes " + std::to_string(total) +
                              " is not a positive multiple of 4");
  if (total > max_bytes)
    return Status::ResourceExhausted("weight announce: " + std::to_string(total) +
                                     " bytes exceed the limit of " + std::to_string(max_bytes));
  WeightSnapshot snap;
  snap.version = a.getVersion();
  snap.checksum = a.getChecksum();
  for (auto t : a.getTensors()) {
    if (t.getDtype() != wire::DType::F32)
      return Status::InvalidArgument("weight announce: tensor '" + std::string(t.getName().cStr()) +
                                     "' is not f32");
    if (t.getOffset() % sizeof(float) != 0 || t.getBytes() % sizeof(float) != 0 ||
        t.getOffset() > total || t.getBytes() > total - t.getOffset())
      return Status::Corruption("weight announce: tensor '" + std::string(t.getName().cStr()) +
                                "' lies outside the buffer");
    TensorSpec spec;
    spec.name = t.getName().cStr();
    uint64_t elems = 1;
    for (int64_t d : t.getShape()) {
      if (d < 0) return Status::Corruption("weight announce: negative dimension in " + spec.name);
      spec.shape.push_back(d);
      // Checked: a shape like [2^32, 2^32] must not wrap to a small count
      // (to 0 it would match a 0-byte tensor and be trusted downstream).
      if (__builtin_mul_overflow(elems, static_cast<uint64_t>(d), &elems))
        return Status::Corruption("weight announce: shape of '" + spec.name + "' overflows 64 bits");
    }
    spec.offset = t.getOffset() / sizeof(float);
    spec.count = t.getBytes() / sizeof(float);
    if (elems != spec.count)
      return Status::Corruption("weight announce: shape of '" + spec.name + "' does not match its size");
    snap.tensors.push_back(std::move(spec));
  }
  return snap;
}

Status WeightAssembler::Begin(wire::WeightAnnounce::Reader a, uint64_t max_bytes) {
  snap_.reset();
  const uint64_t total = a.getTotalBytes();
  const uint64_t chunk = a.getChunkBytes();
  GROVE_ASSIGN_OR_RETURN(WeightSnapshot parsed, ParseWeightAnnounce(a, max_bytes));
  if (chunk == 0 || chunk % sizeof(float) != 0)
    return Status::Corruption("weight announce: bad chunk size " + std::to_string(chunk));
  auto snap = std::make_unique<WeightSnapshot>(std::move(parsed));
  snap->flat.assign(total / sizeof(float), 0.0f);
  total_bytes_ = total;
  chunk_bytes_ = chunk;
  chunks_left_ = (total + chunk - 1) / chunk;
  have_.assign(chunks_left_, false);
  snap_ = std::move(snap);
  return Status::OK();
}

Status WeightAssembler::Add(wire::WeightChunk::Reader c) {
  if (!snap_) return Status::FailedPrecondition("weight chunk before its announce");
  if (c.getVersion() != snap_->version)
    return Status::InvalidArgument("weight chunk of version " + std::to_string(c.getVersion()) +
                                   " while assembling " + std::to_string(snap_->version));
  const uint64_t off = c.getOffset();
  auto data = c.getData();
  if (off % chunk_bytes_ != 0 || off >= total_bytes_)
    return Status::Corruption("weight chunk at bad offset " + std::to_string(off));
  const uint64_t idx = off / chunk_bytes_;
  const uint64_t expect = std::min(chunk_bytes_, total_bytes_ - off);
  if (data.size() != expect)
    return Status::Corruption("weight chunk at " + std::to_string(off) + " has " +
                              std::to_string(data.size()) + " bytes, expected " + std::to_string(expect));
  if (have_[idx]) return Status::OK();
  std::memcpy(reinterpret_cast<char*>(snap_->flat.data()) + off, data.begin(), data.size());
  have_[idx] = true;
  --chunks_left_;
  return Status::OK();
}

Status WeightAssembler::FillAll(const std::function<Status(void* dst, uint64_t bytes)>& fill) {
  if (!snap_) return Status::FailedPrecondition("weight bytes before their announce");
  GROVE_RETURN_IF_ERROR(fill(snap_->flat.data(), total_bytes_));
  have_.assign(have_.size(), true);
  chunks_left_ = 0;
  return Status::OK();
}

bool WeightAssembler::complete() const { return snap_ && chunks_left_ == 0; }

uint64_t WeightAssembler::next_missing_offset() const {
  for (size_t i = 0; i < have_.size(); ++i)
    if (!have_[i]) return i * chunk_bytes_;
  return total_bytes_;
}

Result<WeightSnapshot> WeightAssembler::Finish() {
  if (!complete()) return Status::FailedPrecondition("weights incomplete");
  uint64_t sum = WeightChecksum(snap_->flat.data(), snap_->flat.size());
  if (sum != snap_->checksum)
    return Status::Corruption("weights of version " + std::to_string(snap_->version) +
                              " fail their checksum");
  WeightSnapshot out = std::move(*snap_);
  snap_.reset();
  return out;
}

}  // namespace grove::actors
