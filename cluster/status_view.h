// Status as `grove status` shows it: fetched from the coordinator, turned
// into JSON ({"cluster": {...}, "actors": [...]}, documented in
// cluster/coordinator.h's status fields) and rendered as a table.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace grove {

// Asks the coordinator at `endpoint` for its status (dead and stopped
// actors included). DeadlineExceeded when it does not answer in time.
Result<nlohmann::json> FetchStatus(const std::string& endpoint, int timeout_ms);

// A table a person reads at a glance: one cluster line on top, then one row
// per actor (role, id, state, heartbeat age, uptime, restarts, version, RSS,
// and the role's counters, a latency window as one `name=P50/P99ms` item,
// or the exit reason).
std::string RenderStatusTable(const nlohmann::json& status);

}  // namespace grove
