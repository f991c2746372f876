// Launcher: the local supervisor behind `grove up`. It starts the
// coordinator and every actor of the config as separate processes
// (`grove run ROLE --id ... --coordinator ... --config ...`, stdout and
// stderr to <run_dir>/logs/<id>.log), reports every exit to the coordinator
// (ExitReport, so status says "signal 9" or "exit 1"), restarts crashed
// rollout and verifier workers (and the coordinator, on its old port) with
// exponential back-off up to a limit, and keeps <run_dir>/cluster.json
// current (endpoints, pids and the coordinator's /metrics URL).
//
// Control socket (a ROUTER; its endpoint is "launcher" in cluster.json):
//   scaleRequest{role, count}  -> scaleReply   starts or drains workers
//   command{kind: stop|drain}  -> commandReply shuts the cluster down
// `grove scale` and `grove down` use it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "base/result.h"

namespace grove {

struct LauncherOptions {
  std::string name = "grove";          // run name (cluster.json)
  std::string grove_binary;            // the `grove` program to exec
  std::string config_path;             // the effective config file
  std::string run_dir;
  // role -> external program started instead of `grove run ROLE`; it gets
  // --role= --id= --coordinator= --config= --restarts= --run_dir=.
  std::map<std::string, std::string> programs;
  // Back-off and limit count crashes in a row: a child that ran for
  // restart_reset_ms before it crashed starts a fresh streak, so a
  // long-running cluster that loses an actor now and then restarts it
  // promptly every time, while one crashing at start gives up.
  int restart_limit = 5;               // crashes in a row, per actor id
  int restart_backoff_ms = 500;        // doubled per crash in a row of the same id
  int restart_reset_ms = 60000;        // a run this long ends the streak
  int stop_timeout_ms = 10000;         // SIGTERM -> SIGKILL
};

class Launcher {
 public:
  explicit Launcher(LauncherOptions options);
  ~Launcher();  // SIGKILLs children still running (Shutdown() is the polite way)

  // OK if `role` can be started: in the role table or in options.programs.
  Status CanStart(const std::string& role) const;

  // Starts the coordinator and waits until it serves; binds the control socket.
  Status StartCoordinator(int timeout_ms);
  // Runs `count` actors of `role` (ids <role>-0, <role>-1, ...): starts new
  // ones or drains the highest-numbered ones (SIGTERM).
  Status Scale(const std::string& role, int count);

  // Supervises until should_stop() is true, a stop command arrives, or the
  // learner exits. Returns the learner's exit code, else 0.
  int Supervise(const std::function<bool()>& should_stop);
  // Drains the actors stage by stage in data-flow order (rollout workers,
  // verifiers, learner, replay, other roles, coordinator last): SIGTERM, then
  // SIGKILL for what is left of a stage after stop_timeout_ms (at once when
  // `force`).
  void Shutdown(bool force);

  // Marks the cluster started in cluster.json ("ready": true), which
  // `grove up --detach` waits for.
  void MarkReady();

  const std::string& coordinator() const { return coordinator_; }
  const std::string& control_endpoint() const { return control_endpoint_; }
  // "http://HOST:PORT/metrics" of the coordinator ("" when it serves none).
  std::string metrics_url() const;

 private:
  struct Child {
    std::string role, id;
    int pid = 0;             // 0: not running
    int restarts = 0;        // all restarts (the actor's --restarts)
    int crash_streak = 0;    // crashes in a row, each within restart_reset_ms of its start
    int64_t started_ms = 0;  // monotonic ms of the last start
    bool retiring = false;   // scaled down: do not restart
    int64_t restart_at = 0;  // monotonic ms of a pending restart (0: none)
  };
  Status Spawn(Child& child);
  void Reap();
  void HandleControl(int timeout_ms);
  void ReportExit(const std::string& id, const std::string& reason, bool clean);
  void WriteClusterJson();
  int Count(const std::string& role) const;

  LauncherOptions options_;
  std::string coordinator_;
  std::string coordinator_bind_;
  std::string metrics_address_;  // HOST:PORT of the coordinator's /metrics ("" when off)
  std::string control_endpoint_;
  std::unique_ptr<actors::RouterSocket> control_;
  std::unique_ptr<actors::RpcClient> reporter_;
  std::vector<Child> children_;  // the coordinator is children_[0]
  bool stop_requested_ = false;
  bool ready_ = false;
  bool learner_exited_ = false;
  int learner_exit_code_ = 0;
};

}  // namespace grove
