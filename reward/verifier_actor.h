// The verifier process (`grove run verifier`): receives sample groups from
// rollout workers, scores every completion with the task's weighted verifier
// set in a pool of sandboxed worker processes (a verifier that crashes, hangs
// or throws costs one sample a zero reward, never this process), forwards the
// scored group to the replay store, and answers the rollout worker with the
// store's acknowledgement. It holds nothing: a verifier that dies loses no
// group, because the rollout worker sends it again to another.
#pragma once

#include "actors/role_args.h"

namespace grove::reward {

int RunVerifier(const RoleArgs& args);

}  // namespace grove::reward
