#include "replay/replay_config.h"

namespace grove::replay {
namespace {

Result<uint64_t> NonNegative(const Config& c, std::string_view key, int64_t fallback) {
  GROVE_ASSIGN_OR_RETURN(int64_t v, c.Int(key, fallback));
  if (v < 0) return Status::InvalidArgument("replay." + std::string(key) + " must be >= 0, got " + std::to_string(v));
  return static_cast<uint64_t>(v);
}

}  // namespace

Result<ReplayOptions> ReplayOptionsFromConfig(const Config& section) {
  GROVE_RETURN_IF_ERROR(section.CheckKeys({"path", "sync_mode", "max_unconsumed", "min_size_to_serve",
                                           "samples_per_insert", "samples_per_insert_error_buffer",
                                           "lease_timeout_ms", "group_commit_max_mb", "verify_records_at_open",
                                           "retire_on_consume", "retire_min_groups"}));
  ReplayOptions o;
  GROVE_ASSIGN_OR_RETURN(o.store.path, section.String("path"));
  GROVE_ASSIGN_OR_RETURN(std::string mode, section.String("sync_mode", std::string("group_commit")));
  GROVE_ASSIGN_OR_RETURN(o.store.sync_mode, ParseSyncMode(mode));
  GROVE_ASSIGN_OR_RETURN(uint64_t group_mb, NonNegative(section, "group_commit_max_mb", 64));
  if (group_mb == 0) return Status::InvalidArgument("replay.group_commit_max_mb must be positive");
  o.store.group_commit_max_bytes = static_cast<size_t>(group_mb) << 20;
  GROVE_ASSIGN_OR_RETURN(o.store.verify_records_at_open, section.Bool("verify_records_at_open", true));
  GROVE_ASSIGN_OR_RETURN(o.max_unconsumed, NonNegative(section, "max_unconsumed", 4096));
  GROVE_ASSIGN_OR_RETURN(o.min_size_to_serve, NonNegative(section, "min_size_to_serve", 1));
  GROVE_ASSIGN_OR_RETURN(o.samples_per_insert, section.Double("samples_per_insert", 0.0));
  GROVE_ASSIGN_OR_RETURN(o.samples_per_insert_error_buffer, section.Double("samples_per_insert_error_buffer", 0.0));
  GROVE_ASSIGN_OR_RETURN(uint64_t lease_ms, NonNegative(section, "lease_timeout_ms", 0));
  o.lease_timeout = std::chrono::milliseconds(lease_ms);
  GROVE_ASSIGN_OR_RETURN(o.retire_on_consume, section.Bool("retire_on_consume", true));
  GROVE_ASSIGN_OR_RETURN(o.retire_min_groups, NonNegative(section, "retire_min_groups", 1024));
  return o;
}

}  // namespace grove::replay
