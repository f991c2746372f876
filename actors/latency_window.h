// Latency figures an actor heartbeats as counters: quantiles over its most
// recent observations (a sliding window, so a slow start does not hide a
// fast present, nor the reverse) plus a running count and sum over its
// whole life. The counters follow one naming rule that `grove status` and
// /metrics recognise (cluster/prometheus_text.h renders them as a summary):
//
//   <name>_p50_ms, <name>_p99_ms   quantiles of the last `capacity` values
//   <name>_count, <name>_sum_ms    every value since the process started
//
// Not thread-safe: one owner adds and publishes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "actors/actor_client.h"

namespace grove::actors {

class LatencyWindow {
 public:
  explicit LatencyWindow(size_t capacity = 1024) : capacity_(std::max<size_t>(1, capacity)) {}

  // A negative or non-finite value (a clock step between hosts) counts as 0.
  void Add(double ms) {
    if (!(ms > 0) || !std::isfinite(ms)) ms = 0;
    if (window_.size() < capacity_) {
      window_.push_back(ms);
    } else {
      window_[next_] = ms;
    }
    next_ = (next_ + 1) % capacity_;
    ++count_;
    sum_ms_ += ms;
  }

  // Nearest-rank quantile (q in [0, 1]) of the window; 0 when empty.
  double Quantile(double q) const {
    if (window_.empty()) return 0;
    std::vector<double> sorted = window_;
    q = std::clamp(q, 0.0, 1.0);
    size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
    rank = std::clamp<size_t>(rank, 1, sorted.size()) - 1;
    std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(rank), sorted.end());
    return sorted[rank];
  }

  uint64_t count() const { return count_; }
  double sum_ms() const { return sum_ms_; }
  size_t window_size() const { return window_.size(); }

  // Sets the four counters described above on `client`.
  void Publish(ActorClient& client, const std::string& name) const {
    client.SetCounter(name + "_p50_ms", Quantile(0.5));
    client.SetCounter(name + "_p99_ms", Quantile(0.99));
    client.SetCounter(name + "_count", static_cast<double>(count_));
    client.SetCounter(name + "_sum_ms", sum_ms_);
  }

 private:
  size_t capacity_;
  std::vector<double> window_;
  size_t next_ = 0;
  uint64_t count_ = 0;
  double sum_ms_ = 0;
};

}  // namespace grove::actors
