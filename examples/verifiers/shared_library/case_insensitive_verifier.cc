// Example plug-in, kind (b): a shared library loaded by path with dlopen.
//
// Scores 1 when the <answer> text equals the reference string ignoring ASCII
// case and surrounding spaces ("Paris" vs " paris "). It needs nothing but
// reward/verifier.h. Build and use:
//   g++ -std=c++20 -O2 -fPIC -shared -I<grove root> case_insensitive_verifier.cc \
//       -o libcase_insensitive_verifier.so
//   grove verify --plugin ./libcase_insensitive_verifier.so \
//                --verifiers format:0.1,case_insensitive:1 --input samples.jsonl
#include <cctype>
#include <string>
#include <string_view>

#include "reward/verifier.h"

namespace {

using grove::reward::VerifyInput;
using grove::reward::VerifyOutput;

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Decodes a JSON string literal with simple escapes; false when it is not one.
bool JsonString(std::string_view text, std::string* out) {
  text = Trim(text);
  if (text.size() < 2 || text.front() != '"' || text.back() != '"') return false;
  for (size_t i = 1; i + 1 < text.size(); ++i) {
    char c = text[i];
    if (c == '\\') {
      if (i + 2 >= text.size()) return false;
      char e = text[++i];
      if (e == 'n') c = '\n';
      else if (e == 't') c = '\t';
      else if (e == '"' || e == '\\' || e == '/') c = e;
      else return false;  // \uXXXX is not needed for this example
    }
    out->push_back(c);
  }
  return true;
}

class CaseInsensitiveVerifier final : public grove::reward::Verifier {
 public:
  VerifyOutput Verify(const VerifyInput& in) const override {
    std::string expected;
    if (!JsonString(in.reference, &expected)) return VerifyOutput::Make(0.0, "reference must be a JSON string");
    size_t think_end = in.completion.rfind("</think>");
    std::string_view rest = think_end == std::string_view::npos ? in.completion : in.completion.substr(think_end);
    size_t open = rest.find("<answer>");
    size_t close = rest.find("</answer>");
    if (open == std::string_view::npos || close == std::string_view::npos || close < open) {
      return VerifyOutput::Make(0.0, "no <answer> block");
    }
    std::string_view got = Trim(rest.substr(open + 8, close - open - 8));
    std::string_view want = Trim(expected);
    if (got.size() != want.size()) return VerifyOutput::Make(0.0, "mismatch");
    for (size_t i = 0; i < got.size(); ++i) {
      if (std::tolower(static_cast<unsigned char>(got[i])) != std::tolower(static_cast<unsigned char>(want[i]))) {
        return VerifyOutput::Make(0.0, "mismatch");
      }
    }
    return VerifyOutput::Make(1.0, "ok");
  }
};

}  // namespace

GROVE_VERIFIER_PLUGIN(CaseInsensitiveVerifier, "case_insensitive")
