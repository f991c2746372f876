#include "cluster/roles.h"

#include "learner/learner_actor.h"
#include "replay/replay_actor.h"
#include "reward/verifier_actor.h"
#include "rollout/rollout_actor.h"

namespace grove {

const std::vector<RoleEntry>& Roles() {
  static const std::vector<RoleEntry> roles = {
      {"coordinator", &RunCoordinator,
       "membership, health, the prompt queue and status (one per cluster)"},
      {"replay", &replay::RunReplay, "the RocksDB replay store of scored groups (one per cluster)"},
      {"learner", &learner::RunLearner, "warm-start, GRPO steps, checkpoints, weight publishing (one)"},
      {"rollout", &rollout::RunRollout, "samples groups of completions from the int8 policy (scale freely)"},
      {"verifier", &reward::RunVerifier, "scores groups with the task's verifiers (scale freely)"},
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
