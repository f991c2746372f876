// The rollout worker process (`grove run rollout`): pulls prompts from the
// coordinator, samples a group of completions per prompt from its quantized
// copy of the policy ([rollout] quantize, policy_quantizer.h) (per-token log-probs, routed experts and the policy
// version on every sample), and sends each group to a verifier, which scores
// it and has the replay store persist it. A prompt is reported done only
// once its group is acknowledged as stored, so a worker that dies loses
// nothing: its leased prompts go back to the queue.
//
// New weights are fetched between requests, never mid-group. Where they
// come from (ZeroMQ, NCCL or CUDA IPC) is WeightSource's choice
// (weight_fetch.h); what samples is [rollout] device (generation_backend.h).
#pragma once

#include "actors/role_args.h"
#include "base/status.h"

namespace grove::rollout {

int RunRollout(const RoleArgs& args);

// The checks a worker makes on `config` at start, without starting:
// [rollout] (engine and quantization keys included), [model], [task] and
// [weights] (InvalidArgument naming the file). check_device: also that the
// engine rollout.device asks for can run here (FailedPrecondition for
// device = gpu without a GPU engine or a visible GPU, InvalidArgument for a
// gpu index this process does not see); the engine's shape rules are only
// known to the engine and checked when a worker starts it.
Status ValidateRolloutConfig(const Config& config, bool check_device);

}  // namespace grove::rollout
