// FlagSet: per-subcommand flags for the `grove` tool. gflags keeps one global
// flag namespace, which cannot give each subcommand its own --help; this
// small parser does, and rejects unknown flags with a clear message.
// Accepts --name=value, --name value, and --name for booleans.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/status.h"

namespace grove::cli {

class FlagSet {
 public:
  FlagSet(std::string usage, std::string summary)
      : usage_(std::move(usage)), summary_(std::move(summary)) {}

  void String(const std::string& name, std::string* value, const std::string& help);
  void Int(const std::string& name, int64_t* value, const std::string& help);
  void Bool(const std::string& name, bool* value, const std::string& help);
  // A flag that may repeat (e.g. --set a=1 --set b=2).
  void Repeated(const std::string& name, std::vector<std::string>* values, const std::string& help);

  // Parses argv[first..]; non-flag words go to positional(). Sets help()
  // on --help/-h. InvalidArgument for an unknown flag or a bad value.
  Status Parse(int argc, char** argv, int first);
  bool help() const { return help_; }
  const std::vector<std::string>& positional() const { return positional_; }
  std::string Usage() const;

 private:
  struct Flag {
    std::string name, help, default_text;
    bool is_bool = false;
    std::function<Status(const std::string&)> set;
  };
  std::string usage_, summary_;
  std::vector<Flag> flags_;
  std::vector<std::string> positional_;
  bool help_ = false;
};

}  // namespace grove::cli
