// Example plug-in, kind (a): a C++ class compiled into grove.
//
// Rewards a completion whose <think> section holds at least `min_words` words
// (reference {"min_words": N}; 3 when absent), a nudge against empty thinking.
// It registers itself under "think_length": add this file to the sources of
// the program that scores (not to a static library, whose unreferenced
// objects the linker drops), or call registry.Register("think_length", ...)
// from main() instead of using the macro.
#include <cctype>
#include <string>
#include <string_view>

#include "reward/registry.h"
#include "reward/verifier.h"

namespace {

using grove::reward::VerifyInput;
using grove::reward::VerifyOutput;

class ThinkLengthVerifier final : public grove::reward::Verifier {
 public:
  VerifyOutput Verify(const VerifyInput& in) const override {
    long min_words = 3;
    // The reference is tiny JSON; a digit scan after the key is enough here.
    if (size_t key = in.reference.find("\"min_words\""); key != std::string_view::npos) {
      size_t digit = in.reference.find_first_of("0123456789", key);
      if (digit != std::string_view::npos) {
        min_words = 0;
        while (digit < in.reference.size() && std::isdigit(static_cast<unsigned char>(in.reference[digit])) &&
               min_words < 1000000) {
          min_words = min_words * 10 + (in.reference[digit++] - '0');
        }
      }
    }
    size_t open = in.completion.find("<think>");
    size_t close = in.completion.find("</think>");
    if (open == std::string_view::npos || close == std::string_view::npos || close < open) {
      return VerifyOutput::Make(0.0, "no <think> section");
    }
    std::string_view thinking = in.completion.substr(open + 7, close - open - 7);
    long words = 0;
    bool in_word = false;
    for (char c : thinking) {
      bool space = std::isspace(static_cast<unsigned char>(c)) != 0 || c == ',';
      if (!space && !in_word) ++words;
      in_word = !space;
    }
    VerifyOutput out = words >= min_words ? VerifyOutput::Make(1.0, "ok")
                                          : VerifyOutput::Make(0.0, "thinking too short");
    out.scores.push_back({"words", static_cast<double>(words)});
    return out;
  }
};

}  // namespace

GROVE_REGISTER_VERIFIER(ThinkLengthVerifier, "think_length");
