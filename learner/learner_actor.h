// The learner process (`grove run learner`): warm-start on demonstrations,
// then GRPO steps on batches from the replay store, publishing each new
// policy version to rollout workers, checkpointing, evaluating on held-out
// problems, and writing one metrics line per step to RUN_DIR/metrics.jsonl.
//
// Restart: the newest checkpoint in RUN_DIR/checkpoints/latest and the replay
// store's cursor for this learner together give the resume point; versions
// only go up, and groups the store has marked consumed are never served again.
// Exits 0 when [learner] steps are done (after a final checkpoint and eval),
// or on drain (SIGTERM) after a checkpoint.
#pragma once

#include "actors/role_args.h"
#include "base/status.h"

namespace grove::learner {

int RunLearner(const RoleArgs& args);

// The checks a learner makes on `config` at start, without starting:
// [learner] (with its grpo tables), [model], [task], [weights] and the
// model's vocabulary against the tokenizer (InvalidArgument naming the
// file). check_device: also that [learner] device = gpu can run here
// (FailedPrecondition without a GPU or a CUDA build).
Status ValidateLearnerConfig(const Config& config, bool check_device);

}  // namespace grove::learner
