// ParallelFor: fn(i) for every i in [0, n) on up to `max_threads` host
// threads (the caller's among them, never more than the machine has),
// indices handed out one at a time, so uneven items balance. fn must be
// safe to call concurrently for different i; the call returns when all are
// done. What fn(i) computes must not depend on which thread runs it (sum
// per index and combine in index order for results that do not depend on
// the core count).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace grove {

template <typename F>
void ParallelFor(int64_t n, int max_threads, F&& fn) {
  const int64_t threads =
      std::min<int64_t>({n, int64_t(max_threads), int64_t(std::max(1u, std::thread::hardware_concurrency()))});
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;) fn(i);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
}

}  // namespace grove
