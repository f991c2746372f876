// grove up: starts a local cluster from a config and supervises it.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include <glog/logging.h>

#include "actors/curve_security.h"
#include "actors/process.h"
#include "cluster/cli_flags.h"
#include "cluster/commands.h"
#include "cluster/progress_report.h"
#include "cluster/launcher.h"
#include "cluster/roles.h"
#include "cluster/run_dir.h"
#include "learner/learner_actor.h"
#include "rollout/rollout_actor.h"

namespace grove::cli {
namespace {

// The last glog ERROR/FATAL lines of an actor's log (at most `max`), so a
// dead learner's reason is on the terminal, not only in its log file.
std::vector<std::string> LastErrorLines(const std::string& log_path, size_t max) {
  std::ifstream in(log_path);
  std::vector<std::string> found;
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() > 1 && (line[0] == 'E' || line[0] == 'F') && std::isdigit(static_cast<unsigned char>(line[1]))) {
      found.push_back(line);
      if (found.size() > max) found.erase(found.begin());
    }
  }
  return found;
}

int Fail(const Status& s) {
  std::fprintf(stderr, "grove up: %s\n", s.ToString().c_str());
  return 1;
}

// Start order: storage first, then the learner, then the workers feeding it.
const char* const kRoleOrder[] = {"replay", "learner", "verifier", "rollout"};

}  // namespace

int CmdUp(int argc, char** argv) {
  std::string config_path, runs_dir, name;
  std::vector<std::string> sets;
  bool detach = false;
  FlagSet flags(
      "grove up --config FILE [--detach] [--set a.b=V] [--runs_dir DIR] [--name NAME]",
      "Starts the coordinator and every actor of the config's [cluster] section (counts per\n"
      "role, e.g. rollout = 2) as separate processes, in runs/<name>-<time>/ (logs/<id>.log,\n"
      "cluster.json, config.toml; runs/latest points at it). Runs in the foreground until the\n"
      "learner exits (with its exit code) or Ctrl-C; --detach leaves it running (grove down\n"
      "stops it). Crashed rollout and verifier workers are restarted with back-off.\n"
      "[launcher] keys: name, runs_dir, restart_limit, restart_backoff_ms, restart_reset_ms, stop_timeout_ms,\n"
      "and [launcher.programs] ROLE = \"/path/prog\" to run an external program for a role.");
  flags.String("config", &config_path, "experiment config (TOML)");
  flags.Repeated("set", &sets, "config override a.b=VALUE");
  flags.Bool("detach", &detach, "start the cluster and return");
  flags.String("runs_dir", &runs_dir, "where run directories go (default [launcher] runs_dir or runs)");
  flags.String("name", &name, "run name (default [launcher] name, else the config file's stem)");
  Status parsed = flags.Parse(argc, argv, 2);
  if (flags.help()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  if (!parsed.ok()) return Fail(parsed);
  if (config_path.empty()) return Fail(Status::InvalidArgument("--config FILE is required"));
  auto config = Config::LoadFile(config_path);
  if (!config.ok()) return Fail(config.status());
  for (const auto& s : sets) {
    Status st = config->Override(s);
    if (!st.ok()) return Fail(st.WithContext("--set " + s));
  }

  // Everything is checked before anything starts.
  LauncherOptions options;
  Config launcher = config->Section("launcher");
  Status keys = launcher.CheckKeys(
      {"name", "runs_dir", "restart_limit", "restart_backoff_ms", "restart_reset_ms", "stop_timeout_ms", "programs"});
  if (!keys.ok()) return Fail(keys);
  auto str = [&](const char* key, std::string fallback) {
    return launcher.String(key, fallback).value_or(fallback);
  };
  auto num = [&](const char* key, int64_t fallback) -> Result<int64_t> {
    return launcher.Int(key, fallback);
  };
  if (name.empty()) name = str("name", std::filesystem::path(config_path).stem().string());
  if (runs_dir.empty()) runs_dir = str("runs_dir", "runs");
  for (auto [key, field] : {std::pair{"restart_limit", &options.restart_limit},
                            std::pair{"restart_backoff_ms", &options.restart_backoff_ms},
                            std::pair{"restart_reset_ms", &options.restart_reset_ms},
                            std::pair{"stop_timeout_ms", &options.stop_timeout_ms}}) {
    auto v = num(key, *field);
    if (!v.ok()) return Fail(v.status());
    if (*v < 0 || *v > 3600000) return Fail(Status::InvalidArgument(std::string("launcher.") + key + " out of range"));
    *field = static_cast<int>(*v);
  }
  Config programs = config->Section("launcher.programs");
  for (const auto& role : programs.Keys()) {
    auto path = programs.String(role);
    if (!path.ok()) return Fail(path.status());
    options.programs[role] = std::filesystem::absolute(*path).string();
  }
  // [security]: the keys are checked now, and their paths made absolute in
  // the config every child reads, so they mean the same files for all.
  auto security = actors::SecurityConfig::FromConfig(*config);
  if (!security.ok()) return Fail(security.status());
  if (security->curve) {
    const actors::SecurityConfig abs = security->Absolute();
    auto keys = actors::LoadSocketSecurity(abs, actors::KeyUse::kServeAndConnect);
    if (!keys.ok()) return Fail(keys.status().WithContext("[security]"));
    auto authorized = actors::ReadAuthorizedKeys(abs.authorized_dir);
    if (!authorized.ok()) return Fail(authorized.status().WithContext("[security]"));
    for (auto [key, value] : {std::pair{"server_key", &abs.server_key},
                              std::pair{"client_key", &abs.client_key},
                              std::pair{"authorized_dir", &abs.authorized_dir}}) {
      Status st = config->Override(std::string("security.") + key + "=\"" + *value + "\"");
      if (!st.ok()) return Fail(st);
    }
    if (!abs.keys_dir.empty()) {
      Status st = config->Override("security.keys_dir=\"" + abs.keys_dir + "\"");
      if (!st.ok()) return Fail(st);
    }
  }
  std::vector<std::pair<std::string, int>> counts;
  Config cluster = config->Section("cluster");
  for (const auto& role : cluster.Keys()) {
    auto n = cluster.Int(role);
    if (!n.ok()) return Fail(n.status());
    if (*n < 0 || *n > 1024) return Fail(Status::InvalidArgument("cluster." + role + " must be in [0, 1024]"));
    if (role == "coordinator") continue;  // always exactly one
    counts.emplace_back(role, static_cast<int>(*n));
  }
  std::stable_sort(counts.begin(), counts.end(), [](const auto& a, const auto& b) {
    auto rank = [](const std::string& r) {
      for (int i = 0; i < 4; ++i) {
        if (r == kRoleOrder[i]) return i;
      }
      return 4;
    };
    return rank(a.first) < rank(b.first);
  });
  {
    Launcher probe(options);
    for (const auto& [role, n] : counts) {
      if (n == 0) continue;
      Status s = probe.CanStart(role);
      if (!s.ok()) return Fail(s.WithContext("cluster." + role + " = " + std::to_string(n)));
      // What the learner and the workers would refuse at start (bad keys, a
      // GPU the config asks for that this machine lacks), refused here once.
      if (options.programs.count(role) > 0) continue;
      if (role == "learner") s = learner::ValidateLearnerConfig(*config, /*check_device=*/true);
      if (role == "rollout") s = rollout::ValidateRolloutConfig(*config, /*check_device=*/true);
      if (!s.ok()) return Fail(s.WithContext("[" + role + "]"));
    }
  }

  auto dir = CreateRunDir(runs_dir, name);
  if (!dir.ok()) return Fail(dir.status());
  options.name = name;
  options.run_dir = *dir;
  options.config_path = *dir + "/config.toml";
  options.grove_binary = std::filesystem::read_symlink("/proc/self/exe").string();
  {
    std::ofstream out(options.config_path);
    out << config->ToToml();
    if (!out) return Fail(Status::IOError("cannot write " + options.config_path));
  }

  if (detach) {
    // Fork before any ZeroMQ socket exists (a ZeroMQ context does not survive fork).
    pid_t pid = fork();
    if (pid < 0) return Fail(Status::IOError("fork failed"));
    if (pid > 0) {
      const std::string json = *dir + "/cluster.json";
      for (int i = 0; i < 3000; ++i) {
        auto info = ReadJsonFile(json);
        if (info.ok() && info->value("ready", false)) {
          std::printf("grove: cluster %s up (coordinator %s, launcher pid %d)\n"
                      "  grove status  |  grove down  |  logs in %s/logs\n",
                      dir->c_str(), info->value("coordinator", "").c_str(), pid, dir->c_str());
          return 0;
        }
        int status = 0;
        if (waitpid(pid, &status, WNOHANG) == pid) {
          return Fail(Status::Unavailable("the launcher exited at start; see " + *dir +
                                          "/logs/launcher.log"));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      return Fail(Status::DeadlineExceeded("cluster not ready after 30 s; see " + *dir + "/logs"));
    }
    setsid();
    int fd = open((*dir + "/logs/launcher.log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    int devnull = open("/dev/null", O_RDONLY);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    if (devnull >= 0) {
      dup2(devnull, 0);
      close(devnull);
    }
  }

  actors::InitActorLogging(argv[0], "launcher");
  actors::InstallDrainSignalHandlers();
  // After the fork: the ZAP handler is a thread and a ZeroMQ socket.
  if (Status st = actors::InstallProcessSecurity(*config); !st.ok()) return Fail(st);
  Launcher launcher_proc(options);
  Status s = launcher_proc.StartCoordinator(15000);
  if (!s.ok()) {
    launcher_proc.Shutdown(true);
    return Fail(s);
  }
  for (const auto& [role, n] : counts) {
    if (n == 0) continue;
    s = launcher_proc.Scale(role, n);
    if (!s.ok()) {
      launcher_proc.Shutdown(true);
      return Fail(s);
    }
  }
  launcher_proc.MarkReady();
  if (!detach) {
    std::printf("grove: cluster %s up (coordinator %s); Ctrl-C stops it\n", dir->c_str(),
                launcher_proc.coordinator().c_str());
    std::fflush(stdout);
  }
  ProgressReport progress(*dir + "/metrics.jsonl", stdout);
  const int code = launcher_proc.Supervise([&] {
    if (!detach) progress.Poll();
    return actors::DrainSignalled();
  });
  LOG(INFO) << "shutting the cluster down";
  launcher_proc.Shutdown(actors::StopSignalled());
  if (!detach) {
    progress.PrintSummary();
    if (code != 0) {
      const std::string log = *dir + "/logs/learner-0.log";
      std::fprintf(stderr, "grove up: the learner exited with code %d; see %s\n", code, log.c_str());
      for (const std::string& line : LastErrorLines(log, 3)) std::fprintf(stderr, "  %s\n", line.c_str());
    }
  }
  return code;
}

}  // namespace grove::cli
