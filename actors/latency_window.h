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
#include <optional>
#include <string>
#include <vector>

#include "actors/actor_client.h"

namespace grove::actors {

// A counter name as LatencyWindow::Publish writes it, taken apart:
// "<base>_p<digits>_ms" is a quantile (0.<digits>), "<base>_count" and
// "<base>_sum_ms" the totals. Status views use it to tell a latency window's
// counters from the others (a bare "_count" counter is a window's only if
// the same base also has a quantile).
struct LatencyCounter {
  enum class Kind { kQuantile, kCount, kSum };
  Kind kind;
  std::string base;
  std::string digits;  // kQuantile: "50", "99", ...
};

inline std::optional<LatencyCounter> ParseLatencyCounter(const std::string& name) {
  auto ends_with = [&](const std::string& suffix) {
    return name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends_with("_sum_ms")) return LatencyCounter{LatencyCounter::Kind::kSum, name.substr(0, name.size() - 7), ""};
  if (ends_with("_count")) return LatencyCounter{LatencyCounter::Kind::kCount, name.substr(0, name.size() - 6), ""};
  if (!ends_with("_ms")) return std::nullopt;
  const std::string head = name.substr(0, name.size() - 3);  // <base>_p<digits>
  const auto p = head.rfind("_p");
  if (p == std::string::npos || p == 0 || p + 2 >= head.size()) return std::nullopt;
  const std::string digits = head.substr(p + 2);
  if (digits.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  return LatencyCounter{LatencyCounter::Kind::kQuantile, head.substr(0, p), digits};
}

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
