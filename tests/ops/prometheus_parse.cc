#include "tests/ops/prometheus_parse.h"

#include <cmath>
#include <cstdlib>
#include <sstream>

namespace grove::testing {
namespace {

bool NameChar(char c, bool first) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
         (!first && c >= '0' && c <= '9');
}

}  // namespace

Result<Samples> ParseExposition(const std::string& text) {
  Samples out;
  std::istringstream in(text);
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    auto bad = [&](const std::string& why) {
      return Status::Corruption("line " + std::to_string(number) + ": " + why + ": " + line);
    };
    if (line.empty() || line[0] == '#') continue;
    size_t i = 0;
    while (i < line.size() && NameChar(line[i], i == 0)) ++i;
    if (i == 0) return bad("no metric name");
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        const size_t start = i;
        while (i < line.size() && NameChar(line[i], i == start)) ++i;
        if (i == start || i + 1 >= line.size() || line[i] != '=' || line[i + 1] != '"') {
          return bad("bad label");
        }
        i += 2;
        while (i < line.size() && line[i] != '"') {
          if (line[i] == '\\') {
            if (i + 1 >= line.size() || (line[i + 1] != '\\' && line[i + 1] != '"' && line[i + 1] != 'n')) {
              return bad("bad escape");
            }
            ++i;
          }
          ++i;
        }
        if (i >= line.size()) return bad("unterminated label value");
        ++i;  // closing quote
        if (i < line.size() && line[i] == ',') ++i;
        else if (i < line.size() && line[i] != '}') return bad("want , or }");
      }
      if (i >= line.size()) return bad("unterminated labels");
      ++i;
    }
    if (i >= line.size() || line[i] != ' ') return bad("want a space before the value");
    const std::string key = line.substr(0, i);
    const std::string value = line.substr(i + 1);
    double v = 0;
    if (value == "NaN") v = NAN;
    else if (value == "+Inf") v = INFINITY;
    else if (value == "-Inf") v = -INFINITY;
    else {
      char* end = nullptr;
      v = std::strtod(value.c_str(), &end);
      if (value.empty() || end != value.c_str() + value.size()) return bad("bad value");
    }
    if (!out.emplace(key, v).second) return bad("duplicate sample");
  }
  return out;
}

}  // namespace grove::testing
