#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace grove::model {

Status ValidateSampling(const SamplingOptions& o) {
  if (!(o.temperature >= 0.0) || !std::isfinite(o.temperature))
    return Status::InvalidArgument("sampling: temperature must be finite and >= 0");
  if (!(o.top_p > 0.0 && o.top_p <= 1.0)) return Status::InvalidArgument("sampling: top_p must be in (0, 1]");
  if (o.top_k < 0) return Status::InvalidArgument("sampling: top_k must be >= 0");
  if (o.max_new_tokens < 0) return Status::InvalidArgument("sampling: max_new_tokens must be >= 0");
  return Status::OK();
}

Sampler::Sampler(const SamplingOptions& options, uint64_t stream) : options_(options) {
  // SplitMix64 of (seed, stream): decorrelated generators per sequence.
  uint64_t z = options.seed + 0x9E3779B97F4A7C15ull * (stream + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  rng_.seed(z ^ (z >> 31));
}

int32_t Sampler::Sample(const std::vector<double>& logits) {
  const int32_t V = int32_t(logits.size());
  if (options_.temperature == 0.0) return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  order_.resize(V);
  std::iota(order_.begin(), order_.end(), 0);
  std::stable_sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int32_t keep = V;
  if (options_.top_k > 0 && options_.top_k < V) keep = int32_t(options_.top_k);
  probs_.resize(keep);
  const double mx = logits[order_[0]];
  double sum = 0;
  for (int32_t i = 0; i < keep; ++i) sum += probs_[i] = std::exp((logits[order_[i]] - mx) / options_.temperature);
  if (options_.top_p < 1.0) {
    double mass = 0;
    int32_t n = 0;
    while (n < keep) {
      mass += probs_[n++] / sum;
      if (mass >= options_.top_p) break;
    }
    keep = n;
    sum = 0;
    for (int32_t i = 0; i < keep; ++i) sum += probs_[i];
  }
  double u = UniformOpen(rng_) * sum;
  for (int32_t i = 0; i < keep; ++i) {
    u -= probs_[i];
    if (u <= 0) return order_[i];
  }
  return order_[keep - 1];
}

}  // namespace grove::model
