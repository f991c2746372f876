// What `grove up` prints in the foreground: one line per learner step, read
// from the run's metrics.jsonl as the learner writes it, and a before/after
// table when the run ends.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace grove::cli {

class ProgressReport {
 public:
  ProgressReport(std::string metrics_path, FILE* out) : path_(std::move(metrics_path)), out_(out) {}

  // Prints a line for every complete metrics line written since the last call.
  void Poll();
  // The before/after table (warm-start vs. the last evaluation).
  void PrintSummary();

  // One progress line for a metrics row (exposed for tests).
  static std::string FormatLine(const nlohmann::json& row);

 private:
  std::string path_;
  FILE* out_;
  uint64_t offset_ = 0;
  std::string partial_;
  std::vector<nlohmann::json> rows_;
};

}  // namespace grove::cli
