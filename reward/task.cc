#include "reward/task.h"

#include <algorithm>
#include <functional>
#include <optional>

#include <nlohmann/json.hpp>

namespace grove::reward {
namespace {

using nlohmann::json;

uint64_t Mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A small generator whose output is fixed by its seed on every platform
// (std:: distributions are not), so problems are the same everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() { return Mix(state_ += 0x9e3779b97f4a7c15ULL); }
  int64_t Uniform(int64_t lo, int64_t hi) {  // inclusive
    return lo + static_cast<int64_t>(Next() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool Chance(double p) { return static_cast<double>(Next() >> 11) * 0x1.0p-53 < p; }

 private:
  uint64_t state_;
};

uint64_t PromptHash(std::string_view s) {  // FNV-1a, then mixed
  uint64_t h = 1469598103934665603ULL;
  for (char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ULL;
  }
  return Mix(h);
}

// Shared by all tasks: seeded attempts until the problem lands in the split.
class SplitTask : public Task {
 public:
  SplitTask(uint64_t seed, double eval_fraction) : seed_(seed), eval_fraction_(eval_fraction) {}

  Problem Generate(Split split, uint64_t index) const override {
    const bool want_eval = split == Split::kEval;
    Problem last;
    for (uint64_t attempt = 0; attempt < (uint64_t{1} << 16); ++attempt) {
      Rng rng(Mix(Mix(Mix(seed_) ^ (want_eval ? 0xe7a1ULL : 0x7a1dULL)) ^ index) ^ Mix(attempt));
      std::optional<Problem> p = Make(rng);
      if (!p) continue;
      if (IsEval(p->prompt) == want_eval) return *p;
      last = std::move(*p);
    }
    // Unreachable for configs MakeTask accepted (it checks both splits exist).
    return last;
  }

  bool IsEval(std::string_view prompt) const {
    return static_cast<double>(PromptHash(prompt) % 1000000) < eval_fraction_ * 1e6;
  }

 protected:
  // One candidate problem, or nullopt to draw again.
  virtual std::optional<Problem> Make(Rng& rng) const = 0;

 private:
  uint64_t seed_;
  double eval_fraction_;
};

std::string Demo(const std::string& thinking, const std::string& answer) {
  return "<think>" + thinking + "</think><answer>" + answer + "</answer>";
}

// ---- arithmetic --------------------------------------------------------------

class ArithmeticTask final : public SplitTask {
 public:
  ArithmeticTask(uint64_t seed, double eval_fraction, int min_digits, int max_digits, std::string ops)
      : SplitTask(seed, eval_fraction), min_digits_(min_digits), max_digits_(max_digits), ops_(std::move(ops)) {}
  std::string_view name() const override { return "arithmetic"; }
  std::string verifier_spec() const override { return "format:0.1,exact:1"; }

 protected:
  std::optional<Problem> Make(Rng& rng) const override {
    int64_t a = Operand(rng), b = Operand(rng);
    char op = ops_[static_cast<size_t>(rng.Uniform(0, static_cast<int64_t>(ops_.size()) - 1))];
    if (op == '-' && a < b) std::swap(a, b);  // non-negative answers at every difficulty
    int64_t value = op == '+' ? a + b : op == '-' ? a - b : a * b;
    std::string expr = std::to_string(a) + op + std::to_string(b);
    std::string answer = std::to_string(value);
    const std::string thinking = op == '*' ? expr + "=" + answer : ColumnSteps(a, b, op);
    return Problem{expr + "=", json(answer).dump(), Demo(thinking, answer)};
  }

 private:
  // The working of a + b or a - b (a >= b) column by column from the ones,
  // as a person writes it: "8+7=15,5+6+1=12" for 58+67, "12-8=4,5-1-3=1"
  // for 52-38. A small model that learns one column at a time, carry
  // included, can add numbers longer than any it was shown.
  static std::string ColumnSteps(int64_t a, int64_t b, char op) {
    std::string out;
    int64_t carry = 0;
    while (a > 0 || b > 0 || (op == '+' && carry > 0)) {
      const int64_t da = a % 10, db = b % 10;
      if (!out.empty()) out += ',';
      if (op == '+') {
        const int64_t sum = da + db + carry;
        out += std::to_string(da) + "+" + std::to_string(db) + (carry ? "+1" : "") + "=" + std::to_string(sum);
        carry = sum / 10;
      } else {
        const int64_t top = da - carry;
        const int64_t borrow = top < db ? 1 : 0;
        out += std::to_string(da + 10 * borrow) + (carry ? "-1" : "") + "-" + std::to_string(db) + "=" +
               std::to_string(top + 10 * borrow - db);
        carry = borrow;
      }
      a /= 10;
      b /= 10;
      if (op == '-' && a == 0 && b == 0) break;
    }
    return out.empty() ? "0" + std::string(1, op) + "0=0" : out;
  }

  int64_t Operand(Rng& rng) const {
    int digits = static_cast<int>(rng.Uniform(min_digits_, max_digits_));
    int64_t lo = 1, hi = 9;
    for (int i = 1; i < digits; ++i) {
      lo *= 10;
      hi = hi * 10 + 9;
    }
    if (digits == 1) lo = 0;
    return rng.Uniform(lo, hi);
  }
  int min_digits_, max_digits_;
  std::string ops_;
};

// ---- countdown ---------------------------------------------------------------

class CountdownTask final : public SplitTask {
 public:
  CountdownTask(uint64_t seed, double eval_fraction, int count, int max_number, int max_target)
      : SplitTask(seed, eval_fraction), count_(count), max_number_(max_number), max_target_(max_target) {}
  std::string_view name() const override { return "countdown"; }
  std::string verifier_spec() const override { return "format:0.1,countdown:1"; }

 protected:
  std::optional<Problem> Make(Rng& rng) const override {
    std::vector<int64_t> numbers;
    for (int i = 0; i < count_; ++i) numbers.push_back(rng.Uniform(1, max_number_));
    // Build a solution by folding the numbers in a shuffled order; every
    // intermediate value stays a positive integer.
    std::vector<int64_t> order = numbers;
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[static_cast<size_t>(rng.Uniform(0, static_cast<int64_t>(i) - 1))]);
    int64_t acc = order[0];
    std::string expr = std::to_string(acc);
    std::string steps;
    for (size_t i = 1; i < order.size(); ++i) {
      const int64_t n = order[i];
      std::vector<char> ops = {'+'};
      if (acc > n) ops.push_back('-');
      if (acc * n <= max_target_) ops.push_back('*');
      if (n > 1 && acc % n == 0) ops.push_back('/');
      char op = ops[static_cast<size_t>(rng.Uniform(0, static_cast<int64_t>(ops.size()) - 1))];
      int64_t next = op == '+' ? acc + n : op == '-' ? acc - n : op == '*' ? acc * n : acc / n;
      steps += (steps.empty() ? "" : ",") + std::to_string(acc) + op + std::to_string(n) + "=" + std::to_string(next);
      expr = (i > 1 ? "(" + expr + ")" : expr) + op + std::to_string(n);
      acc = next;
    }
    // A target that is one of the numbers needs no arithmetic at all.
    if (acc < 1 || acc > max_target_ || std::find(numbers.begin(), numbers.end(), acc) != numbers.end()) {
      return std::nullopt;
    }
    std::string prompt = "use";
    for (int64_t n : numbers) prompt += " " + std::to_string(n);
    prompt += " to make " + std::to_string(acc);
    json ref = {{"numbers", numbers}, {"target", acc}};
    return Problem{prompt, ref.dump(), Demo(steps, expr)};
  }

 private:
  int count_, max_number_, max_target_;
};

// ---- symbolic ----------------------------------------------------------------

using Poly = std::vector<int64_t>;  // coefficient of x^i at [i]

std::string PolyText(const Poly& p) {
  std::string out;
  for (size_t k = p.size(); k > 0; --k) {
    const size_t i = k - 1;
    const int64_t c = p[i];
    if (c == 0) continue;
    if (c < 0) out += "-";
    else if (!out.empty()) out += "+";
    const int64_t mag = c < 0 ? -c : c;
    if (mag != 1 || i == 0) out += std::to_string(mag);
    if (i >= 1) out += "x";
    if (i >= 2) out += "^" + std::to_string(i);
  }
  return out.empty() ? "0" : out;
}

Poly Multiply(const Poly& a, const Poly& b) {
  Poly out(a.size() + b.size() - 1, 0);
  for (size_t i = 0; i < a.size(); ++i) {
    for (size_t j = 0; j < b.size(); ++j) out[i + j] += a[i] * b[j];
  }
  return out;
}

class SymbolicTask final : public SplitTask {
 public:
  SymbolicTask(uint64_t seed, double eval_fraction, int max_degree, int max_coefficient, bool diff, bool expand)
      : SplitTask(seed, eval_fraction),
        max_degree_(max_degree),
        max_coefficient_(max_coefficient),
        diff_(diff),
        expand_(expand) {}
  std::string_view name() const override { return "symbolic"; }
  std::string verifier_spec() const override { return "format:0.1,symbolic:1"; }

 protected:
  std::optional<Problem> Make(Rng& rng) const override {
    bool diff = diff_ && (!expand_ || rng.Chance(0.5));
    return diff ? MakeDiff(rng) : MakeExpand(rng);
  }

 private:
  int64_t Coefficient(Rng& rng, bool nonzero) const {
    int64_t c;
    do {
      c = rng.Uniform(-max_coefficient_, max_coefficient_);
    } while (nonzero && c == 0);
    return c;
  }

  std::optional<Problem> MakeDiff(Rng& rng) const {
    const int degree = static_cast<int>(rng.Uniform(1, max_degree_));
    Poly p(static_cast<size_t>(degree) + 1);
    for (int i = 0; i < degree; ++i) p[static_cast<size_t>(i)] = Coefficient(rng, false);
    p[static_cast<size_t>(degree)] = Coefficient(rng, true);
    Poly d(p.size() - 1);
    std::string steps;
    for (size_t i = 1; i < p.size(); ++i) {
      d[i - 1] = static_cast<int64_t>(i) * p[i];
      if (p[i] != 0) {
        Poly term(i + 1, 0), dterm(i, 0);
        term[i] = p[i];
        dterm[i - 1] = d[i - 1];
        steps += (steps.empty() ? "" : ",") + PolyText(term) + " to " + PolyText(dterm);
      }
    }
    std::string answer = PolyText(d);
    return Problem{"diff " + PolyText(p), json(answer).dump(), Demo(steps, answer)};
  }

  std::optional<Problem> MakeExpand(Rng& rng) const {
    const int factors = max_degree_ >= 3 && rng.Chance(0.3) ? 3 : 2;
    Poly product = {1};
    std::string prompt = "expand ";
    std::string steps;  // the running product after each factor past the first
    for (int f = 0; f < factors; ++f) {
      // (a x + b) with a in 1..2 so the numbers stay small.
      Poly factor = {Coefficient(rng, true), rng.Chance(0.7) ? 1 : 2};
      product = Multiply(product, factor);
      prompt += "(" + PolyText({factor[0], factor[1]}) + ")";
      if (f > 0 && f + 1 < factors) steps += PolyText(product) + ",";
    }
    std::string answer = PolyText(product);
    return Problem{prompt, json(answer).dump(), Demo(steps + answer, answer)};
  }

  int max_degree_, max_coefficient_;
  bool diff_, expand_;
};

// ---- python ------------------------------------------------------------------

// Small stdin/stdout programs, scored by running them on hidden test cases in
// the sandbox (python_tests). The prompt states the function; the reference
// holds `tests` inputs drawn from the problem's own generator and the
// outputs computed here.
class PythonTask final : public SplitTask {
 public:
  PythonTask(uint64_t seed, double eval_fraction, int tests, int64_t max_n)
      : SplitTask(seed, eval_fraction), tests_(tests), max_n_(max_n) {}
  std::string_view name() const override { return "python"; }
  std::string verifier_spec() const override { return "format:0.1,python_tests:1"; }

 protected:
  std::optional<Problem> Make(Rng& rng) const override {
    // Each kind: prompt, the program that solves it, the function itself,
    // and whether it reads two numbers.
    struct Kind {
      std::string prompt, code;
      std::function<int64_t(int64_t, int64_t)> f;
      bool two = false;
    };
    Kind k;
    const int64_t a = rng.Uniform(2, 20), b = rng.Uniform(0, 50);
    switch (rng.Uniform(0, 4)) {
      case 0:
        k = {"read n, print " + std::to_string(a) + "*n+" + std::to_string(b),
             "print(" + std::to_string(a) + "*n+" + std::to_string(b) + ")", [a, b](int64_t n, int64_t) { return a * n + b; }};
        break;
      case 1:
        k = {"read n, print n*n+" + std::to_string(b), "print(n*n+" + std::to_string(b) + ")",
             [b](int64_t n, int64_t) { return n * n + b; }};
        break;
      case 2:
        k = {"read n, print n mod " + std::to_string(a), "print(n%" + std::to_string(a) + ")",
             [a](int64_t n, int64_t) { return n % a; }};
        break;
      case 3: {
        const int64_t c = rng.Uniform(1, 9);
        k = {"read x y, print " + std::to_string(c) + "*x+" + std::to_string(a) + "*y",
             "print(" + std::to_string(c) + "*x+" + std::to_string(a) + "*y)",
             [a, c](int64_t x, int64_t y) { return c * x + a * y; }, true};
        break;
      }
      default:
        k = {"read n, print the digit sum of n", "print(sum(map(int,str(n))))", [](int64_t n, int64_t) {
               int64_t sum = 0;
               for (; n > 0; n /= 10) sum += n % 10;
               return sum;
             }};
        break;
    }
    json tests = json::array();
    for (int i = 0; i < tests_; ++i) {
      const int64_t x = rng.Uniform(0, max_n_), y = rng.Uniform(0, max_n_);
      std::string input = k.two ? std::to_string(x) + " " + std::to_string(y) + "\n" : std::to_string(x) + "\n";
      tests.push_back({{"input", input}, {"output", std::to_string(k.f(x, y)) + "\n"}});
    }
    const std::string read = k.two ? "x,y=map(int,input().split())\n" : "n=int(input())\n";
    json reference = {{"tests", tests}};
    return Problem{k.prompt, reference.dump(), Demo(k.prompt.substr(k.prompt.find(',') + 2), read + k.code)};
  }

 private:
  int tests_;
  int64_t max_n_;
};

Result<uint64_t> Seed(const Config& c) {
  GROVE_ASSIGN_OR_RETURN(int64_t seed, c.Int("seed", 1));
  return static_cast<uint64_t>(seed);
}

Result<double> EvalFraction(const Config& c) {
  GROVE_ASSIGN_OR_RETURN(double f, c.Double("eval_fraction", 0.1));
  if (!(f > 0.0 && f < 1.0)) return Status::InvalidArgument("eval_fraction must be in (0, 1)");
  return f;
}

Status InRange(const char* key, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    return Status::InvalidArgument(std::string(key) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                                   "], got " + std::to_string(v));
  }
  return Status::OK();
}

Result<std::unique_ptr<Task>> MakeUnchecked(std::string_view name, const Config& c) {
  GROVE_ASSIGN_OR_RETURN(uint64_t seed, Seed(c));
  GROVE_ASSIGN_OR_RETURN(double eval_fraction, EvalFraction(c));
  if (name == "arithmetic") {
    GROVE_RETURN_IF_ERROR(c.CheckKeys({"name", "seed", "eval_fraction", "min_digits", "max_digits", "ops"}));
    GROVE_ASSIGN_OR_RETURN(int64_t min_digits, c.Int("min_digits", 1));
    GROVE_ASSIGN_OR_RETURN(int64_t max_digits, c.Int("max_digits", 2));
    GROVE_ASSIGN_OR_RETURN(std::string ops, c.String("ops", "+-*"));
    GROVE_RETURN_IF_ERROR(InRange("min_digits", min_digits, 1, 9));
    GROVE_RETURN_IF_ERROR(InRange("max_digits", max_digits, min_digits, 9));
    if (ops.empty() || ops.find_first_not_of("+-*") != std::string::npos) {
      return Status::InvalidArgument("ops must be a non-empty string over \"+-*\", got \"" + ops + "\"");
    }
    return std::unique_ptr<Task>(new ArithmeticTask(seed, eval_fraction, static_cast<int>(min_digits),
                                                    static_cast<int>(max_digits), ops));
  }
  if (name == "countdown") {
    GROVE_RETURN_IF_ERROR(c.CheckKeys({"name", "seed", "eval_fraction", "count", "max_number", "max_target"}));
    GROVE_ASSIGN_OR_RETURN(int64_t count, c.Int("count", 3));
    GROVE_ASSIGN_OR_RETURN(int64_t max_number, c.Int("max_number", 20));
    GROVE_ASSIGN_OR_RETURN(int64_t max_target, c.Int("max_target", 200));
    GROVE_RETURN_IF_ERROR(InRange("count", count, 2, 6));
    GROVE_RETURN_IF_ERROR(InRange("max_number", max_number, 2, 1000));
    GROVE_RETURN_IF_ERROR(InRange("max_target", max_target, 10, 1000000));
    return std::unique_ptr<Task>(new CountdownTask(seed, eval_fraction, static_cast<int>(count),
                                                   static_cast<int>(max_number), static_cast<int>(max_target)));
  }
  if (name == "symbolic") {
    GROVE_RETURN_IF_ERROR(c.CheckKeys({"name", "seed", "eval_fraction", "max_degree", "max_coefficient", "modes"}));
    GROVE_ASSIGN_OR_RETURN(int64_t max_degree, c.Int("max_degree", 3));
    GROVE_ASSIGN_OR_RETURN(int64_t max_coefficient, c.Int("max_coefficient", 5));
    GROVE_ASSIGN_OR_RETURN(std::string modes, c.String("modes", "diff,expand"));
    GROVE_RETURN_IF_ERROR(InRange("max_degree", max_degree, 1, 6));
    GROVE_RETURN_IF_ERROR(InRange("max_coefficient", max_coefficient, 1, 20));
    bool diff = false, expand = false;
    size_t start = 0;
    while (start <= modes.size()) {
      size_t comma = modes.find(',', start);
      std::string mode = modes.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (mode == "diff") diff = true;
      else if (mode == "expand") expand = true;
      else return Status::InvalidArgument("unknown symbolic mode '" + mode + "' (use diff, expand)");
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    return std::unique_ptr<Task>(new SymbolicTask(seed, eval_fraction, static_cast<int>(max_degree),
                                                  static_cast<int>(max_coefficient), diff, expand));
  }
  if (name == "python") {
    GROVE_RETURN_IF_ERROR(c.CheckKeys({"name", "seed", "eval_fraction", "tests", "max_n"}));
    GROVE_ASSIGN_OR_RETURN(int64_t tests, c.Int("tests", 5));
    GROVE_ASSIGN_OR_RETURN(int64_t max_n, c.Int("max_n", 1000));
    GROVE_RETURN_IF_ERROR(InRange("tests", tests, 1, 20));
    GROVE_RETURN_IF_ERROR(InRange("max_n", max_n, 1, 1000000000));
    return std::unique_ptr<Task>(new PythonTask(seed, eval_fraction, static_cast<int>(tests), max_n));
  }
  return Status::NotFound("no task named '" + std::string(name) + "' (known: arithmetic, countdown, symbolic, python)");
}

}  // namespace

Result<std::unique_ptr<Task>> MakeTask(std::string_view name, const Config& section) {
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<Task> task, MakeUnchecked(name, section));
  // A config whose problem space is too small for both splits is refused here
  // rather than producing a wrong split later.
  const auto* split_task = static_cast<const SplitTask*>(task.get());
  for (Split split : {Split::kTrain, Split::kEval}) {
    Problem p = task->Generate(split, 0);
    if (split_task->IsEval(p.prompt) != (split == Split::kEval)) {
      return Status::InvalidArgument(std::string(name) + ": config leaves too few distinct problems for a " +
                                     (split == Split::kEval ? "held-out eval" : "train") + " split");
    }
  }
  return task;
}

std::vector<std::string> TaskNames() { return {"arithmetic", "countdown", "symbolic", "python"}; }

bool IsPromptText(std::string_view text) {
  for (char c : text) {
    bool ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || c == ' ' || c == '\n' || c == '^' ||
              std::string_view("+-*/()=.,").find(c) != std::string_view::npos;
    if (!ok) return false;
  }
  return true;
}

}  // namespace grove::reward
