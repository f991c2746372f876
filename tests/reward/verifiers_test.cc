// The built-in verifiers, the bounded expression parser, exact rationals and
// weighted composition.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "reward/answer.h"
#include "reward/builtin_verifiers.h"
#include "reward/composite_verifier.h"
#include "reward/expression.h"
#include "reward/rational.h"
#include "reward/registry.h"
#include "reward/scoring_pool.h"

namespace grove::reward {
namespace {

VerifyOutput Check(const std::string& name, const std::string& completion, const std::string& reference,
                 long long token_count = -1) {
  VerifierRegistry registry;
  Result<std::unique_ptr<Verifier>> v = registry.Create(name);
  EXPECT_TRUE(v.ok()) << v.status();
  return (*v)->Verify(VerifyInput{"prompt", completion, reference, token_count});
}

std::string Answer(const std::string& answer) { return "<think>work</think><answer>" + answer + "</answer>"; }

// ---- format -------------------------------------------------------------------

TEST(FormatVerifier, AcceptsTagsOnceInOrder) {
  EXPECT_EQ(Check("format", "<think>a</think><answer>1</answer>", "").reward, 1.0);
  EXPECT_EQ(Check("format", "  <think>a\nb</think>\n<answer> 1 </answer>\n", "").reward, 1.0);
}

TEST(FormatVerifier, RejectsBrokenStructure) {
  struct Case {
    const char* completion;
    const char* reason_part;
  } cases[] = {
      {"<answer>1</answer>", "<think> missing"},
      {"<think>a</think>", "<answer> missing"},
      {"<answer>1</answer><think>a</think>", "before <think>"},
      {"<think>a</think><answer>1</answer><answer>2</answer>", "appears 2 times"},
      {"<think>a</think>x<answer>1</answer>", "between"},
      {"<think>a</think><answer>1</answer>trailing", "after </answer>"},
      {"<think><answer>1</answer></think>", "out of order"},
  };
  for (const Case& c : cases) {
    VerifyOutput out = Check("format", c.completion, "");
    EXPECT_EQ(out.reward, 0.0) << c.completion;
    EXPECT_NE(out.reason.find(c.reason_part), std::string::npos) << c.completion << " -> " << out.reason;
  }
}

// ---- answer extraction ------------------------------------------------------

TEST(ExtractAnswer, OnlyAfterThinkingAndOnlyOnce) {
  EXPECT_EQ(ExtractAnswer("<think>x</think><answer>42</answer>").text, "42");
  EXPECT_EQ(ExtractAnswer("<think><answer>42</answer></think>").error, "answer only inside <think>");
  EXPECT_EQ(ExtractAnswer("<think>the answer is 42</think>").error, "no <answer> block");
  EXPECT_EQ(ExtractAnswer("<answer>1</answer><answer>2</answer>").error, "2 <answer> blocks");
  EXPECT_EQ(ExtractAnswer("<answer>1").error, "unclosed <answer> block");
}

// ---- exact ------------------------------------------------------------------

TEST(ExactVerifier, NormalizesNumbers) {
  for (const char* answer : {"1/2", "0.5", "\\boxed{0.5}", " 0.50 ", "$\\boxed{1/2}$", "2/4", "0.5."}) {
    EXPECT_EQ(Check("exact", Answer(answer), "\"0.5\"").reward, 1.0) << answer;
    EXPECT_EQ(Check("exact", Answer(answer), "\"1/2\"").reward, 1.0) << answer;
  }
  EXPECT_EQ(Check("exact", Answer("19"), "19").reward, 1.0);  // integer reference
  EXPECT_EQ(Check("exact", Answer("-7"), "{\"answer\": \"-7\"}").reward, 1.0);
  EXPECT_EQ(Check("exact", Answer("0.333"), "\"1/3\"").reward, 0.0);
  VerifyOutput wrong = Check("exact", Answer("20"), "\"19\"");
  EXPECT_EQ(wrong.reward, 0.0);
  EXPECT_EQ(wrong.reason, "wrong value");
  EXPECT_EQ(Check("exact", Answer("nineteen"), "\"19\"").reason, "answer is not a number");
}

TEST(ExactVerifier, ComparesTextWhenNotANumber) {
  EXPECT_EQ(Check("exact", Answer("  x  =  3 "), "\"x = 3\"").reward, 1.0);
  EXPECT_EQ(Check("exact", Answer("Paris"), "\"paris\"").reward, 0.0);
}

TEST(ExactVerifier, RejectsHostileCompletions) {
  EXPECT_EQ(Check("exact", "<think><answer>5</answer></think>", "\"5\"").reason, "answer only inside <think>");
  EXPECT_EQ(Check("exact", "<think>5</think>", "\"5\"").reason, "no <answer> block");
  EXPECT_EQ(Check("exact", "<think>a</think><answer>5</answer><answer>5</answer>", "\"5\"").reason, "2 <answer> blocks");
  std::string huge(10 << 20, '7');
  VerifyOutput big = Check("exact", Answer(huge), "\"7\"");
  EXPECT_EQ(big.reward, 0.0);
  EXPECT_NE(big.reason.find("longer than"), std::string::npos);
  VerifyOutput bad_utf8 = Check("exact", Answer("\xff\xfe\xc3"), "\"5\"");
  EXPECT_EQ(bad_utf8.reward, 0.0);
  EXPECT_EQ(Check("exact", Answer("5"), "not json").reason, "reference is not JSON");
  EXPECT_EQ(Check("exact", Answer("1/0"), "\"0.5\"").reward, 0.0);
}

// ---- countdown ----------------------------------------------------------------

constexpr char kCountdownRef[] = R"({"numbers": [3, 7, 12, 3], "target": 33})";

TEST(CountdownVerifier, AcceptsCorrectExpressions) {
  EXPECT_EQ(Check("countdown", Answer("(3*7)+12"), kCountdownRef).reward, 1.0);
  EXPECT_EQ(Check("countdown", Answer("12 + 7*3 = 33"), kCountdownRef).reward, 1.0);
  EXPECT_EQ(Check("countdown", Answer("12*3-3"), kCountdownRef).reward, 1.0);  // 3 is given twice
  // Exact rationals: 1/3*3 is exactly 1 (floating point would give 0.999...).
  EXPECT_EQ(Check("countdown", Answer("(7/3)*3*12-51"), R"({"numbers":[7,3,3,12,51],"target":33})").reward, 1.0);
}

TEST(CountdownVerifier, RejectsRuleBreaks) {
  EXPECT_NE(Check("countdown", Answer("3*7+12+3+3"), kCountdownRef).reason.find("more often"), std::string::npos);
  EXPECT_NE(Check("countdown", Answer("30+3"), kCountdownRef).reason.find("not given"), std::string::npos);
  EXPECT_NE(Check("countdown", Answer("3*7+3"), kCountdownRef).reason.find("evaluates to 24"), std::string::npos);
  EXPECT_EQ(Check("countdown", Answer("12/(3-3)+7"), kCountdownRef).reason, "division by zero");
  EXPECT_EQ(Check("countdown", Answer("-3+36"), R"({"numbers":[3,36],"target":33})").reason, "unary minus not allowed");
  EXPECT_EQ(Check("countdown", Answer("9^9^9^9"), R"({"numbers":[9,9,9,9],"target":1})").reason, "'^' not allowed here");
  EXPECT_EQ(Check("countdown", Answer("3.5*2"), kCountdownRef).reason, "decimals not allowed here");
  EXPECT_EQ(Check("countdown", Answer("3*7+12"), R"({"numbers":"3 7 12"})").reward, 0.0);
}

TEST(CountdownVerifier, OverflowIsAnErrorNotAWrongNumber) {
  const std::string ref = R"({"numbers":[999999999999,999999999999,999999999999],"target":1})";
  VerifyOutput out = Check("countdown", Answer("999999999999*999999999999*999999999999"), ref);
  EXPECT_EQ(out.reward, 0.0);
  EXPECT_EQ(out.reason, "arithmetic overflow");
}

TEST(CountdownVerifier, DeepNestingIsRejectedByTheParser) {
  std::string deep = std::string(400, '(') + "3" + std::string(400, ')');
  EXPECT_NE(Check("countdown", Answer(deep), R"({"numbers":[3],"target":3})").reason.find("nested deeper"),
            std::string::npos);
}

// ---- symbolic -----------------------------------------------------------------

TEST(SymbolicVerifier, AcceptsEquivalentForms) {
  EXPECT_EQ(Check("symbolic", Answer("(x+1)^2"), "\"x^2+2*x+1\"").reward, 1.0);
  EXPECT_EQ(Check("symbolic", Answer("x^2 + 2x + 1"), "\"(x+1)^2\"").reward, 1.0);  // implicit *
  EXPECT_EQ(Check("symbolic", Answer("1"), "\"sin(x)^2+cos(x)^2\"").reward, 1.0);
  EXPECT_EQ(Check("symbolic", Answer("sin(x)**2+cos(x)**2"), "\"1\"").reward, 1.0);
  EXPECT_EQ(Check("symbolic", Answer("0.5*x"), "\"x/2\"").reward, 1.0);
  EXPECT_EQ(Check("symbolic", Answer("y*x + 1"), R"({"expr": "x*y+1", "vars": ["x", "y"]})").reward, 1.0);
  EXPECT_EQ(Check("symbolic", Answer("log(exp(2x))"), "\"2*x\"").reward, 1.0);
}

TEST(SymbolicVerifier, RejectsDifferentExpressions) {
  EXPECT_EQ(Check("symbolic", Answer("x^2+2x"), "\"(x+1)^2\"").reason, "not equal");
  EXPECT_EQ(Check("symbolic", Answer("sin(x)^2"), "\"1\"").reason, "not equal");
  EXPECT_EQ(Check("symbolic", Answer("x+1.000001"), "\"x+1\"").reward, 0.0);
  EXPECT_NE(Check("symbolic", Answer("z+1"), "\"x+1\"").reason.find("unknown symbol"), std::string::npos);
  EXPECT_NE(Check("symbolic", Answer("foo(x)"), "\"x\"").reason.find("unknown function"), std::string::npos);
}

// Found by fuzzing (tests/fuzz, reward target, LeakSanitizer): GiNaC leaks
// the power it was building when it throws on 0^0 or 0^-n, so these are
// refused before GiNaC sees them, with their own reason.
TEST(SymbolicVerifier, ZeroToANonPositivePowerIsRefusedBeforeGinac) {
  EXPECT_EQ(Check("symbolic", Answer("0^0"), "\"1\"").reason, "0^0 is undefined");
  EXPECT_EQ(Check("symbolic", Answer("sin(x)(x)^0^0+cos(x)^1"), "\"1\"").reason, "0^0 is undefined");
  EXPECT_EQ(Check("symbolic", Answer("(x-x)^0"), "\"1\"").reason, "0^0 is undefined");
  EXPECT_EQ(Check("symbolic", Answer("(x-x)^(-2)"), "\"1\"").reason, "division by zero");
  EXPECT_EQ(Check("symbolic", Answer("x^0"), "\"1\"").reward, 1.0);
  EXPECT_EQ(Check("symbolic", Answer("0^2+1"), "\"1\"").reward, 1.0);
}

TEST(SymbolicVerifier, HostileAnswersAreRefusedBeforeGinac) {
  EXPECT_EQ(Check("symbolic", Answer("9^9^9^9"), "\"1\"").reason, "exponent too large");
  EXPECT_EQ(Check("symbolic", Answer("(x+1)^1000"), "\"1\"").reason, "exponent too large");
  EXPECT_EQ(Check("symbolic", Answer("((((x+1)^60)^60)^60)"), "\"1\"").reason, "expression degree too large");
  EXPECT_EQ(Check("symbolic", Answer("(x+1)^60*(x+1)^60*(x+1)^60*(x+1)^60*(x+1)^60"), "\"1\"").reason,
            "expression degree too large");
  EXPECT_EQ(Check("symbolic", Answer("x^x"), "\"1\"").reason, "exponent must be a small number");
  EXPECT_EQ(Check("symbolic", Answer("1/0"), "\"1\"").reason, "division by zero");
  EXPECT_EQ(Check("symbolic", Answer("1/(x-x)"), "\"1\"").reason, "division by zero");
  EXPECT_EQ(Check("symbolic", Answer("0^(-1)"), "\"1\"").reason, "division by zero");
  std::string deep = std::string(100000, '(') + "x" + std::string(100000, ')');
  EXPECT_EQ(Check("symbolic", Answer(deep), "\"x\"").reward, 0.0);
  EXPECT_EQ(Check("symbolic", Answer(std::string(10 << 20, 'x')), "\"x\"").reason, "answer longer than 1000 chars");
  EXPECT_EQ(Check("symbolic", Answer("x\xff+1"), "\"x+1\"").reason, "non-ASCII or control byte in expression");
  EXPECT_EQ(Check("symbolic", "<think><answer>x</answer></think>", "\"x\"").reason, "answer only inside <think>");
  EXPECT_EQ(Check("symbolic", "<think>a</think><answer>x</answer><answer>x</answer>", "\"x\"").reason,
            "2 <answer> blocks");
}

// ---- overlong -----------------------------------------------------------------

// DAPO's soft overlong punishment, written out independently.
double DapoPenalty(double length, double max_tokens, double buffer) {
  if (length <= max_tokens - buffer) return 0.0;
  if (length <= max_tokens) return ((max_tokens - buffer) - length) / buffer;
  return -1.0;
}

TEST(OverlongVerifier, MatchesDapoShapingOnRandomLengths) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    int max_tokens = std::uniform_int_distribution<int>(10, 400)(rng);
    int buffer = std::uniform_int_distribution<int>(1, max_tokens)(rng);
    int length = std::uniform_int_distribution<int>(0, max_tokens + 50)(rng);
    std::string ref = "{\"max_tokens\":" + std::to_string(max_tokens) + ",\"buffer\":" + std::to_string(buffer) + "}";
    EXPECT_NEAR(Check("overlong", std::string(static_cast<size_t>(length), 'a'), ref).reward,
                DapoPenalty(length, max_tokens, buffer), 1e-12);
    // An explicit token count wins over the character count.
    EXPECT_NEAR(Check("overlong", "short", ref, length).reward, DapoPenalty(length, max_tokens, buffer), 1e-12);
  }
  EXPECT_EQ(Check("overlong", "\xc3\xa9\xc3\xa9", R"({"max_tokens":3,"buffer":1})").reward, 0.0);  // 2 characters
  EXPECT_EQ(Check("overlong", "x", R"({"max_tokens":3,"buffer":5})").reward, 0.0);
  EXPECT_NE(Check("overlong", "x", R"({"max_tokens":3,"buffer":5})").reason.find("buffer"), std::string::npos);
}

// ---- parser and rationals -----------------------------------------------------

TEST(Rational, MatchesLongDoubleOnRandomOperands) {
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<int64_t> part(-100000, 100000);
  for (int trial = 0; trial < 2000; ++trial) {
    int64_t an = part(rng), ad = std::max<int64_t>(1, std::llabs(part(rng)));
    int64_t bn = part(rng), bd = std::max<int64_t>(1, std::llabs(part(rng)));
    Rational a = *Rational::Make(an, ad), b = *Rational::Make(bn, bd);
    long double x = static_cast<long double>(an) / ad, y = static_cast<long double>(bn) / bd;
    auto value = [](Rational r) { return static_cast<long double>(r.num) / r.den; };
    EXPECT_NEAR(value(*Add(a, b)), x + y, 1e-12L * (1 + std::fabs(x + y)));
    EXPECT_NEAR(value(*Sub(a, b)), x - y, 1e-12L * (1 + std::fabs(x - y)));
    EXPECT_NEAR(value(*Mul(a, b)), x * y, 1e-12L * (1 + std::fabs(x * y)));
    if (bn != 0) {
      EXPECT_NEAR(value(*Div(a, b)), x / y, 1e-9L * (1 + std::fabs(x / y)));
    }
  }
  EXPECT_FALSE(Mul(Rational::Int(int64_t{1} << 40), Rational::Int(int64_t{1} << 40)).has_value());
  EXPECT_FALSE(Div(Rational::Int(1), Rational::Int(0)).has_value());
  EXPECT_EQ(ParseRational("-1.5/2")->ToString(), "-3/4");
  EXPECT_FALSE(ParseRational("1/0").has_value());
}

TEST(ExpressionParser, EnforcesLimits) {
  ExprLimits limits;
  limits.max_nodes = 10;
  EXPECT_NE(ParseExpression("1+1+1+1+1+1+1+1", limits).status().message().find("nodes"), std::string::npos);
  limits = ExprLimits();
  EXPECT_TRUE(ParseExpression("-x^2 + 3(x+1)(x-1) ** 2", limits).ok());
  EXPECT_FALSE(ParseExpression("1+", limits).ok());
  EXPECT_FALSE(ParseExpression("(1", limits).ok());
  EXPECT_FALSE(ParseExpression(std::string(100, '9'), limits).ok());
  Result<Expr> e = ParseExpression("-x^2", limits);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->at(e->root).op, ExprOp::kNeg);  // -(x^2), not (-x)^2
}

// ---- composition ----------------------------------------------------------------

TEST(CompositeVerifier, WeightsFromTextAndConfigAgree) {
  Result<std::vector<WeightedVerifier>> text = ParseVerifierSpec("format:0.1, exact:1");
  ASSERT_TRUE(text.ok()) << text.status();
  Result<Config> config = Config::Parse("[reward.verifiers]\nformat = 0.1\nexact = 1\n");
  ASSERT_TRUE(config.ok());
  Result<std::vector<WeightedVerifier>> from_config = VerifierSpecFromConfig(config->Section("reward.verifiers"));
  ASSERT_TRUE(from_config.ok()) << from_config.status();
  auto by_name = [](const WeightedVerifier& a, const WeightedVerifier& b) { return a.name < b.name; };
  std::vector<WeightedVerifier> a = *text, b = *from_config;
  std::sort(a.begin(), a.end(), by_name);
  std::sort(b.begin(), b.end(), by_name);
  EXPECT_EQ(FormatVerifierSpec(a), FormatVerifierSpec(b));

  VerifierRegistry registry;
  auto composite = MakeCompositeVerifier(registry, *text);
  ASSERT_TRUE(composite.ok());
  VerifyOutput out = (*composite)->Verify(VerifyInput{"", "<think>a</think><answer>0.5</answer>", "\"1/2\""});
  EXPECT_NEAR(out.reward, 1.1, 1e-12);
  ASSERT_EQ(out.scores.size(), 2u);
  EXPECT_EQ(out.scores[0].name, "format");
  EXPECT_EQ(out.scores[1].name, "exact");
  out = (*composite)->Verify(VerifyInput{"", "<answer>0.5</answer>", "\"1/2\""});
  EXPECT_NEAR(out.reward, 1.0, 1e-12);  // right answer, broken format
  EXPECT_NE(out.reason.find("format: <think> missing"), std::string::npos) << out.reason;
}

TEST(CompositeVerifier, BadSpecsAreClearErrors) {
  EXPECT_FALSE(ParseVerifierSpec("").ok());
  EXPECT_FALSE(ParseVerifierSpec("format:abc").ok());
  EXPECT_FALSE(ParseVerifierSpec("format,format").ok());
  EXPECT_FALSE(ParseVerifierSpec("format,,exact").ok());
  EXPECT_EQ(ParseVerifierSpec("exact")->at(0).weight, 1.0);
  VerifierRegistry registry;
  auto missing = MakeCompositeVerifier(registry, *ParseVerifierSpec("nope:1"));
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("known: "), std::string::npos);
  EXPECT_EQ(registry.Register("format", MakeFormatVerifier).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.Register("Bad Name", MakeFormatVerifier).code(), StatusCode::kInvalidArgument);
}

// Every hostile case, through the pool with a time limit: none may time out
// or crash; each ends with its own reason.
TEST(HostileInputs, FinishWithinTheTimeLimitInThePool) {
  VerifierRegistry registry;
  auto verifier = MakeCompositeVerifier(registry, *ParseVerifierSpec("format:0.1,exact,countdown,symbolic"));
  ASSERT_TRUE(verifier.ok());
  ScoringPoolOptions options;
  options.num_workers = 2;
  options.sample_timeout = std::chrono::milliseconds(10000);
  auto pool = ScoringPool::Start(std::shared_ptr<const Verifier>(std::move(*verifier)), options);
  ASSERT_TRUE(pool.ok());
  std::vector<std::string> completions = {
      Answer("9^9^9^9"), Answer(std::string(5000, '(') + "1" + std::string(5000, ')')),
      Answer(std::string(10 << 20, '1')), Answer("\xc0\xaf\xff"), Answer("1/0"),
      "<think><answer>3</answer></think>", Answer("1") + Answer("1"),
      Answer("(2^64)^64*(3^64)^64"),
  };
  std::vector<VerifyInput> inputs;
  for (const std::string& c : completions) inputs.push_back(VerifyInput{"", c, R"({"numbers":[1],"target":1})"});
  std::vector<VerifyOutput> out = (*pool)->Score(inputs);
  ASSERT_EQ(out.size(), inputs.size());
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(out[i].reason.find("timed out"), std::string::npos) << i << ": " << out[i].reason;
    EXPECT_EQ(out[i].reason.find("crashed"), std::string::npos) << i << ": " << out[i].reason;
    EXPECT_LT(out[i].reward, 1.0) << i << ": " << out[i].reason;  // no accuracy credit for any of them
  }
  EXPECT_EQ((*pool)->stats().failed, 0u);
}

}  // namespace
}  // namespace grove::reward
