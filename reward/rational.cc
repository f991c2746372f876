#include "reward/rational.h"

#include <limits>

namespace grove::reward {
namespace {

__int128 Gcd(__int128 a, __int128 b) {
  if (a < 0) a = -a;
  if (b < 0) b = -b;
  while (b != 0) {
    __int128 t = a % b;
    a = b;
    b = t;
  }
  return a;
}

bool Fits(__int128 v) {
  return v >= std::numeric_limits<int64_t>::min() + 1 && v <= std::numeric_limits<int64_t>::max();
}

// Parses an unsigned decimal "12.50" as num/den; nullopt when malformed or huge.
std::optional<Rational> ParseDecimal(std::string_view s) {
  if (s.empty() || s.size() > 40) return std::nullopt;
  __int128 num = 0, den = 1;
  bool dot = false, any_digit = false;
  for (char c : s) {
    if (c == '.') {
      if (dot) return std::nullopt;
      dot = true;
      continue;
    }
    if (c < '0' || c > '9') return std::nullopt;
    any_digit = true;
    num = num * 10 + (c - '0');
    if (dot) den *= 10;
    if (num > (static_cast<__int128>(1) << 100) || den > (static_cast<__int128>(1) << 100)) return std::nullopt;
  }
  if (!any_digit) return std::nullopt;
  return Rational::Make(num, den);
}

}  // namespace

std::optional<Rational> Rational::Make(__int128 num, __int128 den) {
  if (den == 0) return std::nullopt;
  if (den < 0) {
    num = -num;
    den = -den;
  }
  __int128 g = Gcd(num, den);
  if (g > 1) {
    num /= g;
    den /= g;
  }
  if (!Fits(num) || !Fits(den)) return std::nullopt;
  return Rational{static_cast<int64_t>(num), static_cast<int64_t>(den)};
}

std::string Rational::ToString() const {
  return den == 1 ? std::to_string(num) : std::to_string(num) + "/" + std::to_string(den);
}

// Each product of two 64-bit parts fits in 127 bits, and a sum of two such
// products in 128, so the __int128 intermediates below cannot overflow.
std::optional<Rational> Add(Rational a, Rational b) {
  return Rational::Make(static_cast<__int128>(a.num) * b.den + static_cast<__int128>(b.num) * a.den,
                        static_cast<__int128>(a.den) * b.den);
}
std::optional<Rational> Sub(Rational a, Rational b) {
  return Rational::Make(static_cast<__int128>(a.num) * b.den - static_cast<__int128>(b.num) * a.den,
                        static_cast<__int128>(a.den) * b.den);
}
std::optional<Rational> Mul(Rational a, Rational b) {
  return Rational::Make(static_cast<__int128>(a.num) * b.num, static_cast<__int128>(a.den) * b.den);
}
std::optional<Rational> Div(Rational a, Rational b) {
  if (b.num == 0) return std::nullopt;
  return Rational::Make(static_cast<__int128>(a.num) * b.den, static_cast<__int128>(a.den) * b.num);
}

std::optional<Rational> ParseRational(std::string_view text) {
  bool negative = false;
  if (!text.empty() && (text[0] == '-' || text[0] == '+')) {
    negative = text[0] == '-';
    text.remove_prefix(1);
  }
  size_t slash = text.find('/');
  std::optional<Rational> value;
  if (slash == std::string_view::npos) {
    value = ParseDecimal(text);
  } else {
    auto n = ParseDecimal(text.substr(0, slash));
    auto d = ParseDecimal(text.substr(slash + 1));
    if (!n || !d) return std::nullopt;
    value = Div(*n, *d);
  }
  if (!value) return std::nullopt;
  if (negative) value->num = -value->num;
  return value;
}

}  // namespace grove::reward
