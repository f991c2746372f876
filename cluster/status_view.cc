#include "cluster/status_view.h"

#include <cstdio>
#include <sstream>

#include "actors/latency_window.h"
#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "cluster/registry.h"

namespace grove {

Result<nlohmann::json> FetchStatus(const std::string& endpoint, int timeout_ms) {
  actors::RpcClient rpc("grove-status");
  GROVE_RETURN_IF_ERROR(rpc.Connect(endpoint));
  capnp::MallocMessageBuilder msg;
  actors::InitEnvelope(msg, "grove-status", 0).getBody().initStatusRequest().setIncludeDead(true);
  GROVE_ASSIGN_OR_RETURN(actors::Frame frame,
                         rpc.Call(msg, {actors::BodyKind::STATUS_REPLY}, timeout_ms));
  auto reply = frame.envelope().getBody().getStatusReply();
  nlohmann::json cluster = nlohmann::json::object();
  cluster["coordinator"] = endpoint;
  cluster["epoch"] = reply.getCoordinatorEpoch();
  cluster["uptime_ms"] = reply.getUptimeMs();
  for (auto c : reply.getCluster()) cluster[c.getName().cStr()] = c.getValue();
  cluster["auth_last_refused"] = reply.getLastAuthRefusal().cStr();
  nlohmann::json actors = nlohmann::json::array();
  for (auto a : reply.getActors()) {
    nlohmann::json counters = nlohmann::json::object();
    for (auto c : a.getCounters()) counters[c.getName().cStr()] = c.getValue();
    actors.push_back({{"role", RoleName(a.getRole())},
                      {"id", a.getId().cStr()},
                      {"host", a.getHost().cStr()},
                      {"pid", a.getPid()},
                      {"state", StateName(a.getState())},
                      {"heartbeat_age_ms", a.getHeartbeatAgeMs()},
                      {"uptime_ms", a.getUptimeMs()},
                      {"restarts", a.getRestarts()},
                      {"policy_version", a.getPolicyVersion()},
                      {"counters", counters},
                      {"rss_bytes", a.getRssBytes()},
                      {"exit_reason", a.getExitReason().cStr()},
                      {"data_endpoint", a.getDataEndpoint().cStr()},
                      {"detail", a.getDetail().cStr()}});
  }
  return nlohmann::json{{"cluster", cluster}, {"actors", actors}};
}

namespace {

std::string Duration(int64_t ms) {
  char buf[32];
  if (ms < 1000) std::snprintf(buf, sizeof(buf), "%lldms", static_cast<long long>(ms));
  else if (ms < 120000) std::snprintf(buf, sizeof(buf), "%.1fs", ms / 1000.0);
  else if (ms < 7200000) std::snprintf(buf, sizeof(buf), "%lldm", static_cast<long long>(ms / 60000));
  else std::snprintf(buf, sizeof(buf), "%.1fh", ms / 3600000.0);
  return buf;
}

std::string Bytes(double b) {
  char buf[32];
  if (b <= 0) return "-";
  if (b < 1 << 20) std::snprintf(buf, sizeof(buf), "%.0fK", b / 1024);
  else if (b < 1 << 30) std::snprintf(buf, sizeof(buf), "%.0fM", b / (1 << 20));
  else std::snprintf(buf, sizeof(buf), "%.1fG", b / (1 << 30));
  return buf;
}

std::string Number(double v) {
  char buf[32];
  if (v == static_cast<double>(static_cast<long long>(v))) {
    std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
  } else {
    std::snprintf(buf, sizeof(buf), "%.4g", v);
  }
  return buf;
}

double Get(const nlohmann::json& obj, const char* key) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_number() ? it->get<double>() : 0.0;
}

// Latency windows (actors/latency_window.h) heartbeat four counters each;
// the table shows them as one item, `<base>=P50/P99ms`, at the _p50_ms one.
// Returns the window's base for that counter, "-" for its other three (to
// skip), "" for any other counter.
std::string LatencyItem(const nlohmann::json& counters, const std::string& name) {
  const auto parsed = actors::ParseLatencyCounter(name);
  if (!parsed || !counters.contains(parsed->base + "_p50_ms")) return "";
  const bool median = parsed->kind == actors::LatencyCounter::Kind::kQuantile && parsed->digits == "50";
  return median ? parsed->base : "-";
}

}  // namespace

std::string RenderStatusTable(const nlohmann::json& status) {
  const auto& c = status.at("cluster");
  const auto& actors = status.at("actors");
  std::ostringstream out;
  char line[512];
  int live = 0;
  for (const auto& a : actors) {
    std::string s = a.value("state", "");
    live += (s == "healthy" || s == "starting" || s == "draining") ? 1 : 0;
  }
  std::snprintf(line, sizeof(line),
                "cluster  %d/%zu up  step %s  version %s  staleness %s  prompts queued %s leased %s "
                "done %s  replay depth %s  reward %s  bad frames %s  coordinator up %s\n",
                live, actors.size(), Number(Get(c, "learner_step")).c_str(),
                Number(Get(c, "policy_version")).c_str(), Number(Get(c, "staleness")).c_str(),
                Number(Get(c, "prompt_queue_depth")).c_str(),
                Number(Get(c, "prompts_leased")).c_str(), Number(Get(c, "prompts_done")).c_str(),
                Number(Get(c, "replay_queue_depth")).c_str(),
                c.contains("reward_mean") ? Number(Get(c, "reward_mean")).c_str() : "-",
                Number(Get(c, "bad_frames_garbage") + Get(c, "bad_frames_truncated") +
                       Get(c, "bad_frames_oversized") + Get(c, "bad_frames_wrong_kind") +
                       Get(c, "bad_frames_unknown_kind"))
                    .c_str(),
                Duration(static_cast<int64_t>(Get(c, "uptime_ms"))).c_str());
  out << line;
  if (Get(c, "curve") > 0 || Get(c, "auth_refusals") > 0) {
    // Refused handshakes leave no other trace: ZeroMQ hands a server nothing
    // from a peer that failed authentication.
    const std::string last = c.value("auth_last_refused", "");
    out << "security CurveZMQ " << (Get(c, "curve") > 0 ? "on" : "off") << "  refused "
        << Number(Get(c, "auth_refusals")) << " connections from unauthorized actors"
        << (last.empty() ? std::string() : " (last: " + last + ")") << "\n";
  }
  std::snprintf(line, sizeof(line), "%-11s %-14s %-9s %8s %8s %4s %7s %6s %7s  %s\n", "ROLE", "ID",
                "STATE", "HB AGE", "UPTIME", "RST", "VERSION", "RSS", "PID", "COUNTERS / EXIT");
  out << line;
  for (const auto& a : actors) {
    std::string extra;
    const std::string state = a.value("state", "");
    if (state == "dead" || state == "stopped") {
      extra = a.value("exit_reason", "");
    } else {
      const auto& counters = a.at("counters");
      for (const auto& [name, value] : counters.items()) {
        const std::string latency = LatencyItem(counters, name);
        if (latency == "-") continue;
        if (!extra.empty()) extra += " ";
        if (!latency.empty()) {  // one item per latency window: p50/p99 in ms
          extra += latency + "=" + Number(value.get<double>()) + "/" +
                   Number(Get(counters, (latency + "_p99_ms").c_str())) + "ms";
          continue;
        }
        extra += name + "=" + Number(value.get<double>());
      }
      const std::string detail = a.value("detail", "");
      if (!detail.empty()) extra += (extra.empty() ? "" : "  ") + detail;
    }
    std::snprintf(line, sizeof(line), "%-11s %-14s %-9s %8s %8s %4d %7lld %6s %7d  %s\n",
                  a.value("role", "").c_str(), a.value("id", "").c_str(), state.c_str(),
                  Duration(a.value("heartbeat_age_ms", int64_t{0})).c_str(),
                  Duration(a.value("uptime_ms", int64_t{0})).c_str(), a.value("restarts", 0),
                  static_cast<long long>(a.value("policy_version", int64_t{0})),
                  Bytes(Get(a, "rss_bytes")).c_str(), a.value("pid", 0), extra.c_str());
    out << line;
  }
  return out.str();
}

}  // namespace grove
