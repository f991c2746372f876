#include "bench/support/fast_init.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace grove::bench {

void FastInit(model::Model& m, uint64_t seed) {
  const model::ModelConfig& c = m.config();
  const auto& tensors = m.layout().tensors();
  const double out_std = c.init_std / std::sqrt(2.0 * double(c.layers));
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < tensors.size();) {
      const model::TensorInfo& t = tensors[i];
      float* p = m.params().data() + t.offset;
      auto ends = [&](const std::string& s) {
        return t.name.size() >= s.size() && t.name.compare(t.name.size() - s.size(), s.size(), s) == 0;
      };
      if (ends("norm")) {
        std::fill(p, p + t.numel, 1.f);
      } else if (ends("router_bias")) {
        std::fill(p, p + t.numel, 0.f);
      } else {
        std::mt19937_64 rng(seed * 1000003 + i);
        std::normal_distribution<float> normal(0.f, float((ends("wo") || ends("w2")) ? out_std : c.init_std));
        for (int64_t j = 0; j < t.numel; ++j) p[j] = normal(rng);
      }
    }
  };
  std::vector<std::thread> threads;
  for (unsigned k = 1; k < std::max(1u, std::thread::hardware_concurrency()); ++k) threads.emplace_back(work);
  work();
  for (auto& th : threads) th.join();
}

}  // namespace grove::bench
