// Token sampling for generation: temperature, top-k, top-p over one row of
// logits, from a seeded generator. Each sequence of a batch has its own
// generator (seeded from the options' seed and the sequence's index), so its
// tokens do not depend on what else is in the batch.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "base/status.h"
#include "model/transformer.h"

namespace grove::model {

// A double in (0, 1) from 53 random bits (same on every platform).
inline double UniformOpen(std::mt19937_64& rng) { return (double(rng() >> 11) + 0.5) * 0x1.0p-53; }

Status ValidateSampling(const SamplingOptions& options);

class Sampler {
 public:
  Sampler(const SamplingOptions& options, uint64_t stream);
  // Draws a token from softmax(logits / temperature) restricted to the top_k
  // most likely tokens, then to the smallest prefix (by probability) whose
  // mass reaches top_p, renormalized. temperature 0: argmax (lowest id on ties).
  int32_t Sample(const std::vector<double>& logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
  std::vector<int32_t> order_;
  std::vector<double> probs_;
};

}  // namespace grove::model
