#include "cluster/prometheus_text.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <vector>

#include "actors/latency_window.h"

namespace grove {
namespace {

const char* const kStates[] = {"starting", "healthy", "suspect", "dead", "draining", "stopped"};

std::string Escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string Value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  // The shortest of %.15g and %.17g that reads back as the same double:
  // 0.1 stays "0.1", and no value loses bits.
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.15g", v);
  if (std::strtod(buf, nullptr) != v) std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

using Labels = std::vector<std::pair<std::string, std::string>>;

// Samples grouped by metric name: the format wants a metric's samples
// together, under one HELP and TYPE line.
class Exposition {
 public:
  // A sample of metric family `name`; `suffix` names a summary's _sum and
  // _count samples, which belong to the family's block.
  void Add(const std::string& name, const std::string& help, const Labels& labels, double value,
           const char* type = "gauge", const std::string& suffix = "") {
    auto& m = metrics_[name];
    if (m.help.empty()) m.help = help;
    m.type = type;
    std::string line = name + suffix;
    if (!labels.empty()) {
      line += '{';
      for (size_t i = 0; i < labels.size(); ++i) {
        line += (i ? "," : "") + labels[i].first + "=\"" + Escape(labels[i].second) + "\"";
      }
      line += '}';
    }
    m.samples.push_back(line + " " + Value(value));
  }
  std::string Text() const {
    std::string out;
    for (const auto& [name, m] : metrics_) {
      out += "# HELP " + name + " " + m.help + "\n# TYPE " + name + " " + m.type + "\n";
      for (const auto& s : m.samples) out += s + "\n";
    }
    return out;
  }

 private:
  struct Metric {
    std::string help;
    std::string type;
    std::vector<std::string> samples;
  };
  std::map<std::string, Metric> metrics_;
};

double Number(const nlohmann::json& obj, const char* key) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_number() ? it->get<double>() : 0.0;
}

// Latency counters (actors/latency_window.h: <base>_p50_ms, <base>_p99_ms,
// <base>_count, <base>_sum_ms) once more as a summary in seconds,
// grove_<role>_<base>_seconds{role,id,quantile}, the shape Prometheus
// tools expect. Called for every counter; acts on the quantile ones.
void AddLatencySummary(Exposition& e, const std::string& role, const Labels& labels,
                       const nlohmann::json& counters, const std::string& counter) {
  const std::optional<actors::LatencyCounter> parsed = actors::ParseLatencyCounter(counter);
  if (!parsed || parsed->kind != actors::LatencyCounter::Kind::kQuantile) return;
  const std::string& base = parsed->base;
  const std::string& digits = parsed->digits;
  const std::string family = "grove_" + PrometheusName(role) + "_" + PrometheusName(base) + "_seconds";
  const std::string help = "Latency '" + base + "' that " + role + " actors report, in seconds.";
  Labels with_quantile = labels;
  with_quantile.push_back({"quantile", Value(std::strtod(("0." + digits).c_str(), nullptr))});
  e.Add(family, help, with_quantile, counters[counter].get<double>() / 1000.0, "summary");
  // _sum and _count once per actor: with the median, the one quantile every
  // latency window reports.
  if (digits != "50") return;
  auto sum = counters.find(base + "_sum_ms");
  auto count = counters.find(base + "_count");
  if (sum != counters.end() && sum->is_number()) {
    e.Add(family, help, labels, sum->get<double>() / 1000.0, "summary", "_sum");
  }
  if (count != counters.end() && count->is_number()) {
    e.Add(family, help, labels, count->get<double>(), "summary", "_count");
  }
}

}  // namespace

std::string PrometheusName(const std::string& name) {
  std::string out;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_';
    out += ok ? c : '_';
  }
  if (out.empty() || (out[0] >= '0' && out[0] <= '9')) out = "_" + out;
  return out;
}

std::string RenderPrometheus(const nlohmann::json& status) {
  Exposition e;
  const nlohmann::json empty = nlohmann::json::object();
  const auto& cluster = status.contains("cluster") ? status["cluster"] : empty;
  e.Add("grove_coordinator_uptime_seconds", "Seconds since the coordinator started.", {},
        Number(cluster, "uptime_ms") / 1000.0);
  std::map<std::string, double> by_state;
  for (const char* s : kStates) by_state[s] = 0;
  for (const auto& [key, value] : cluster.items()) {
    if (!value.is_number() || key == "uptime_ms" || key == "epoch") continue;
    if (key.rfind("actors_", 0) == 0) {
      by_state[key.substr(7)] = value.get<double>();
      continue;
    }
    e.Add("grove_cluster_" + PrometheusName(key), "Cluster figure '" + key + "' of grove status.",
          {}, value.get<double>());
  }
  for (const auto& [state, n] : by_state) {
    e.Add("grove_cluster_actors", "Actors known to the coordinator, by state.", {{"state", state}},
          n);
  }
  if (!status.contains("actors")) return e.Text();
  for (const auto& a : status["actors"]) {
    const std::string role = a.value("role", "unknown"), id = a.value("id", "");
    const Labels labels = {{"role", role}, {"id", id}};
    const std::string state = a.value("state", "");
    for (const char* s : kStates) {
      e.Add("grove_actor_state", "1 for the actor's state (starting, healthy, suspect, dead, "
            "draining, stopped), 0 for the others.",
            {{"role", role}, {"id", id}, {"state", s}}, state == s ? 1 : 0);
    }
    e.Add("grove_actor_heartbeat_age_seconds", "Seconds since the actor's last heartbeat.", labels,
          Number(a, "heartbeat_age_ms") / 1000.0);
    e.Add("grove_actor_uptime_seconds", "Seconds since the actor registered.", labels,
          Number(a, "uptime_ms") / 1000.0);
    e.Add("grove_actor_restarts", "How often the supervisor restarted the actor.", labels,
          Number(a, "restarts"));
    e.Add("grove_actor_rss_bytes", "Resident memory the actor reported.", labels,
          Number(a, "rss_bytes"));
    e.Add("grove_actor_policy_version", "Policy version the actor holds.", labels,
          Number(a, "policy_version"));
    e.Add("grove_actor_pid", "Process id on the actor's host.", labels, Number(a, "pid"));
    if (!a.contains("counters")) continue;
    const auto& counters = a["counters"];
    for (const auto& [name, value] : counters.items()) {
      if (!value.is_number()) continue;
      e.Add("grove_" + PrometheusName(role) + "_" + PrometheusName(name),
            "Counter '" + name + "' that " + role + " actors heartbeat.", labels,
            value.get<double>());
      AddLatencySummary(e, role, labels, counters, name);
    }
  }
  return e.Text();
}

}  // namespace grove
