// Process loop: the shape every role's main follows.
//
//   ASSIGN_OR_RETURN(auto proc, ActorProcess::Start(args, wire::Role::ROLLOUT, my_endpoint));
//   while (!proc->draining()) { ...take and do one piece of work...; }
//   proc->ReportDraining();          // "draining" in grove status
//   ...finish in-flight work unless proc->stopping()...
//   return proc->Finish(0, "");      // "stopped"; the exit code to return
//
// draining() turns true on the first SIGTERM or SIGINT, or on a drain or stop
// command from the coordinator; stopping() on a second SIGTERM/SIGINT or a
// stop command. The signal handler only sets an atomic flag
// (async-signal-safe); nothing else happens inside it.
#pragma once

#include <memory>
#include <string>

#include "actors/actor_client.h"
#include "actors/role_args.h"
#include "base/result.h"

namespace grove::actors {

// glog to stderr (the launcher sends a child's stderr to logs/<id>.log),
// with `actor_id` in every line: "I1122 19:05:03.123 rollout-0 file.cc:12] ...".
void InitActorLogging(const char* argv0, const std::string& actor_id);

// SIGTERM/SIGINT: first sets the drain flag, second sets the stop flag.
void InstallDrainSignalHandlers();
bool DrainSignalled();
bool StopSignalled();
// Sets the drain flag as if signalled (tests, or a role deciding to end).
void RequestDrain();

class ActorProcess {
 public:
  // Installs the signal handlers, registers with args.coordinator and starts
  // heartbeating. Logging is initialised by `grove run` before this.
  static Result<std::unique_ptr<ActorProcess>> Start(const RoleArgs& args, wire::Role role,
                                                     std::string data_endpoint);

  ActorClient& client() { return *client_; }
  bool draining() const;
  bool stopping() const;

  // Tells the coordinator this actor is draining (idempotent).
  void ReportDraining();
  // Reports the end ("stopped" when exit_code is 0, else "dead" with the
  // reason), stops heartbeating and returns exit_code.
  int Finish(int exit_code, const std::string& reason);
  // Sleeps up to ms; returns early once draining() is true.
  void WaitFor(int ms) const;

 private:
  explicit ActorProcess(std::unique_ptr<ActorClient> client) : client_(std::move(client)) {}
  std::unique_ptr<ActorClient> client_;
  bool reported_draining_ = false;
  bool finished_ = false;
};

}  // namespace grove::actors
