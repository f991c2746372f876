// What the NCCL weight tests' learner and workers agree on: the weights of
// version v are a pure function of (seed, v), so a worker checks every
// version it receives bit for bit without being told what was sent.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>

#include "actors/weight_transfer.h"

namespace grove::testing {

// Random 32-bit patterns (NaNs with payloads, infinities, -0, subnormals
// included): any byte that a transport normalizes, converts or drops shows.
// Three tensors, the last of odd length, so buckets never line up with them.
inline actors::WeightSnapshot PeerWeights(uint64_t seed, int64_t version, size_t floats) {
  actors::WeightSnapshot s;
  s.version = version;
  s.flat.resize(floats);
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(version));
  for (size_t i = 0; i < floats; i += 2) {
    uint64_t bits = rng();
    std::memcpy(&s.flat[i], &bits, sizeof(uint32_t) * std::min<size_t>(2, floats - i));
  }
  const uint64_t a = floats / 3, b = floats / 2;
  s.tensors.push_back({"embed", {static_cast<int64_t>(a)}, 0, a});
  s.tensors.push_back({"layers.0.w", {static_cast<int64_t>(b - a)}, a, b - a});
  s.tensors.push_back({"head", {static_cast<int64_t>(floats - b)}, b, floats - b});
  s.checksum = actors::WeightChecksum(s.flat.data(), s.flat.size());
  return s;
}

}  // namespace grove::testing
