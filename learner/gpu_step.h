// GpuGrpoStep: the device half of GrpoTrainer's step when the learner runs on
// a GPU: the policy (with gradients) and the frozen reference as
// model::GpuTransformer, AdamW's moments on the device, and the update
// (global gradient norm, clipping, fused AdamW with the no-decay ranges)
// without leaving the GPU, for the GRPO step and the supervised warm-start.
// The device holds the current weights: the trainer downloads them to its
// host Model only when something reads that (a checkpoint, an evaluation on
// the CPU; GrpoTrainer::SyncHost), serves published versions from the
// device (CopyParams, DeviceParams), and uploads after anything that
// changes them on the host (the router-bias update, checkpoint loads).
//
// Only built with CUDA (GROVE_HAVE_CUDA); the header needs no CUDA.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "actors/device_buffer.h"
#include "base/result.h"
#include "learner/adamw.h"
#include "learner/grpo_loss.h"
#include "learner/optimizer_step.h"
#include "model/gpu_transformer.h"
#include "model/transformer.h"

namespace grove::learner {

class GpuGrpoStep {
 public:
  // Uploads both models to `device`; moments zero, step 0. no_decay as for
  // AdamW::SetNoDecayRanges (non-trainable tensors are never touched).
  static Result<std::unique_ptr<GpuGrpoStep>> Create(const model::Model& policy, const model::Model& reference,
                                                     const AdamWOptions& options,
                                                     const std::vector<ParamRange>& no_decay, int device = 0);
  ~GpuGrpoStep();

  model::GpuTransformer& policy() { return *policy_; }
  model::GpuTransformer& reference() { return *reference_; }

  // Whose optimizer state an update advances: the supervised warm-start's
  // or the GRPO step's. On the CPU they are two AdamW objects; here they
  // share the moment buffers (twice the model's size again would not fit the
  // reference model beside a rollout engine on one GPU). So the first GRPO
  // update after warm-start updates starts from zero moments, as the CPU's
  // separate GRPO optimizer does, and a warm-start update once GRPO updates
  // were taken is FailedPrecondition (the CPU would continue the warm-start's
  // own moments; the learner never asks for that).
  enum class Phase { kWarmStart, kGrpo };

  // One update from the accumulated device gradients at rate lr: the global
  // norm (squares summed in double on the device), a skip when it is not
  // finite (nothing changes, as learner::ApplyUpdate), clipping to
  // max_grad_norm (<= 0: off), AdamW per contiguous run of decayed / not
  // decayed trainable tensors, then the bf16 compute copies. The parameters stay on the device.
  Result<UpdateReport> Update(double lr, double max_grad_norm, Phase phase = Phase::kGrpo);

  // The GRPO policy loss on the device (kernels::GrpoLoss, the same math as
  // learner::ComputePolicyLoss) over the log-probs of the policy's pending
  // Score(keep_for_backward = true), then the policy's backward from its
  // gradient, without the log-probs leaving the GPU. batch.logp is ignored
  // (the device's are used; it may be empty); the other fields as for
  // ComputePolicyLoss, sized to the scored tokens. The loss and stats come
  // back in fp32 precision; grad_logp only with want_grad_logp (a download).
  Result<PolicyLossOutput> LossAndBackward(const PolicyBatch& batch, const PolicyLossConfig& config,
                                           bool want_grad_logp = false);

  // Frees the buffers a step grows to its largest micro-batch: both models'
  // activations (GpuTransformer::ReleaseActivations) and LossAndBackward's
  // inputs. Parameters, gradients, moments and the step counts stay. After
  // running out of device memory, before a retry with smaller micro-batches.
  Status ReleaseActivations();

  // GRPO updates taken (warm-start ones are not counted here).
  int64_t step() const { return step_; }
  int64_t warmstart_steps() const { return warmstart_step_; }
  // The GRPO moments and step, for checkpoints (AdamW's format). Export
  // after warm-start updates only: the moments are zero then, as GRPO's are.
  Result<AdamWState> ExportState() const;
  Status ImportState(const AdamWState& state);

 private:
  struct Run {
    int64_t offset = 0, count = 0;
    bool decay = true;
  };
  GpuGrpoStep() = default;
  std::unique_ptr<model::GpuTransformer> policy_, reference_;
  AdamWOptions options_;
  std::vector<Run> runs_;
  // fp32 or bf16 moments (options_.moments): MomentBytes() each.
  size_t MomentBytes() const;
  void* m_ = nullptr;
  void* v_ = nullptr;
  actors::DeviceBuffer norm_buf_;  // the gradient norm: its sum of squares, then SumOfSquares' workspace
  actors::DeviceBuffer loss_buf_;  // LossAndBackward's inputs, outputs and workspace
  int64_t step_ = 0;
  int64_t warmstart_step_ = 0;
  Phase moments_of_ = Phase::kGrpo;  // whose moments m_ and v_ hold
};

}  // namespace grove::learner
