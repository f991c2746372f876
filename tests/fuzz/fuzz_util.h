// Small helpers shared by the fuzz targets: a check that aborts (so both
// libFuzzer and the replay driver report it as a crash, with the input
// saved), and a digest that keeps reads from being optimized away.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace grove::fuzz {

[[noreturn]] inline void Fail(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: fuzz check failed: %s\n", file, line, what.c_str());
  std::abort();
}

inline uint64_t Digest(const void* data, size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (size_t i = 0; i < size; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// Consumes a value through a volatile store.
inline void Sink(uint64_t v) {
  static volatile uint64_t sink;
  sink = sink + v;
}

}  // namespace grove::fuzz

#define GROVE_FUZZ_CHECK(cond) \
  ((cond) ? (void)0 : ::grove::fuzz::Fail(__FILE__, __LINE__, "expected " #cond))
