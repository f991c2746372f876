// Fuzz target: reward::ExtractPythonCode, which finds the model's program in
// a completion (hostile text) before the python_tests verifier runs it.
//
// Input: byte 0 picks the size limit (64 << (byte % 8)); the rest is the
// completion.
//
// Promises checked: a found program is non-empty (not only whitespace), at
// most the limit, free of NUL bytes, and a contiguous piece of the
// completion; when none is found there is a reason.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "reward/answer.h"
#include "reward/python_code.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t limit = size_t{64} << (data[0] % 8);
  const std::string_view completion(reinterpret_cast<const char*>(data + 1), size - 1);
  grove::reward::ExtractedCode code = grove::reward::ExtractPythonCode(completion, limit);
  if (!code.found) {
    GROVE_FUZZ_CHECK(!code.error.empty());
    GROVE_FUZZ_CHECK(code.code.empty());
    return 0;
  }
  GROVE_FUZZ_CHECK(code.error.empty());
  GROVE_FUZZ_CHECK(!grove::reward::TrimSpace(code.code).empty());
  GROVE_FUZZ_CHECK(code.code.size() <= limit);
  GROVE_FUZZ_CHECK(code.code.find('\0') == std::string::npos);
  GROVE_FUZZ_CHECK(completion.find(code.code) != std::string_view::npos);
  grove::fuzz::Sink(grove::fuzz::Digest(code.code.data(), code.code.size()));
  return 0;
}
