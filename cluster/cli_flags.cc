#include "cluster/cli_flags.h"

#include <sstream>

namespace grove::cli {

void FlagSet::String(const std::string& name, std::string* value, const std::string& help) {
  flags_.push_back({name, help, value->empty() ? "" : "\"" + *value + "\"", false,
                    [value](const std::string& v) {
                      *value = v;
                      return Status::OK();
                    }});
}

void FlagSet::Int(const std::string& name, int64_t* value, const std::string& help) {
  flags_.push_back({name, help, std::to_string(*value), false, [value, name](const std::string& v) {
                      try {
                        size_t used = 0;
                        int64_t parsed = std::stoll(v, &used);
                        if (used != v.size()) throw std::invalid_argument(v);
                        *value = parsed;
                        return Status::OK();
                      } catch (const std::exception&) {
                        return Status::InvalidArgument("--" + name + " wants an integer, got '" +
                                                       v + "'");
                      }
                    }});
}

void FlagSet::Bool(const std::string& name, bool* value, const std::string& help) {
  flags_.push_back({name, help, *value ? "true" : "false", true,
                    [value, name](const std::string& v) {
                      if (v == "true" || v == "1" || v.empty()) *value = true;
                      else if (v == "false" || v == "0") *value = false;
                      else return Status::InvalidArgument("--" + name + " wants true or false");
                      return Status::OK();
                    }});
}

void FlagSet::Repeated(const std::string& name, std::vector<std::string>* values,
                       const std::string& help) {
  flags_.push_back({name, help + " (repeatable)", "", false, [values](const std::string& v) {
                      values->push_back(v);
                      return Status::OK();
                    }});
}

Status FlagSet::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h" || arg == "-help") {
      help_ = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Flag* flag = nullptr;
    for (const auto& f : flags_) {
      if (f.name == name) flag = &f;
    }
    if (flag == nullptr) return Status::InvalidArgument("unknown flag --" + name);
    if (!has_value && !flag->is_bool) {
      if (i + 1 >= argc) return Status::InvalidArgument("--" + name + " needs a value");
      value = argv[++i];
    }
    GROVE_RETURN_IF_ERROR(flag->set(value));
  }
  return Status::OK();
}

std::string FlagSet::Usage() const {
  std::ostringstream out;
  out << "usage: " << usage_ << "\n\n" << summary_ << "\n";
  if (!flags_.empty()) out << "\nflags:\n";
  for (const auto& f : flags_) {
    out << "  --" << f.name << (f.is_bool ? "" : " VALUE") << "\n      " << f.help;
    if (!f.default_text.empty()) out << " (default " << f.default_text << ")";
    out << "\n";
  }
  return out.str();
}

}  // namespace grove::cli
