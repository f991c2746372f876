// The rollout worker process (`grove run rollout`): pulls prompts from the
// coordinator, samples a group of completions per prompt from its quantized
// copy of the policy ([rollout] quantize, policy_quantizer.h) (per-token log-probs, routed experts and the policy
// version on every sample), and sends each group to a verifier, which scores
// it and has the replay store persist it. A prompt is reported done only
// once its group is acknowledged as stored, so a worker that dies loses
// nothing: its leased prompts go back to the queue.
//
// New weights are fetched between requests, never mid-group.
#pragma once

#include "actors/role_args.h"

namespace grove::rollout {

int RunRollout(const RoleArgs& args);

}  // namespace grove::rollout
