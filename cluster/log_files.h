// Where an actor's log is: <run_dir>/logs/<id>.log, one file per actor id
// (the launcher appends a restarted actor's output to the same file), plus
// launcher.log when `grove up --detach` ran. `grove logs` resolves what a
// person types to one of these files.
#pragma once

#include <string>
#include <vector>

#include "base/result.h"

namespace grove {

// The actor ids that have a log in run_dir/logs, sorted.
std::vector<std::string> ListLogIds(const std::string& run_dir);

// Resolves `spec` to a log file path. Accepted forms:
//   ID            an exact id ("rollout-1", "coordinator", "launcher")
//   ROLE          the only actor of ROLE ("learner" -> learner-0.log)
//   ROLE/ID       "rollout/rollout-1", or ROLE/N as a short form of ROLE-N
// NotFound (listing the ids that do have logs) for an unknown actor;
// InvalidArgument when a bare role names several actors.
Result<std::string> ResolveLogFile(const std::string& run_dir, const std::string& spec);

}  // namespace grove
