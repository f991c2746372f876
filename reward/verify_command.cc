#include "reward/verify_command.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "reward/composite_verifier.h"
#include "reward/registry.h"
#include "reward/scoring_pool.h"

namespace grove::reward {
namespace {

using nlohmann::json;

constexpr char kUsage[] =
    "usage: grove verify --verifiers NAME[:WEIGHT],... --input FILE.jsonl|-\n"
    "                    [--plugin PATH.so]... [--external NAME=COMMAND]...\n"
    "                    [--workers N] [--timeout_ms MS] [--external_timeout_ms MS]\n";

struct Options {
  std::string verifiers;
  std::string input;
  std::vector<std::string> plugins;
  std::vector<std::string> externals;
  int workers = 2;
  long timeout_ms = 5000;
  long external_timeout_ms = 2000;
};

// Accepts "--name value" and "--name=value".
bool ParseArgs(int argc, char** argv, Options* o, std::string* error) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_value = false;
    if (size_t eq = arg.find('='); arg.starts_with("--") && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    auto take = [&]() -> bool {
      if (has_value) return true;
      if (i + 1 >= argc) {
        *error = arg + " needs a value";
        return false;
      }
      value = argv[++i];
      return true;
    };
    auto number = [&](long* out, long lo, long hi) -> bool {
      if (!take()) return false;
      char* end = nullptr;
      long v = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || v < lo || v > hi) {
        *error = arg + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
        return false;
      }
      *out = v;
      return true;
    };
    long n = 0;
    if (arg == "--verifiers") {
      if (!take()) return false;
      o->verifiers = value;
    } else if (arg == "--input") {
      if (!take()) return false;
      o->input = value;
    } else if (arg == "--plugin") {
      if (!take()) return false;
      o->plugins.push_back(value);
    } else if (arg == "--external") {
      if (!take()) return false;
      o->externals.push_back(value);
    } else if (arg == "--workers") {
      if (!number(&n, 1, 256)) return false;
      o->workers = static_cast<int>(n);
    } else if (arg == "--timeout_ms") {
      if (!number(&o->timeout_ms, 1, 3600000)) return false;
    } else if (arg == "--external_timeout_ms") {
      if (!number(&o->external_timeout_ms, 1, 3600000)) return false;
    } else if (arg == "--help" || arg == "-h") {
      *error = "";
      return false;
    } else {
      *error = "unknown option " + arg;
      return false;
    }
  }
  if (o->verifiers.empty() || o->input.empty()) {
    *error = "--verifiers and --input are required";
    return false;
  }
  return true;
}

struct Line {
  std::string prompt, completion, reference;
  long long token_count = -1;
  std::string error;  // set when the line is malformed
};

Line ParseLine(const std::string& text) {
  Line line;
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    line.error = "input line is not a JSON object";
    return line;
  }
  if (!j.contains("completion") || !j["completion"].is_string()) {
    line.error = "input line has no string \"completion\"";
    return line;
  }
  line.completion = j["completion"].get<std::string>();
  if (j.contains("prompt")) {
    if (!j["prompt"].is_string()) {
      line.error = "\"prompt\" must be a string";
      return line;
    }
    line.prompt = j["prompt"].get<std::string>();
  }
  if (j.contains("reference")) line.reference = j["reference"].dump(-1, ' ', false, json::error_handler_t::replace);
  if (j.contains("token_count")) {
    if (!j["token_count"].is_number_integer()) {
      line.error = "\"token_count\" must be an integer";
      return line;
    }
    line.token_count = j["token_count"].get<long long>();
  }
  return line;
}

}  // namespace

int VerifyMain(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--help" || std::string_view(argv[i]) == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  Options options;
  std::string error;
  if (!ParseArgs(argc, argv, &options, &error)) {
    if (!error.empty()) std::cerr << "grove verify: " << error << "\n";
    std::cerr << kUsage;
    return 2;
  }
  VerifierRegistry registry;
  for (const std::string& path : options.plugins) {
    Result<std::string> name = registry.LoadPlugin(path);
    if (!name.ok()) {
      std::cerr << "grove verify: " << name.status() << "\n";
      return 2;
    }
    std::cerr << "grove verify: loaded plug-in '" << *name << "' from " << path << "\n";
  }
  for (const std::string& item : options.externals) {
    size_t eq = item.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == item.size()) {
      std::cerr << "grove verify: --external wants NAME=COMMAND, got '" << item << "'\n";
      return 2;
    }
    ExternalVerifierOptions ext;
    ext.command = item.substr(eq + 1);
    ext.timeout = std::chrono::milliseconds(options.external_timeout_ms);
    Status s = registry.RegisterExternal(item.substr(0, eq), ext);
    if (!s.ok()) {
      std::cerr << "grove verify: " << s << "\n";
      return 2;
    }
  }
  Result<std::vector<WeightedVerifier>> spec = ParseVerifierSpec(options.verifiers);
  if (!spec.ok()) {
    std::cerr << "grove verify: " << spec.status() << "\n";
    return 2;
  }
  Result<std::unique_ptr<Verifier>> verifier = MakeCompositeVerifier(registry, *spec);
  if (!verifier.ok()) {
    std::cerr << "grove verify: " << verifier.status() << "\n";
    return 2;
  }
  std::ifstream file;
  std::istream* in = &std::cin;
  if (options.input != "-") {
    file.open(options.input);
    if (!file) {
      std::cerr << "grove verify: cannot open " << options.input << "\n";
      return 2;
    }
    in = &file;
  }
  ScoringPoolOptions pool_options;
  pool_options.num_workers = options.workers;
  pool_options.sample_timeout = std::chrono::milliseconds(options.timeout_ms);
  Result<std::unique_ptr<ScoringPool>> pool =
      ScoringPool::Start(std::shared_ptr<const Verifier>(std::move(*verifier)), pool_options);
  if (!pool.ok()) {
    std::cerr << "grove verify: " << pool.status() << "\n";
    return 2;
  }

  const auto start = std::chrono::steady_clock::now();
  size_t total = 0, malformed = 0;
  double reward_sum = 0;
  std::map<std::string, std::pair<double, size_t>> per_name;  // sum, count
  std::map<std::string, size_t> reasons;
  constexpr size_t kBatch = 256;  // bounds memory on large files
  bool eof = false;
  size_t line_number = 0;
  while (!eof) {
    std::vector<Line> lines;
    std::string text;
    while (lines.size() < kBatch) {
      if (!std::getline(*in, text)) {
        eof = true;
        break;
      }
      ++line_number;
      if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
      lines.push_back(ParseLine(text));
      if (!lines.back().error.empty()) {
        std::cerr << "grove verify: line " << line_number << ": " << lines.back().error << "\n";
      }
    }
    std::vector<VerifyInput> inputs;
    std::vector<size_t> positions;
    for (size_t i = 0; i < lines.size(); ++i) {
      if (!lines[i].error.empty()) continue;
      inputs.push_back(VerifyInput{lines[i].prompt, lines[i].completion, lines[i].reference, lines[i].token_count});
      positions.push_back(i);
    }
    std::vector<VerifyOutput> scored = (*pool)->Score(inputs);
    std::vector<VerifyOutput> outputs(lines.size());
    for (size_t k = 0; k < positions.size(); ++k) outputs[positions[k]] = std::move(scored[k]);
    for (size_t i = 0; i < lines.size(); ++i) {
      if (!lines[i].error.empty()) {
        outputs[i] = VerifyOutput::Make(0.0, lines[i].error);
        ++malformed;
      }
      const VerifyOutput& out = outputs[i];
      json j;
      j["reward"] = out.reward;
      j["reason"] = out.reason;
      j["scores"] = json::object();
      for (const SubScore& s : out.scores) {
        j["scores"][s.name] = s.value;
        if (s.name.find('.') == std::string::npos) {
          per_name[s.name].first += s.value;
          per_name[s.name].second += 1;
        }
      }
      std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
      ++total;
      reward_sum += out.reward;
      ++reasons[out.reason.substr(0, 60)];
    }
    std::cout.flush();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cerr << "grove verify: " << total << " samples in " << seconds << " s ("
            << (seconds > 0 ? static_cast<double>(total) / seconds : 0.0) << "/s), mean reward "
            << (total ? reward_sum / static_cast<double>(total) : 0.0) << ", malformed lines " << malformed
            << ", verifier failures " << (*pool)->stats().failed << ", worker restarts " << (*pool)->stats().restarts
            << "\n";
  for (const auto& [name, sum_count] : per_name) {
    std::cerr << "  " << name << ": mean " << sum_count.first / static_cast<double>(sum_count.second) << "\n";
  }
  // The most common reasons say at a glance why rewards are low.
  std::vector<std::pair<size_t, std::string>> common;
  for (const auto& [reason, count] : reasons) common.push_back({count, reason});
  std::sort(common.rbegin(), common.rend());
  for (size_t i = 0; i < common.size() && i < 5; ++i) {
    std::cerr << "  reason x" << common[i].first << ": " << common[i].second << "\n";
  }
  return malformed > 0 ? 1 : 0;
}

}  // namespace grove::reward
