// Fuzz target: what verifiers do with model output and task references, both
// of which arrive from other processes (a completion is hostile by default):
// reward::ExtractAnswer, CheckFormat, Snippet, ParseExpression under default
// and strict limits, and the built-in verifiers through a VerifierRegistry.
//
// Input: byte 0 picks the verifier (format, exact, countdown, symbolic,
// overlong) and whether the reference comes from the input; the rest is the
// completion, and when bit 3 of byte 0 is set and the rest holds a NUL, the
// text after the first NUL is the reference JSON instead of a fixed valid one.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "reward/answer.h"
#include "reward/expression.h"
#include "reward/registry.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

namespace fuzz = grove::fuzz;
namespace reward = grove::reward;

struct Choice {
  const char* verifier;
  const char* reference;  // a valid reference for that verifier
};
constexpr Choice kChoices[] = {
    {"format", ""},
    {"exact", "{\"answer\": \"19\"}"},
    {"countdown", "{\"numbers\": [3, 7, 12], \"target\": 33}"},
    {"symbolic", "{\"expr\": \"6*x+2\", \"vars\": [\"x\"]}"},
    {"overlong", "{\"max_tokens\": 40, \"buffer\": 8}"},
};
constexpr size_t kChoiceCount = sizeof(kChoices) / sizeof(kChoices[0]);

void CheckExpression(std::string_view text, const reward::ExprLimits& limits) {
  auto parsed = reward::ParseExpression(text, limits);
  if (!parsed.ok()) return;
  const reward::Expr& e = parsed.value();
  GROVE_FUZZ_CHECK(!e.nodes.empty() && e.nodes.size() <= limits.max_nodes);
  GROVE_FUZZ_CHECK(e.root >= 0 && static_cast<size_t>(e.root) < e.nodes.size());
  for (const reward::ExprNode& n : e.nodes) {
    const int count = static_cast<int>(e.nodes.size());
    GROVE_FUZZ_CHECK(n.lhs >= -1 && n.lhs < count && n.rhs >= -1 && n.rhs < count);
    switch (n.op) {
      case reward::ExprOp::kNumber:
        GROVE_FUZZ_CHECK(!n.text.empty() && n.text.size() <= limits.max_number_digits + 1);
        break;
      case reward::ExprOp::kName:
        GROVE_FUZZ_CHECK(limits.allow_names && !n.text.empty());
        break;
      case reward::ExprOp::kCall:
      case reward::ExprOp::kNeg:
        GROVE_FUZZ_CHECK(n.lhs >= 0);
        break;
      case reward::ExprOp::kPow:
        GROVE_FUZZ_CHECK(limits.allow_power);
        [[fallthrough]];
      default:
        GROVE_FUZZ_CHECK(n.lhs >= 0 && n.rhs >= 0);
    }
  }
}

const reward::VerifierRegistry& Registry() {
  static const reward::VerifierRegistry* registry = new reward::VerifierRegistry();
  return *registry;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > 16 * 1024) return 0;
  const uint8_t mode = data[0];
  const Choice& choice = kChoices[(mode & 7) % kChoiceCount];
  std::string_view completion(reinterpret_cast<const char*>(data + 1), size - 1);
  std::string_view reference = choice.reference;
  if ((mode & 8) != 0) {
    if (size_t nul = completion.find('\0'); nul != std::string_view::npos) {
      reference = completion.substr(nul + 1);
      completion = completion.substr(0, nul);
    }
  }

  // Answer extraction: the view must point into the completion.
  reward::AnswerBlock block = reward::ExtractAnswer(completion);
  if (block.found) {
    GROVE_FUZZ_CHECK(block.text.data() >= completion.data() &&
                     block.text.data() + block.text.size() <= completion.data() + completion.size());
  } else {
    GROVE_FUZZ_CHECK(!block.error.empty());
  }
  fuzz::Sink(reward::CheckFormat(completion).size());
  std::string_view trimmed = reward::TrimSpace(completion);
  GROVE_FUZZ_CHECK(trimmed.size() <= completion.size());
  const std::string snippet = reward::Snippet(completion, 24);
  for (char c : snippet) GROVE_FUZZ_CHECK(c >= 0x20 && c < 0x7f);

  // The expression parser on the answer (as the verifiers call it) and on
  // the whole text, under the default and the strictest limits.
  reward::ExprLimits strict;
  strict.max_chars = 64;
  strict.max_depth = 4;
  strict.max_nodes = 16;
  strict.max_number_digits = 6;
  strict.allow_decimals = false;
  strict.allow_power = false;
  strict.allow_names = false;
  strict.allow_implicit_mul = false;
  for (std::string_view text : {block.text, completion}) {
    CheckExpression(text, reward::ExprLimits());
    CheckExpression(text, strict);
  }

  // The verifier, as the scoring pool calls it.
  auto verifier = Registry().Create(choice.verifier);
  if (!verifier.ok()) fuzz::Fail(__FILE__, __LINE__, "built-in verifier missing: " + std::string(choice.verifier));
  reward::VerifyInput input;
  input.prompt = "use 3 7 12 to make 33";
  input.completion = completion;
  input.reference = reference;
  input.token_count = (mode & 16) != 0 ? static_cast<long long>(completion.size()) : -1;
  reward::VerifyOutput out = verifier.value()->Verify(input);
  GROVE_FUZZ_CHECK(std::isfinite(out.reward));
  GROVE_FUZZ_CHECK(!out.reason.empty());
  for (const reward::SubScore& s : out.scores) GROVE_FUZZ_CHECK(std::isfinite(s.value));
  return 0;
}
