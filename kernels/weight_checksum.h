// WeightSum: an order-sensitive 64-bit checksum of a weight buffer that the
// GPU computes in parallel, so weights that never visit the host (CUDA IPC,
// NCCL to a GPU engine, docs/weights.md) are checked where they lie; the
// checksum of every published version (actors::WeightChecksum, which splits
// it across host threads). A chain like FNV could not be split; this one is a sum
// mod 2^64 of one mixed term per 8-byte word, the word xor'ed with its
// index before the mix, so any changed, swapped or shifted word changes it
// (with the odds of a 64-bit hash), and threads add their terms in any
// order. A tail of 4 bytes (an odd count of floats) is one more word,
// zero-padded. Not a cryptographic hash: it catches torn or corrupt copies.
//
// WeightSumHost is the reference (and the host side of a check); the device
// version gives the same value for the same bytes. Header without CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "base/result.h"

// The recipe below compiles for the host and, under nvcc, for the device:
// the kernel adds the very same terms.
#ifdef __CUDACC__
#define GROVE_WEIGHT_SUM_HD __host__ __device__
#else
#define GROVE_WEIGHT_SUM_HD
#endif

namespace grove::kernels {

// splitmix64's finalizer.
GROVE_WEIGHT_SUM_HD inline constexpr uint64_t WeightSumMix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}
GROVE_WEIGHT_SUM_HD inline constexpr uint64_t WeightSumTerm(uint64_t word, uint64_t index) {
  return WeightSumMix(word ^ (index * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull));
}
GROVE_WEIGHT_SUM_HD inline constexpr uint64_t WeightSumFinish(uint64_t sum, uint64_t bytes) {
  return WeightSumMix(sum ^ WeightSumMix(bytes + 0x2545f4914f6cdd1dull));
}

// The words of a buffer of `bytes` (a 4-byte tail is one more word).
inline constexpr size_t WeightSumWords(size_t bytes) { return (bytes + 7) / 8; }

// The terms of words [from, to) of `data` (`bytes` long, a multiple of 4),
// added: the sums of any split of [0, WeightSumWords(bytes)) add up to the
// buffer's, so threads can take a range each.
inline uint64_t WeightSumRange(const void* data, size_t bytes, size_t from, size_t to) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  const size_t whole = bytes / 8;
  uint64_t sum = 0;
  for (size_t i = from; i < to && i < whole; ++i) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, 8);
    sum += WeightSumTerm(w, i);
  }
  if (bytes % 8 != 0 && from <= whole && whole < to) {
    uint64_t w = 0;
    std::memcpy(&w, p + 8 * whole, bytes % 8);
    sum += WeightSumTerm(w, whole);
  }
  return sum;
}

// bytes must be a multiple of 4.
inline uint64_t WeightSumHost(const void* data, size_t bytes) {
  return WeightSumFinish(WeightSumRange(data, bytes, 0, WeightSumWords(bytes)), bytes);
}

// The same on the device: `data` (8-byte aligned, bytes a multiple of 4)
// on the current device, `scratch` one device uint64 the call overwrites,
// work enqueued on `stream` (a cudaStream_t), then waited for (the result
// comes back to the host). InvalidArgument for bad arguments, Internal for a
// CUDA error.
Result<uint64_t> WeightSumDevice(const void* data, size_t bytes, uint64_t* scratch, void* stream);

}  // namespace grove::kernels
