// Config: a parsed TOML experiment file with typed, path-addressed reads.
//
// Contract: every getter takes a dotted path ("learner.lr"). A missing key
// yields the fallback when one is given, otherwise NotFound; a key of the
// wrong type is always InvalidArgument naming the path, the expected type and
// the file, so a wrong config fails at start with a message a person can act
// on. The TOML library stays out of this header.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace grove {

class Config {
 public:
  Config();  // empty table
  ~Config();
  Config(const Config&);
  Config& operator=(const Config&);
  Config(Config&&) noexcept;
  Config& operator=(Config&&) noexcept;

  static Result<Config> LoadFile(const std::string& path);
  static Result<Config> Parse(std::string_view toml_text, std::string source_name = "<string>");

  bool Has(std::string_view path) const;

  Result<int64_t> Int(std::string_view path, std::optional<int64_t> fallback = std::nullopt) const;
  // Integers are accepted where a float is wanted.
  Result<double> Double(std::string_view path, std::optional<double> fallback = std::nullopt) const;
  Result<bool> Bool(std::string_view path, std::optional<bool> fallback = std::nullopt) const;
  Result<std::string> String(std::string_view path,
                             std::optional<std::string> fallback = std::nullopt) const;
  Result<std::vector<int64_t>> IntList(std::string_view path,
                                       std::optional<std::vector<int64_t>> fallback = std::nullopt) const;
  Result<std::vector<double>> DoubleList(std::string_view path,
                                         std::optional<std::vector<double>> fallback = std::nullopt) const;
  Result<std::vector<std::string>> StringList(
      std::string_view path, std::optional<std::vector<std::string>> fallback = std::nullopt) const;

  // The table at `path` as its own Config (empty when absent). Paths in its
  // error messages stay full ("learner.optimizer.lr").
  Config Section(std::string_view path) const;
  // Sub-tables of an array of tables ([[actors]]), in order.
  Result<std::vector<Config>> TableArray(std::string_view path) const;
  // Keys directly under this table, in file order.
  std::vector<std::string> Keys() const;
  // InvalidArgument naming the first key of this table not in `allowed`
  // (catches typos such as "leraning_rate").
  Status CheckKeys(const std::vector<std::string_view>& allowed) const;

  // Applies "a.b.c=VALUE" where VALUE is a TOML value (1e-4, "text", true,
  // [1,2]); bare words are taken as strings. Used by --set flags and tests.
  Status Override(std::string_view assignment);

  std::string ToToml() const;
  // Where this config came from (file path or "<string>"), for messages.
  const std::string& source() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
  std::string prefix_;  // dotted path of this section inside the root
};

}  // namespace grove
