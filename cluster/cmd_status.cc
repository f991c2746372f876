// grove status / grove scale / grove down: talk to a running cluster.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <thread>

#include "actors/curve_security.h"
#include "actors/process.h"
#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "cluster/cli_flags.h"
#include "cluster/commands.h"
#include "cluster/registry.h"
#include "cluster/run_dir.h"
#include "cluster/status_view.h"

namespace grove::cli {
namespace {

int Fail(const char* cmd, const Status& s) {
  std::fprintf(stderr, "grove %s: %s\n", cmd, s.ToString().c_str());
  return 1;
}

bool Alive(int pid) { return pid > 0 && kill(pid, 0) == 0; }

// CurveZMQ for the CLI's own sockets: the keys of --keys DIR, else (when the
// cluster is found through its run directory) the [security] section of the
// run's config. Sets *curve when the cluster uses it.
Status InstallCliSecurity(const std::string& keys_dir, const std::string& run_dir_flag,
                          bool use_run_dir, bool* curve) {
  *curve = false;
  actors::SecurityConfig config;
  if (!keys_dir.empty()) {
    config = actors::SecurityConfig::ForKeysDir(keys_dir);
  } else {
    if (!use_run_dir) return Status::OK();
    auto dir = FindRunDir(run_dir_flag);
    if (!dir.ok()) return Status::OK();  // FindCoordinator reports what is missing
    auto info = ReadJsonFile(*dir + "/cluster.json");
    if (!info.ok() || info->value("config", "").empty()) return Status::OK();
    auto run_config = Config::LoadFile(info->value("config", ""));
    if (!run_config.ok()) return Status::OK();  // an old run directory; plain TCP
    GROVE_ASSIGN_OR_RETURN(config, actors::SecurityConfig::FromConfig(*run_config));
  }
  if (!config.curve) return Status::OK();
  *curve = true;
  return actors::InstallProcessSecurity(config, actors::KeyUse::kConnectOnly)
      .WithContext("CurveZMQ keys (pass --keys DIR with server.pub and client.key)");
}

// A secured server answers nothing to a client it refused, so a timeout is
// all the CLI sees; say what it most likely means.
Status ExplainNoReply(const Status& s, bool curve) {
  if (s.code() != StatusCode::kDeadlineExceeded && s.code() != StatusCode::kUnavailable) return s;
  if (curve) {
    return Status(s.code(), "no reply: authentication may have failed (cluster uses CurveZMQ; "
                            "pass --keys DIR holding its server.pub and an authorized client "
                            "key pair), or the server is down [" + s.message() + "]");
  }
  return Status(s.code(), s.message() + " (if the cluster uses CurveZMQ, pass --keys DIR)");
}

constexpr const char* kKeysHelp =
    "CurveZMQ keys directory: server.pub and client.key/.pub (default: the run's [security])";

}  // namespace

int CmdStatus(int argc, char** argv) {
  std::string coordinator, run_dir, keys;
  bool json = false, watch = false;
  int64_t timeout_ms = 2000, interval_ms = 1000;
  FlagSet flags("grove status [--json] [--watch] [--coordinator tcp://H:P | --run_dir DIR] [--keys DIR]",
                "Shows the cluster's health: a cluster line, then one row per actor.\n"
                "Finds the coordinator from --coordinator, else $GROVE_RUN_DIR, else runs/latest.");
  flags.String("coordinator", &coordinator, "coordinator endpoint tcp://HOST:PORT");
  flags.String("run_dir", &run_dir, "run directory (default $GROVE_RUN_DIR, else runs/latest)");
  flags.Bool("json", &json,
             "print {\"cluster\": {...}, \"actors\": [{role,id,host,pid,state,heartbeat_age_ms,"
             "uptime_ms,restarts,policy_version,counters,rss_bytes,exit_reason}]}");
  flags.Bool("watch", &watch, "refresh in place until Ctrl-C");
  flags.Int("interval_ms", &interval_ms, "refresh interval with --watch");
  flags.Int("timeout_ms", &timeout_ms, "how long to wait for the coordinator");
  flags.String("keys", &keys, kKeysHelp);
  Status parsed = flags.Parse(argc, argv, 2);
  if (flags.help()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  if (!parsed.ok()) return Fail("status", parsed);
  auto endpoint = FindCoordinator(coordinator, run_dir);
  if (!endpoint.ok()) return Fail("status", endpoint.status());
  bool curve = false;
  Status security = InstallCliSecurity(keys, run_dir, coordinator.empty() || !run_dir.empty(), &curve);
  if (!security.ok()) return Fail("status", security);
  actors::InstallDrainSignalHandlers();
  for (;;) {
    auto status = FetchStatus(*endpoint, static_cast<int>(timeout_ms));
    std::string text;
    if (!status.ok()) {
      const Status why = ExplainNoReply(status.status(), curve);
      if (!watch) return Fail("status", why.WithContext("coordinator " + *endpoint));
      text = "coordinator " + *endpoint + ": " + why.ToString() + "\n";
    } else {
      text = json ? status->dump(watch ? 2 : -1) + "\n" : RenderStatusTable(*status);
    }
    if (watch) std::fputs("\033[H\033[2J", stdout);  // home + clear: refresh in place
    std::fputs(text.c_str(), stdout);
    std::fflush(stdout);
    if (!watch) return 0;
    for (int64_t slept = 0; slept < interval_ms && !actors::DrainSignalled(); slept += 20) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (actors::DrainSignalled()) return 0;
  }
}

int CmdScale(int argc, char** argv) {
  std::string run_dir, keys;
  FlagSet flags("grove scale ROLE=N [--run_dir DIR] [--keys DIR]",
                "Asks the cluster's launcher (grove up) to run N actors of ROLE (rollout or\n"
                "verifier): it starts new ones or drains the highest-numbered.");
  flags.String("run_dir", &run_dir, "run directory (default $GROVE_RUN_DIR, else runs/latest)");
  flags.String("keys", &keys, kKeysHelp);
  Status parsed = flags.Parse(argc, argv, 2);
  if (flags.help()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  if (!parsed.ok()) return Fail("scale", parsed);
  bool curve = false;
  if (Status st = InstallCliSecurity(keys, run_dir, true, &curve); !st.ok()) return Fail("scale", st);
  if (flags.positional().size() != 1 || flags.positional()[0].find('=') == std::string::npos) {
    return Fail("scale", Status::InvalidArgument("want exactly one ROLE=N, e.g. rollout=4"));
  }
  const std::string spec = flags.positional()[0];
  const std::string role_name = spec.substr(0, spec.find('='));
  int count = -1;
  try {
    count = std::stoi(spec.substr(spec.find('=') + 1));
  } catch (const std::exception&) {
  }
  const wire::Role role = RoleFromName(role_name);
  if (count < 0 || role == wire::Role::UNKNOWN || role == wire::Role::CLIENT ||
      role == wire::Role::COORDINATOR) {
    return Fail("scale", Status::InvalidArgument("bad spec '" + spec +
                                                 "': want ROLE=N with ROLE an actor role, N >= 0"));
  }
  auto dir = FindRunDir(run_dir);
  if (!dir.ok()) return Fail("scale", dir.status());
  auto info = ReadJsonFile(*dir + "/cluster.json");
  if (!info.ok()) return Fail("scale", info.status());
  const std::string launcher = info->value("launcher", "");
  if (launcher.empty()) return Fail("scale", Status::NotFound("cluster.json names no launcher"));
  actors::RpcClient rpc("grove-scale");
  Status s = rpc.Connect(launcher);
  if (!s.ok()) return Fail("scale", s);
  capnp::MallocMessageBuilder msg;
  auto req = actors::InitEnvelope(msg, "grove-scale", 0).getBody().initScaleRequest();
  req.setRole(role);
  req.setCount(static_cast<uint32_t>(count));
  auto reply = rpc.Call(msg, {actors::BodyKind::SCALE_REPLY}, 5000);
  if (!reply.ok()) {
    return Fail("scale", ExplainNoReply(reply.status(), curve).WithContext("launcher " + launcher));
  }
  std::printf("%s\n", reply->envelope().getBody().getScaleReply().getMessage().cStr());
  return 0;
}

int CmdDown(int argc, char** argv) {
  std::string run_dir, keys;
  int64_t timeout_ms = 15000;
  FlagSet flags("grove down [--run_dir DIR] [--timeout_ms MS] [--keys DIR]",
                "Stops the cluster: asks the launcher to drain every actor and the coordinator\n"
                "(or, if the launcher is gone, tells the coordinator to drain everyone and\n"
                "sends SIGTERM itself); SIGKILLs whatever still runs after the timeout.");
  flags.String("run_dir", &run_dir, "run directory (default $GROVE_RUN_DIR, else runs/latest)");
  flags.Int("timeout_ms", &timeout_ms, "how long to wait before SIGKILL");
  flags.String("keys", &keys, kKeysHelp);
  Status parsed = flags.Parse(argc, argv, 2);
  if (flags.help()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  if (!parsed.ok()) return Fail("down", parsed);
  // Without working keys the commands go unanswered and down falls back to
  // signals, which still stop a local cluster.
  bool curve = false;
  if (Status st = InstallCliSecurity(keys, run_dir, true, &curve); !st.ok()) {
    std::fprintf(stderr, "grove down: %s; stopping with signals\n", st.ToString().c_str());
  }
  auto dir = FindRunDir(run_dir);
  if (!dir.ok()) return Fail("down", dir.status());
  auto info = ReadJsonFile(*dir + "/cluster.json");
  if (!info.ok()) return Fail("down", info.status());

  auto send_command = [](const std::string& endpoint, wire::CommandKind kind) {
    actors::RpcClient rpc("grove-down");
    if (endpoint.empty() || !rpc.Connect(endpoint).ok()) return false;
    capnp::MallocMessageBuilder msg;
    auto cmd = actors::InitEnvelope(msg, "grove-down", 0).getBody().initCommand();
    cmd.setKind(kind);
    cmd.setTarget("*");
    cmd.setReason("grove down");
    return rpc.Call(msg, {actors::BodyKind::COMMAND_REPLY}, 1000).ok();
  };
  std::vector<int> pids;
  const int launcher_pid = info->value("launcher_pid", 0);
  for (const auto& [id, pid] : (*info)["pids"].items()) pids.push_back(pid.get<int>());
  const bool via_launcher = send_command(info->value("launcher", ""), wire::CommandKind::STOP);
  if (!via_launcher) {
    std::fprintf(stderr, "grove down: launcher not answering; stopping the actors directly\n");
    send_command(info->value("coordinator", ""), wire::CommandKind::DRAIN);
    for (int pid : pids) {
      if (Alive(pid)) kill(pid, SIGTERM);
    }
  }
  if (launcher_pid > 0) pids.push_back(launcher_pid);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  auto any_alive = [&] {
    for (int pid : pids) {
      if (Alive(pid)) return true;
    }
    return false;
  };
  while (any_alive() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  int killed = 0;
  for (int pid : pids) {
    if (Alive(pid)) {
      kill(pid, SIGKILL);
      ++killed;
    }
  }
  if (killed > 0) std::printf("down: %d processes did not stop in time; sent SIGKILL\n", killed);
  std::printf("down: %s stopped\n", dir->c_str());
  return 0;
}

}  // namespace grove::cli
