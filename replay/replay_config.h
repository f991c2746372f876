// Reads ReplayOptions from the [replay] table of an experiment file.
//
//   [replay]
//   path = "/var/lib/grove/replay"     # required
//   sync_mode = "group_commit"         # or "per_write"
//   max_unconsumed = 4096
//   min_size_to_serve = 64
//   samples_per_insert = 1.0           # 0: off
//   samples_per_insert_error_buffer = 256
//   lease_timeout_ms = 0               # 0: leases end only with MarkConsumed or a restart
//   group_commit_max_mb = 64
//   verify_records_at_open = true
//   retire_on_consume = true
//   retire_min_groups = 1024
#pragma once

#include "base/config.h"
#include "base/result.h"
#include "replay/replay_service.h"

namespace grove::replay {

// `section` is the [replay] table (config.Section("replay")). Unknown keys and
// wrong types are InvalidArgument naming the key.
Result<ReplayOptions> ReplayOptionsFromConfig(const Config& section);

}  // namespace grove::replay
