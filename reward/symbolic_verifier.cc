// The `symbolic` built-in: algebraic equivalence through GiNaC.
//
// Two checks, in order:
//  1. GiNaC's normal form of (answer - reference) is zero. This decides
//     rational-function identities exactly, e.g. (x+1)^2 == x^2+2*x+1.
//  2. Otherwise both sides are evaluated at 8 fixed pseudo-random points with
//     every variable in [0.15, 1.85] and compared with a relative tolerance of
//     1e-9. GiNaC does not apply trigonometric, exponential or logarithmic
//     identities in normal(), so sin(x)^2+cos(x)^2 vs 1 needs this step. It is
//     the standard randomized identity test: two different analytic
//     expressions agree at random real points only on a measure-zero set, and
//     the tolerance (far above double rounding of these small expressions, far
//     below any answer a task expects) makes a false accept need an answer
//     within 1e-9 of the truth at all 8 points. Points stay positive and
//     away from 0 so that log, sqrt and 1/x are defined on both sides.
// Hostile answers never reach GiNaC unchecked: the bounded parser runs first,
// exponents must be small constant rationals, and estimates of the polynomial
// degree and of coefficient size are capped before anything is expanded.
#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <ginac/ginac.h>
#include <nlohmann/json.hpp>

#include "reward/answer.h"
#include "reward/builtin_verifiers.h"
#include "reward/expression.h"
#include "reward/rational.h"

namespace grove::reward {
namespace {

using nlohmann::json;

constexpr size_t kMaxAnswerChars = 1000;
constexpr double kMaxDegree = 256;        // estimated polynomial degree after expansion
constexpr double kMaxCoefficientBits = 4096;
constexpr int64_t kMaxExponent = 64;
constexpr int64_t kMaxExponentDenominator = 12;
constexpr int kPoints = 8;
constexpr double kRelTolerance = 1e-9;

// GiNaC's reference counts and caches are not thread-safe; one lock keeps
// concurrent Verify() calls in one process correct (the pool uses processes).
std::mutex& GinacMutex() {
  static std::mutex m;
  return m;
}

struct Built {
  GiNaC::ex value;
  double degree = 0;  // upper estimate of the expanded polynomial degree
  double bits = 0;    // upper estimate of coefficient size in bits
  std::optional<Rational> constant;  // set when the subtree is a plain rational
};

class Builder {
 public:
  explicit Builder(const std::map<std::string, GiNaC::symbol>& vars) : vars_(vars) {}

  std::optional<Built> Build(const Expr& e, int i) {
    const ExprNode& n = e.at(i);
    switch (n.op) {
      case ExprOp::kNumber: {
        std::optional<Rational> r = ParseRational(n.text);
        Built b;
        if (r) {
          b.value = GiNaC::numeric(r->num) / GiNaC::numeric(r->den);
          b.constant = r;
        } else {
          // Too long for 64 bits: build exactly from the digits.
          size_t dot = n.text.find('.');
          std::string digits = n.text;
          int64_t scale = 0;
          if (dot != std::string::npos) {
            scale = static_cast<int64_t>(n.text.size() - dot - 1);
            digits.erase(dot, 1);
          }
          b.value = GiNaC::numeric(digits.c_str()) / GiNaC::pow(GiNaC::numeric(10), GiNaC::numeric(scale));
        }
        b.bits = 3.33 * static_cast<double>(n.text.size());
        return b;
      }
      case ExprOp::kName: {
        auto it = vars_.find(n.text);
        Built b;
        if (it != vars_.end()) {
          b.value = it->second;
          b.degree = 1;
          return b;
        }
        if (n.text == "pi") {
          b.value = GiNaC::Pi;
          b.bits = 2;
          return b;
        }
        return Fail("unknown symbol '" + Snippet(n.text, 12) + "'");
      }
      case ExprOp::kCall: {
        std::optional<Built> arg = Build(e, n.lhs);
        if (!arg) return std::nullopt;
        Built b;
        b.degree = 1;  // treated as an opaque symbol when expanding
        b.bits = arg->bits;
        const GiNaC::ex& x = arg->value;
        if (n.text == "sin") b.value = GiNaC::sin(x);
        else if (n.text == "cos") b.value = GiNaC::cos(x);
        else if (n.text == "tan") b.value = GiNaC::tan(x);
        else if (n.text == "exp") b.value = GiNaC::exp(x);
        else if (n.text == "log" || n.text == "ln") b.value = GiNaC::log(x);
        else if (n.text == "sqrt") b.value = GiNaC::sqrt(x);
        else if (n.text == "abs") b.value = GiNaC::abs(x);
        else return Fail("unknown function '" + Snippet(n.text, 12) + "'");
        return b;
      }
      case ExprOp::kNeg: {
        std::optional<Built> a = Build(e, n.lhs);
        if (!a) return std::nullopt;
        a->value = -a->value;
        if (a->constant) a->constant->num = -a->constant->num;
        return a;
      }
      case ExprOp::kPow:
        return BuildPower(e, n);
      default:
        return BuildBinary(e, n);
    }
  }

  const std::string& error() const { return error_; }

 private:
  std::optional<Built> Fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return std::nullopt;
  }

  std::optional<Built> Check(Built b) {
    if (b.degree > kMaxDegree) return Fail("expression degree too large");
    if (b.bits > kMaxCoefficientBits) return Fail("numbers too large");
    return b;
  }

  std::optional<Built> BuildBinary(const Expr& e, const ExprNode& n) {
    std::optional<Built> a = Build(e, n.lhs);
    if (!a) return std::nullopt;
    std::optional<Built> c = Build(e, n.rhs);
    if (!c) return std::nullopt;
    Built b;
    switch (n.op) {
      case ExprOp::kAdd:
      case ExprOp::kSub:
        b.degree = std::max(a->degree, c->degree);
        b.bits = std::max(a->bits, c->bits) + 1;
        if (a->constant && c->constant) b.constant = n.op == ExprOp::kAdd ? Add(*a->constant, *c->constant) : Sub(*a->constant, *c->constant);
        b.value = n.op == ExprOp::kAdd ? a->value + c->value : a->value - c->value;
        break;
      case ExprOp::kMul:
        b.degree = a->degree + c->degree;
        b.bits = a->bits + c->bits + 1;
        if (a->constant && c->constant) b.constant = Mul(*a->constant, *c->constant);
        b.value = a->value * c->value;
        break;
      case ExprOp::kDiv:
        if (c->constant && c->constant->num == 0) return Fail("division by zero");
        b.degree = a->degree + c->degree;
        b.bits = a->bits + c->bits + 1;
        if (a->constant && c->constant) b.constant = Div(*a->constant, *c->constant);
        b.value = a->value / c->value;  // GiNaC throws on an exact zero it finds later; caught by the caller
        break;
      default:
        return Fail("operator not allowed");
    }
    return Check(std::move(b));
  }

  std::optional<Built> BuildPower(const Expr& e, const ExprNode& n) {
    std::optional<Built> exponent = Build(e, n.rhs);
    if (!exponent) return std::nullopt;
    if (!exponent->constant) return Fail("exponent must be a small number");
    const Rational q = *exponent->constant;
    if (q.num > kMaxExponent || q.num < -kMaxExponent || q.den > kMaxExponentDenominator) {
      return Fail("exponent too large");
    }
    std::optional<Built> base = Build(e, n.lhs);
    if (!base) return std::nullopt;
    // GiNaC throws on 0^0 and 0^-n after allocating the power, which it then
    // leaks (found by fuzzing under LeakSanitizer): a verifier that lives for
    // days must refuse them first, also when the base is zero only after
    // GiNaC's simplification, as (x-x) is.
    if (q.num <= 0 && ((base->constant && base->constant->num == 0) || base->value.is_zero())) {
      return Fail(q.num == 0 ? "0^0 is undefined" : "division by zero");
    }
    const double magnitude = std::fabs(static_cast<double>(q.num) / static_cast<double>(q.den));
    Built b;
    b.degree = base->degree * std::max(1.0, magnitude);
    b.bits = (base->bits + 1) * std::max(1.0, magnitude);
    b.value = GiNaC::pow(base->value, GiNaC::numeric(q.num) / GiNaC::numeric(q.den));
    // Keep small integer powers of constants as constants, so that a tower
    // like 9^9^9 is judged by its real exponent (387420489: too large).
    if (base->constant && q.den == 1 && q.num >= 0) {
      std::optional<Rational> power = Rational::Int(1);
      for (int64_t k = 0; k < q.num && power; ++k) power = Mul(*power, *base->constant);
      b.constant = power;
    }
    return Check(std::move(b));
  }

  const std::map<std::string, GiNaC::symbol>& vars_;
  std::string error_;
};

std::optional<double> EvalAt(const GiNaC::ex& e, const GiNaC::exmap& point) {
  GiNaC::ex v = e.subs(point).evalf();
  if (!GiNaC::is_a<GiNaC::numeric>(v)) return std::nullopt;
  const GiNaC::numeric& num = GiNaC::ex_to<GiNaC::numeric>(v);
  if (!num.is_real()) return std::nullopt;
  double d = num.to_double();
  if (!std::isfinite(d)) return std::nullopt;
  return d;
}

class SymbolicVerifier final : public Verifier {
 public:
  VerifyOutput Verify(const VerifyInput& in) const override {
    std::string expected;
    std::vector<std::string> var_names = {"x"};
    json ref = json::parse(in.reference.begin(), in.reference.end(), nullptr, false);
    if (ref.is_string()) {
      expected = ref.get<std::string>();
    } else if (ref.is_object() && ref.contains("expr") && ref["expr"].is_string()) {
      expected = ref["expr"].get<std::string>();
      if (ref.contains("vars")) {
        if (!ref["vars"].is_array() || ref["vars"].size() > 8) return Zero("vars must be a list of at most 8 names");
        var_names.clear();
        for (const json& v : ref["vars"]) {
          if (!v.is_string() || v.get<std::string>().empty() || v.get<std::string>().size() > 16) {
            return Zero("vars must be short strings");
          }
          var_names.push_back(v.get<std::string>());
        }
      }
    } else {
      return Zero("reference must be an expression string or {\"expr\": str, \"vars\": [str]}");
    }

    AnswerBlock block = ExtractAnswer(in.completion);
    if (!block.found) return Zero(block.error);
    if (block.text.size() > kMaxAnswerChars) return Zero("answer longer than 1000 chars");
    std::string_view answer = TrimSpace(block.text);
    if (answer.empty()) return Zero("empty answer");

    ExprLimits limits;
    limits.max_chars = kMaxAnswerChars;
    limits.max_depth = 40;
    limits.max_nodes = 400;
    Result<Expr> got = ParseExpression(answer, limits);
    if (!got.ok()) return Zero(got.status().message());
    limits.max_chars = 4 * kMaxAnswerChars;
    Result<Expr> want = ParseExpression(expected, limits);
    if (!want.ok()) return Zero("reference: " + want.status().message());

    std::lock_guard<std::mutex> lock(GinacMutex());
    try {
      std::map<std::string, GiNaC::symbol> vars;
      for (const std::string& name : var_names) vars.emplace(name, GiNaC::symbol(name));
      Builder got_builder(vars), want_builder(vars);
      std::optional<Built> a = got_builder.Build(*got, got->root);
      if (!a) return Zero(got_builder.error());
      std::optional<Built> b = want_builder.Build(*want, want->root);
      if (!b) return Zero("reference: " + want_builder.error());

      GiNaC::ex difference = GiNaC::normal((a->value - b->value).expand());
      if (difference.is_zero()) return VerifyOutput::Make(1.0, "equal");

      std::mt19937_64 rng(0x5eed);
      std::uniform_real_distribution<double> uniform(0.15, 1.85);
      int compared = 0;
      for (int k = 0; k < kPoints; ++k) {
        GiNaC::exmap point;
        for (auto& [name, sym] : vars) {
          // Exact rationals, so that evalf of an exact expression stays exact until the end.
          point[sym] = GiNaC::numeric(static_cast<long>(uniform(rng) * 1e6)) / GiNaC::numeric(1000000);
        }
        std::optional<double> va = EvalAt(a->value, point);
        std::optional<double> vb = EvalAt(b->value, point);
        if (!va && !vb) continue;
        if (!va || !vb) return Zero("not equal (defined at different points)");
        double scale = std::max({1.0, std::fabs(*va), std::fabs(*vb)});
        if (std::fabs(*va - *vb) > kRelTolerance * scale) return Zero("not equal");
        ++compared;
      }
      if (compared < kPoints / 2) return Zero("could not evaluate at enough points");
      return VerifyOutput::Make(1.0, "equal at random points");
    } catch (const std::exception& e) {
      std::string what = e.what();
      if (what.find("division by zero") != std::string::npos || what.find("pole") != std::string::npos) {
        return Zero("division by zero");
      }
      return Zero("could not evaluate: " + Snippet(what, 60));
    } catch (...) {
      return Zero("could not evaluate");
    }
  }

 private:
  static VerifyOutput Zero(std::string reason) { return VerifyOutput::Make(0.0, std::move(reason)); }
};

}  // namespace

std::unique_ptr<Verifier> MakeSymbolicVerifier() { return std::make_unique<SymbolicVerifier>(); }

}  // namespace grove::reward
