// A bounded parser for the arithmetic and algebra that answers are written in.
//
// Model output is hostile by default, so nothing reaches an evaluator or GiNaC
// before this parser has checked it: a length limit, a nesting-depth limit and
// a node-count limit are enforced while parsing (recursion never goes deeper
// than max_depth), only whitelisted characters are accepted, and numbers are
// bounded in digits. Grammar (usual precedence, ^ right-associative and above
// unary minus, so -x^2 is -(x^2)):
//   sum     := product (('+'|'-') product)*
//   product := unary (('*'|'/') unary | <implicit *> unary)*
//   unary   := ('+'|'-') unary | power
//   power   := primary ('^' unary)?          ("**" is read as "^")
//   primary := number | name | name '(' sum ')' | '(' sum ')'
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace grove::reward {

struct ExprLimits {
  size_t max_chars = 2000;
  int max_depth = 48;
  size_t max_nodes = 1000;
  size_t max_number_digits = 60;
  bool allow_decimals = true;       // 0.5
  bool allow_power = true;          // ^ and **
  bool allow_names = true;          // variables and function calls
  bool allow_implicit_mul = true;   // 2x, 3(x+1), (x+1)(x-1)
};

enum class ExprOp { kNumber, kName, kCall, kNeg, kAdd, kSub, kMul, kDiv, kPow };

struct ExprNode {
  ExprOp op;
  std::string text;  // digits of a number ("12.5"), a name, or a function name
  int lhs = -1;      // operand (the only one for kNeg and kCall)
  int rhs = -1;
};

struct Expr {
  std::vector<ExprNode> nodes;
  int root = -1;
  const ExprNode& at(int i) const { return nodes[static_cast<size_t>(i)]; }
};

// InvalidArgument with a short reason on bad syntax or any limit exceeded.
Result<Expr> ParseExpression(std::string_view text, const ExprLimits& limits);

}  // namespace grove::reward
