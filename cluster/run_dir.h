// Run directories: what `grove up` leaves on disk and how the other
// subcommands find a running cluster.
//
//   runs/<name>-<YYYYmmdd-HHMMSS>/
//     cluster.json      {"name", "coordinator": "tcp://H:P", "launcher": "tcp://H:P",
//                        "launcher_pid", "pids": {"<id>": pid, ...}, "config",
//                        "metrics": "http://H:P/metrics" ("" when off)}
//     coordinator.endpoint, coordinator.metrics   what the coordinator bound
//     config.toml       the effective config
//     logs/<id>.log     one per actor (stdout and stderr), launcher.log when detached
//   runs/latest -> <name>-<time>
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace grove {

// Creates runs_root/<name>-<time>/logs and points runs_root/latest at it.
Result<std::string> CreateRunDir(const std::string& runs_root, const std::string& name);

Status WriteJsonAtomically(const std::string& path, const nlohmann::json& value);
Result<nlohmann::json> ReadJsonFile(const std::string& path);

// The run directory to use: `explicit_dir` if set, else $GROVE_RUN_DIR,
// else runs/latest (relative to the working directory).
Result<std::string> FindRunDir(const std::string& explicit_dir);

// The coordinator endpoint: `flag` if set (tcp://HOST:PORT), else the
// "coordinator" entry of the run directory's cluster.json.
Result<std::string> FindCoordinator(const std::string& flag, const std::string& run_dir_flag);

}  // namespace grove
