// GrpoTrainer: one learner's model, frozen reference, optimizer and policy
// version, and the two kinds of step it takes: a supervised warm-start step
// on demonstrations (DeepSeek-R1's cold start) and a GRPO step on scored
// groups. It owns no socket; the learner actor feeds it and publishes what
// it returns.
//
// A GRPO step, in order: drop groups whose rewards are all equal (DAPO's
// dynamic sampling, when on), take group-relative advantages, score every
// completion under the current policy with the rollout's routes replayed,
// score it under the frozen reference (when beta > 0), compute the GRPO loss
// and its gradient per token against the rollout's log-probs (truncated IS),
// back-propagate micro-batch by micro-batch, clip, take an AdamW step, update
// the router bias from the expert loads (aux-loss-free balancing), and
// advance the policy version by one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "learner/adamw.h"
#include "learner/grpo_config.h"
#include "learner/lr_schedule.h"
#include "learner/micro_batches.h"
#include "learner/optimizer_step.h"
#include "learner/training_group.h"
#include "model/transformer.h"

namespace grove::learner {

// Where the step runs ([learner] device): kAuto takes the GPU when one is
// present and the model fits GpuTransformer's shapes (else the CPU, with a
// log line saying why); kGpu fails Create() instead of falling back.
enum class LearnerDevice { kAuto, kCpu, kGpu };
// "auto" | "cpu" | "gpu"; InvalidArgument naming the value otherwise.
Result<LearnerDevice> ParseLearnerDevice(std::string_view name);

class GpuGrpoStep;  // learner/gpu_step.h, built only with CUDA
struct GpuGrpoStepDeleter {
  void operator()(GpuGrpoStep* step) const;
};

struct TrainerOptions {
  GrpoConfig grpo;
  LearnerDevice device = LearnerDevice::kCpu;
  bool routing_replay = true;       // score with the experts the rollout chose
  bool update_router_bias = true;   // aux-loss-free balancing after each step
  int64_t micro_batch = 32;         // sequences per forward/backward
  // Tokens (prompt + completion) per forward/backward, at most; 0: no
  // bound. A sequence longer than it is a micro-batch of its own. The
  // step's device memory grows with a micro-batch's tokens, not its
  // sequences.
  int64_t micro_batch_tokens = 0;
};

struct GrpoStepStats {
  int64_t version = 0;              // policy version after the step
  int64_t groups = 0;               // groups received
  int64_t groups_dropped = 0;       // all-equal rewards, dropped by dynamic sampling
  int64_t sequences = 0;            // completions trained on
  int64_t tokens = 0;               // completion tokens trained on
  double reward_mean = 0;           // over every received completion
  double staleness_mean = 0;        // version before the step minus sample version
  int64_t staleness_max = 0;
  double loss = 0;
  PolicyLossStats policy;           // token-weighted over micro-batches
  UpdateReport update;
  double seconds = 0;
};

struct SupervisedExample {
  std::vector<int32_t> prompt;      // conditioning tokens, not trained on
  std::vector<int32_t> completion;  // trained on: -mean log p
};

struct SupervisedStepStats {
  double loss = 0;                  // mean negative log-likelihood per completion token
  double confident_fraction = 0;    // completion tokens the model gives p > 1/2 (surely its argmax)
  int64_t tokens = 0;
  UpdateReport update;
};

class GrpoTrainer {
 public:
  // Takes ownership of `policy`; the reference starts as a copy of it.
  static Result<std::unique_ptr<GrpoTrainer>> Create(std::unique_ptr<model::Model> policy,
                                                     TrainerOptions options);
  // Whether device = gpu can be had here: a CUDA build and a visible GPU.
  static bool GpuAvailable();

  Result<GrpoStepStats> Step(const std::vector<TrainingGroup>& groups);

  // One supervised step with its own optimizer state and constant `lr`.
  Result<SupervisedStepStats> SupervisedStep(const std::vector<SupervisedExample>& batch, double lr);

  // On the GPU, Step and SupervisedStep leave their update there: the
  // parameters of policy() (the host model) are behind until SyncHost
  // (FreezeReference and SaveCheckpoint sync first). CopyParams and
  // DeviceParams always have the current weights; the router bias, which
  // only the host moves, is current on both.
  Status SyncHost();
  // The current parameters (ParamLayout order) into `out`, sized to them.
  Status CopyParams(std::span<float> out) const;

  // The reference becomes a copy of the current policy (after warm-start).
  void FreezeReference();

  model::Model& policy() { return *policy_; }
  const model::Model& policy() const { return *policy_; }
  int64_t version() const { return version_; }
  void set_version(int64_t v) { version_ = v; }
  int64_t rl_steps() const;
  // True when Step() runs on the GPU (GpuGrpoStep).
  bool on_gpu() const { return gpu_ != nullptr; }
  // The CUDA device the step runs on; -1 on the CPU.
  int gpu_device() const;
  // The policy's fp32 master weights on `device` (ParamLayout order, the
  // bytes policy().params() was last synced from), after waiting for the
  // GPU step's stream, for a device-to-device copy of a published version;
  // null when the step runs on the CPU or on another device. Valid until
  // the next Step / SupervisedStep / checkpoint load.
  Result<const float*> DeviceParams(int device);
  const TrainerOptions& options() const { return options_; }
  // The token bound micro-batches are cut to now (0: none): the options'
  // micro_batch_tokens, or less once a step on the GPU ran out of device
  // memory and was redone with half its largest micro-batch's tokens (the
  // bound stays lowered for the steps after, GRPO and supervised).
  int64_t micro_batch_tokens() const { return micro_batch_tokens_; }

  // Weights (model file), optimizer state beside it, and the version and
  // the reference's weights, so a restarted learner continues exactly.
  Status SaveCheckpoint(const std::string& dir);
  Status LoadCheckpoint(const std::string& dir);

 private:
  // The host policy's parameters after a step on the GPU (weights publishing
  // and checkpoints read the host Model), and uploads after host changes.
  Status SyncFromGpu();
  Status SyncPolicyToGpu();
  // Score (policy or frozen reference), Backward and ZeroGrad on the model
  // the step runs on: the GPU's when there is one, else the host's. The
  // GPU's Score returns no routes (the steps do not read them).
  Result<model::ScoreResult<float>> ScoreOnStepDevice(bool policy, const std::vector<model::ScoreRequest>& reqs,
                                                      bool keep_for_backward);
  Status BackwardOnStepDevice(const std::vector<std::vector<float>>& dlogp);
  Status ZeroGradOnStepDevice();
  // One step's device work over micro-batches: `attempt` gets the ranges of
  // the step's sequences and counts in `started` the micro-batches it has
  // begun. It must start from nothing each call (zero the gradients, reset
  // its sums): on the GPU, when it fails with ResourceExhausted (out of
  // device memory), the activations are freed, micro_batch_tokens_ is
  // lowered to half the largest micro-batch tried that a bound can split,
  // and `attempt` runs again over the new cut. ResourceExhausted naming what
  // to change when one sequence alone does not fit; other errors as they are.
  using MicroBatchAttempt = std::function<Status(const std::vector<MicroBatchRange>& ranges, size_t& started)>;
  Status RunMicroBatches(const std::vector<int64_t>& lengths, const MicroBatchAttempt& attempt);
  GrpoTrainer(std::unique_ptr<model::Model> policy, std::unique_ptr<model::Model> reference,
              TrainerOptions options, AdamW optimizer, AdamW sft_optimizer, LrSchedule schedule);

  std::unique_ptr<model::Model> policy_;
  std::unique_ptr<model::Model> reference_;
  TrainerOptions options_;
  AdamW optimizer_;
  AdamW sft_optimizer_;
  LrSchedule schedule_;
  int64_t version_ = 0;
  int64_t micro_batch_tokens_ = 0;  // see micro_batch_tokens()
  bool host_behind_ = false;  // GPU warm-start steps not yet downloaded to policy_
  std::unique_ptr<GpuGrpoStep, GpuGrpoStepDeleter> gpu_;  // null: the step runs on the CPU
};

// The no-weight-decay ranges of a model: norms, embeddings, router bias.
std::vector<ParamRange> NoDecayRanges(const model::ParamLayout& layout);

}  // namespace grove::learner
