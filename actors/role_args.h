// RoleArgs: what `grove run ROLE` hands to a role's entry point. Every role
// is `int Run<Role>(const RoleArgs&)` (returning the process exit code) and
// is listed in cluster/'s role table.
#pragma once

#include <cstdint>
#include <string>

#include "base/config.h"

namespace grove {

struct RoleArgs {
  std::string role;          // "coordinator", "rollout", ...
  std::string id;            // unique actor id, e.g. "rollout-0"
  std::string coordinator;   // tcp://HOST:PORT of the coordinator ("" for the coordinator)
  std::string bind;          // where to serve: the coordinator's control socket or a role's
                             // data socket; port 0 picks a free port
  std::string config_path;   // the experiment file ("" when none)
  Config config;             // its parsed contents (with --set overrides applied)
  uint32_t restarts = 0;     // how often the launcher restarted this id
  std::string run_dir;       // the run directory ("" when started by hand)
  std::string endpoint_file; // if set, a server writes its bound endpoint here
};

}  // namespace grove
