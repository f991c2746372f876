#include "reward/expression.h"

#include <cctype>

#include "reward/answer.h"

namespace grove::reward {
namespace {

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsNameStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsNameChar(char c) { return IsNameStart(c) || IsDigit(c); }

class Parser {
 public:
  Parser(std::string_view text, const ExprLimits& limits) : s_(text), limits_(limits) {}

  Result<Expr> Run() {
    if (s_.size() > limits_.max_chars) {
      return Status::InvalidArgument("expression longer than " + std::to_string(limits_.max_chars) + " chars");
    }
    for (char c : s_) {
      unsigned char u = static_cast<unsigned char>(c);
      if (u >= 0x80 || (u < 0x20 && c != '\n' && c != '\t' && c != '\r')) {
        return Status::InvalidArgument("non-ASCII or control byte in expression");
      }
    }
    int root = Sum(0);
    if (!error_.empty()) return Status::InvalidArgument(error_);
    SkipSpace();
    if (pos_ != s_.size()) return Status::InvalidArgument("unexpected '" + Snippet(s_.substr(pos_), 8) + "'");
    expr_.root = root;
    return std::move(expr_);
  }

 private:
  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  char Peek() {
    SkipSpace();
    return pos_ < s_.size() ? s_[pos_] : '\0';
  }
  bool PeekPower() {
    char c = Peek();
    if (c == '^') return true;
    return c == '*' && pos_ + 1 < s_.size() && s_[pos_ + 1] == '*';
  }
  int Fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return -1;
  }
  int Add(ExprOp op, std::string text, int lhs, int rhs) {
    if (expr_.nodes.size() >= limits_.max_nodes) {
      return Fail("expression has more than " + std::to_string(limits_.max_nodes) + " nodes");
    }
    expr_.nodes.push_back(ExprNode{op, std::move(text), lhs, rhs});
    return static_cast<int>(expr_.nodes.size()) - 1;
  }
  bool Enter(int depth) {
    if (depth > limits_.max_depth) {
      Fail("expression nested deeper than " + std::to_string(limits_.max_depth));
      return false;
    }
    return error_.empty();
  }

  int Sum(int depth) {
    if (!Enter(depth)) return -1;
    int lhs = Product(depth + 1);
    while (error_.empty()) {
      char c = Peek();
      if (c != '+' && c != '-') break;
      ++pos_;
      int rhs = Product(depth + 1);
      if (!error_.empty()) return -1;
      lhs = Add(c == '+' ? ExprOp::kAdd : ExprOp::kSub, "", lhs, rhs);
    }
    return error_.empty() ? lhs : -1;
  }

  bool StartsPrimary(char c) { return IsDigit(c) || c == '(' || (c == '.' && limits_.allow_decimals) || IsNameStart(c); }

  int Product(int depth) {
    if (!Enter(depth)) return -1;
    int lhs = Unary(depth + 1);
    while (error_.empty()) {
      char c = Peek();
      ExprOp op;
      if ((c == '*' && !PeekPower()) || c == '/') {
        ++pos_;
        op = c == '*' ? ExprOp::kMul : ExprOp::kDiv;
      } else if (limits_.allow_implicit_mul && StartsPrimary(c)) {
        op = ExprOp::kMul;
      } else {
        break;
      }
      int rhs = Unary(depth + 1);
      if (!error_.empty()) return -1;
      lhs = Add(op, "", lhs, rhs);
    }
    return error_.empty() ? lhs : -1;
  }

  int Unary(int depth) {
    if (!Enter(depth)) return -1;
    char c = Peek();
    if (c == '+' || c == '-') {
      ++pos_;
      int operand = Unary(depth + 1);
      if (!error_.empty()) return -1;
      return c == '-' ? Add(ExprOp::kNeg, "", operand, -1) : operand;
    }
    return Power(depth + 1);
  }

  int Power(int depth) {
    if (!Enter(depth)) return -1;
    int base = Primary(depth + 1);
    if (!error_.empty()) return -1;
    if (PeekPower()) {
      if (!limits_.allow_power) return Fail("'^' not allowed here");
      pos_ += s_[pos_] == '^' ? 1 : 2;
      int exponent = Unary(depth + 1);
      if (!error_.empty()) return -1;
      return Add(ExprOp::kPow, "", base, exponent);
    }
    return base;
  }

  int Primary(int depth) {
    if (!Enter(depth)) return -1;
    char c = Peek();
    if (c == '(') {
      ++pos_;
      int inner = Sum(depth + 1);
      if (!error_.empty()) return -1;
      if (Peek() != ')') return Fail("missing ')'");
      ++pos_;
      return inner;
    }
    if (IsDigit(c) || c == '.') {
      size_t begin = pos_;
      size_t digits = 0;
      bool dot = false;
      while (pos_ < s_.size() && (IsDigit(s_[pos_]) || s_[pos_] == '.')) {
        if (s_[pos_] == '.') {
          if (dot || !limits_.allow_decimals) return Fail(dot ? "malformed number" : "decimals not allowed here");
          dot = true;
        } else {
          ++digits;
        }
        ++pos_;
      }
      if (digits == 0) return Fail("malformed number");
      if (digits > limits_.max_number_digits) return Fail("number with more than " + std::to_string(limits_.max_number_digits) + " digits");
      return Add(ExprOp::kNumber, std::string(s_.substr(begin, pos_ - begin)), -1, -1);
    }
    if (IsNameStart(c)) {
      if (!limits_.allow_names) return Fail("names not allowed here");
      size_t begin = pos_;
      while (pos_ < s_.size() && IsNameChar(s_[pos_]) && pos_ - begin < 32) ++pos_;
      if (pos_ < s_.size() && IsNameChar(s_[pos_])) return Fail("name too long");
      std::string name(s_.substr(begin, pos_ - begin));
      if (Peek() == '(') {
        ++pos_;
        int arg = Sum(depth + 1);
        if (!error_.empty()) return -1;
        if (Peek() != ')') return Fail("missing ')' after argument of " + name);
        ++pos_;
        return Add(ExprOp::kCall, std::move(name), arg, -1);
      }
      return Add(ExprOp::kName, std::move(name), -1, -1);
    }
    if (c == '\0') return Fail("expression ends early");
    return Fail("unexpected '" + Snippet(s_.substr(pos_), 8) + "'");
  }

  std::string_view s_;
  const ExprLimits& limits_;
  size_t pos_ = 0;
  Expr expr_;
  std::string error_;
};

}  // namespace

Result<Expr> ParseExpression(std::string_view text, const ExprLimits& limits) {
  return Parser(text, limits).Run();
}

}  // namespace grove::reward
