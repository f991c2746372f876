// Small helpers every benchmark program shares: fail fast on an error (a
// benchmark has no one to return a Status to), wall time, comma lists.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

// Evaluates a Status or Result expression; prints it and exits 1 on error.
#define GROVE_BENCH_CHECK_OK(expr)                                            \
  do {                                                                        \
    auto _s = (expr);                                                         \
    if (!_s.ok()) {                                                           \
      std::fprintf(stderr, "%s failed: %s\n", #expr, _s.ToString().c_str()); \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

// A CUDA runtime call (include <cuda_runtime_api.h> first); exits 1 on error.
#define GROVE_BENCH_CUDA_CHECK(x)                                                               \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));   \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

namespace grove::bench {

using Clock = std::chrono::steady_clock;
inline double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// "1,8,32" -> {1, 8, 32}; "bf16,int4" -> {"bf16", "int4"}.
inline std::vector<std::string> SplitCommaList(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');)
    if (!t.empty()) out.push_back(t);
  return out;
}
inline std::vector<int> ParseIntList(const std::string& s) {
  std::vector<int> out;
  for (const std::string& t : SplitCommaList(s)) out.push_back(std::stoi(t));
  return out;
}

}  // namespace grove::bench
