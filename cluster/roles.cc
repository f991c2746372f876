#include "cluster/roles.h"

namespace grove {

const std::vector<RoleEntry>& Roles() {
  static const std::vector<RoleEntry> roles = {
      {"coordinator", &RunCoordinator,
       "membership, health, the prompt queue and status (one per cluster)"},
  };
  return roles;
}

const RoleEntry* FindRole(const std::string& name) {
  for (const auto& r : Roles()) {
    if (name == r.name) return &r;
  }
  return nullptr;
}

}  // namespace grove
