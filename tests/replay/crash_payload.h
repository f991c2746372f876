// The deterministic groups of the crash test: writer and checker derive a
// group's version and payload from its id, so the checker can verify content
// without being told it.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>

namespace grove::replay {

inline std::string CrashGroupId(int round, int thread, int n) {
  return "r" + std::to_string(round) + "-t" + std::to_string(thread) + "-" + std::to_string(n);
}

inline int64_t CrashGroupVersion(const std::string& id) {
  return static_cast<int64_t>(std::hash<std::string>{}(id) % 50);
}

inline std::string CrashPayload(const std::string& id) {
  std::mt19937_64 rng(std::hash<std::string>{}(id));
  std::string payload(1024 + rng() % 3072, '\0');
  for (auto& c : payload) c = static_cast<char>(rng());
  return payload;
}

}  // namespace grove::replay
