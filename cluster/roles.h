// The role table: what `grove run ROLE` can start. One line per role in
// roles.cc; a role is `int Run<Role>(const RoleArgs&)` returning the process
// exit code. `grove up` refuses a config naming a role that is not here
// (unless [launcher.programs] names an external program for it).
#pragma once

#include <string>
#include <vector>

#include "actors/role_args.h"

namespace grove {

using RoleMain = int (*)(const RoleArgs&);

struct RoleEntry {
  const char* name;
  RoleMain main;
  const char* summary;
};

const std::vector<RoleEntry>& Roles();
const RoleEntry* FindRole(const std::string& name);

// The coordinator's entry point (cluster/coordinator_role.cc).
int RunCoordinator(const RoleArgs& args);

}  // namespace grove
