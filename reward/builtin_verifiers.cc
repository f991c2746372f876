#include "reward/builtin_verifiers.h"

#include <map>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "reward/answer.h"
#include "reward/expression.h"
#include "reward/rational.h"

namespace grove::reward {
namespace {

using nlohmann::json;

// Answers longer than this are rejected before any parsing: no task here has
// answers near it, and it bounds every parser's work.
constexpr size_t kMaxAnswerChars = 1000;

std::optional<json> ParseReference(std::string_view text) {
  json value = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) return std::nullopt;
  return value;
}

VerifyOutput Zero(std::string reason) { return VerifyOutput::Make(0.0, std::move(reason)); }

// ---- format ------------------------------------------------------------------

class FormatVerifier final : public Verifier {
 public:
  VerifyOutput Verify(const VerifyInput& in) const override {
    std::string problem = CheckFormat(in.completion);
    return problem.empty() ? VerifyOutput::Make(1.0, "ok") : Zero(problem);
  }
};

// ---- exact -------------------------------------------------------------------

// Removes the wrappers people and models put around an answer.
std::string NormalizeAnswerText(std::string_view raw) {
  std::string_view s = TrimSpace(raw);
  for (int round = 0; round < 4; ++round) {
    std::string_view before = s;
    if (s.size() >= 2 && s.front() == '$' && s.back() == '$') s = TrimSpace(s.substr(1, s.size() - 2));
    if (s.starts_with("\\boxed{") && s.ends_with("}")) s = TrimSpace(s.substr(7, s.size() - 8));
    if (s.ends_with(".") && s.size() > 1) s = TrimSpace(s.substr(0, s.size() - 1));
    if (s == before) break;
  }
  // Collapse inner runs of whitespace to one space.
  std::string out;
  bool space = false;
  for (char c : s) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      space = true;
      continue;
    }
    if (space && !out.empty()) out.push_back(' ');
    space = false;
    out.push_back(c);
  }
  return out;
}

std::optional<Rational> AsNumber(const std::string& normalized) {
  std::string compact;
  for (char c : normalized) {
    if (c != ' ') compact.push_back(c);
  }
  return ParseRational(compact);
}

class ExactVerifier final : public Verifier {
 public:
  VerifyOutput Verify(const VerifyInput& in) const override {
    std::optional<json> ref = ParseReference(in.reference);
    if (!ref) return Zero("reference is not JSON");
    std::string expected;
    if (ref->is_object() && ref->contains("answer")) ref = (*ref)["answer"];
    if (ref->is_string()) {
      expected = ref->get<std::string>();
    } else if (ref->is_number_integer()) {
      expected = ref->dump();
    } else if (ref->is_number()) {
      return Zero("reference must be a string or an integer (floats are inexact)");
    } else {
      return Zero("reference must be a string, an integer or {\"answer\": ...}");
    }
    AnswerBlock block = ExtractAnswer(in.completion);
    if (!block.found) return Zero(block.error);
    if (block.text.size() > kMaxAnswerChars) return Zero("answer longer than 1000 chars");
    std::string got = NormalizeAnswerText(block.text);
    std::string want = NormalizeAnswerText(expected);
    if (got.empty()) return Zero("empty answer");
    std::optional<Rational> got_number = AsNumber(got);
    std::optional<Rational> want_number = AsNumber(want);
    if (want_number) {
      if (!got_number) return Zero("answer is not a number");
      return *got_number == *want_number ? VerifyOutput::Make(1.0, "ok") : Zero("wrong value");
    }
    return got == want ? VerifyOutput::Make(1.0, "ok") : Zero("mismatch");
  }
};

// ---- countdown ---------------------------------------------------------------

class CountdownVerifier final : public Verifier {
 public:
  VerifyOutput Verify(const VerifyInput& in) const override {
    std::optional<json> ref = ParseReference(in.reference);
    if (!ref || !ref->is_object() || !ref->contains("numbers") || !ref->contains("target") ||
        !(*ref)["numbers"].is_array() || !(*ref)["target"].is_number_integer()) {
      return Zero("reference must be {\"numbers\": [ints], \"target\": int}");
    }
    std::map<int64_t, int> available;
    for (const json& n : (*ref)["numbers"]) {
      if (!n.is_number_integer()) return Zero("reference numbers must be integers");
      ++available[n.get<int64_t>()];
    }
    const int64_t target = (*ref)["target"].get<int64_t>();

    AnswerBlock block = ExtractAnswer(in.completion);
    if (!block.found) return Zero(block.error);
    if (block.text.size() > kMaxAnswerChars) return Zero("answer longer than 1000 chars");
    std::string_view text = TrimSpace(block.text);
    // "expr = target" is a common way to write it; the left side is scored.
    if (size_t eq = text.find('='); eq != std::string_view::npos) text = TrimSpace(text.substr(0, eq));
    ExprLimits limits;
    limits.max_chars = kMaxAnswerChars;
    limits.max_number_digits = 18;
    limits.allow_decimals = false;
    limits.allow_power = false;
    limits.allow_names = false;
    limits.allow_implicit_mul = false;
    Result<Expr> expr = ParseExpression(text, limits);
    if (!expr.ok()) return Zero(expr.status().message());

    // Check the numbers used before evaluating.
    for (const ExprNode& node : expr->nodes) {
      if (node.op == ExprOp::kNeg) return Zero("unary minus not allowed");
      if (node.op != ExprOp::kNumber) continue;
      int64_t v = std::stoll(node.text);  // at most 18 digits: fits
      auto it = available.find(v);
      if (it == available.end()) return Zero("uses " + node.text + ", which is not given");
      if (--it->second < 0) return Zero("uses " + node.text + " more often than given");
    }
    std::string error;
    std::optional<Rational> value = Eval(*expr, expr->root, &error);
    if (!value) return Zero(error);
    if (*value != Rational::Int(target)) return Zero("evaluates to " + value->ToString() + ", not " + std::to_string(target));
    return VerifyOutput::Make(1.0, "ok");
  }

 private:
  // Depth is bounded by the parser's max_depth.
  static std::optional<Rational> Eval(const Expr& e, int i, std::string* error) {
    const ExprNode& n = e.at(i);
    if (n.op == ExprOp::kNumber) return Rational::Int(std::stoll(n.text));
    std::optional<Rational> a = Eval(e, n.lhs, error);
    if (!a) return std::nullopt;
    std::optional<Rational> b = Eval(e, n.rhs, error);
    if (!b) return std::nullopt;
    std::optional<Rational> r;
    switch (n.op) {
      case ExprOp::kAdd: r = Add(*a, *b); break;
      case ExprOp::kSub: r = Sub(*a, *b); break;
      case ExprOp::kMul: r = Mul(*a, *b); break;
      case ExprOp::kDiv:
        if (b->num == 0) {
          *error = "division by zero";
          return std::nullopt;
        }
        r = Div(*a, *b);
        break;
      default:
        *error = "operator not allowed";
        return std::nullopt;
    }
    if (!r) *error = "arithmetic overflow";
    return r;
  }
};

// ---- overlong ----------------------------------------------------------------

class OverlongVerifier final : public Verifier {
 public:
  VerifyOutput Verify(const VerifyInput& in) const override {
    std::optional<json> ref = ParseReference(in.reference);
    if (!ref || !ref->is_object() || !ref->contains("max_tokens") || !(*ref)["max_tokens"].is_number_integer()) {
      return Zero("reference must be {\"max_tokens\": int, \"buffer\": int}");
    }
    const int64_t max_tokens = (*ref)["max_tokens"].get<int64_t>();
    int64_t buffer = 0;
    if (ref->contains("buffer")) {
      if (!(*ref)["buffer"].is_number_integer()) return Zero("buffer must be an integer");
      buffer = (*ref)["buffer"].get<int64_t>();
    }
    if (max_tokens <= 0 || buffer < 0 || buffer > max_tokens) return Zero("need 0 <= buffer <= max_tokens, max_tokens > 0");
    int64_t length = in.token_count;
    if (length < 0) {
      // Characters: UTF-8 continuation bytes do not start one.
      length = 0;
      for (char c : in.completion) length += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
    }
    VerifyOutput out;
    const int64_t soft = max_tokens - buffer;
    if (length <= soft) {
      out = VerifyOutput::Make(0.0, "within length");
    } else if (length <= max_tokens) {
      out = VerifyOutput::Make(static_cast<double>(soft - length) / static_cast<double>(buffer), "in overlong buffer");
    } else {
      out = VerifyOutput::Make(-1.0, "over max_tokens");
    }
    out.scores.push_back({"length", static_cast<double>(length)});
    return out;
  }
};

}  // namespace

std::unique_ptr<Verifier> MakeFormatVerifier() { return std::make_unique<FormatVerifier>(); }
std::unique_ptr<Verifier> MakeExactVerifier() { return std::make_unique<ExactVerifier>(); }
std::unique_ptr<Verifier> MakeCountdownVerifier() { return std::make_unique<CountdownVerifier>(); }
std::unique_ptr<Verifier> MakeOverlongVerifier() { return std::make_unique<OverlongVerifier>(); }

}  // namespace grove::reward
