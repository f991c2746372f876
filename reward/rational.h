// Exact rational arithmetic on 64-bit parts that reports overflow instead of
// wrapping: the countdown verifier and the number normalizer need answers like
// 1/3*3 to be exactly 1, and a hostile 99999999999*99999999999*... to be
// rejected rather than silently wrong.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace grove::reward {

struct Rational {
  int64_t num = 0;
  int64_t den = 1;  // always > 0, gcd(num, den) == 1

  // Normalizes sign and gcd; nullopt when den == 0 or a part does not fit.
  static std::optional<Rational> Make(__int128 num, __int128 den);
  static Rational Int(int64_t v) { return Rational{v, 1}; }

  bool operator==(const Rational&) const = default;
  bool is_integer() const { return den == 1; }
  std::string ToString() const;  // "3", "-1/2"
};

// nullopt on overflow (and on division by zero for Div).
std::optional<Rational> Add(Rational a, Rational b);
std::optional<Rational> Sub(Rational a, Rational b);
std::optional<Rational> Mul(Rational a, Rational b);
std::optional<Rational> Div(Rational a, Rational b);

// Parses "12", "-0.25", "3/4", "-1.5/2" (decimal numerator and denominator).
// nullopt for anything else, or when it does not fit.
std::optional<Rational> ParseRational(std::string_view text);

}  // namespace grove::reward
