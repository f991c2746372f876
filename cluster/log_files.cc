#include "cluster/log_files.h"

#include <algorithm>
#include <filesystem>

namespace grove {

namespace fs = std::filesystem;

std::vector<std::string> ListLogIds(const std::string& run_dir) {
  std::vector<std::string> ids;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(fs::path(run_dir) / "logs", ec)) {
    const fs::path& p = entry.path();
    if (p.extension() == ".log" && entry.is_regular_file(ec)) ids.push_back(p.stem().string());
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

namespace {

std::string Join(const std::vector<std::string>& ids) {
  std::string out;
  for (const auto& id : ids) out += (out.empty() ? "" : ", ") + id;
  return out.empty() ? "(none)" : out;
}

// True for ids of the form ROLE-<something>: the launcher names actors
// ROLE-N, deploy/slurm's joining workers ROLE-<job>-<task>.
bool IdOfRole(const std::string& id, const std::string& role) {
  return id.size() > role.size() + 1 && id.compare(0, role.size(), role) == 0 &&
         id[role.size()] == '-';
}

}  // namespace

Result<std::string> ResolveLogFile(const std::string& run_dir, const std::string& spec) {
  const std::vector<std::string> ids = ListLogIds(run_dir);
  const std::string logs = (fs::path(run_dir) / "logs").string();
  auto path_of = [&](const std::string& id) { return logs + "/" + id + ".log"; };
  auto has = [&](const std::string& id) { return std::binary_search(ids.begin(), ids.end(), id); };
  if (spec.empty() || spec.find("..") != std::string::npos) {
    return Status::InvalidArgument("want ROLE, ROLE/ID or ID, got '" + spec + "'");
  }
  const auto slash = spec.find('/');
  if (slash != std::string::npos) {
    const std::string role = spec.substr(0, slash), id = spec.substr(slash + 1);
    if (role.empty() || id.empty() || id.find('/') != std::string::npos) {
      return Status::InvalidArgument("want ROLE/ID (e.g. rollout/rollout-1 or rollout/1), got '" +
                                     spec + "'");
    }
    if (has(id) && (id == role || IdOfRole(id, role))) return path_of(id);
    if (has(role + "-" + id) && IdOfRole(role + "-" + id, role)) return path_of(role + "-" + id);
    return Status::NotFound("no log for " + spec + " in " + logs + "; actors with logs: " +
                            Join(ids));
  }
  if (has(spec)) return path_of(spec);
  std::vector<std::string> of_role;
  for (const auto& id : ids) {
    if (IdOfRole(id, spec)) of_role.push_back(id);
  }
  if (of_role.size() == 1) return path_of(of_role[0]);
  if (of_role.size() > 1) {
    return Status::InvalidArgument(spec + " has " + std::to_string(of_role.size()) +
                                   " actors; name one: " + Join(of_role));
  }
  return Status::NotFound("no log for '" + spec + "' in " + logs + "; actors with logs: " +
                          Join(ids));
}

}  // namespace grove
