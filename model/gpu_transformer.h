// GpuTransformer: model::Transformer's Score/Backward on one CUDA GPU, for
// the learner. Same architecture, parameter layout and results as the CPU
// model (transformer.h), computed in bf16 with fp32 accumulation:
//
// - Parameters: fp32 master copy in ParamLayout order (what Upload/Download
//   move and what the optimizer updates in place) and a bf16 mirror of it in
//   the same order (what every GEMM reads, the experts' weights in place:
//   the forward's y = x W^T reads them K-major, the backward's dX = dY W
//   MN-major, so no other copy of them exists). ParamLayout keeps each
//   expert's w1, w3, w2 adjacent (3 F H elements per expert), which both
//   rely on.
// - Gradients: fp32 in ParamLayout order, accumulated by Backward() (cuBLAS
//   writes weight gradients straight into them with beta = 1), except that
//   the first Backward after ZeroGrad overwrites them (beta = 0): ZeroGrad
//   itself only marks them zero. Reading them (device_grads, DownloadGrads)
//   before that Backward zeroes them first, so they always read as zero +
//   the Backwards since.
// - Activations: the residual stream is bf16 (what RmsNormForward reads;
//   every residual add rounds once, ~2^-9 relative per layer), its gradient
//   fp32 (summed from several branches per layer, rounded to bf16 only where
//   a GEMM reads it).
//
// Supported shapes: head_dim 32, 64 or 128 (the attention kernel), hidden,
// vocab, widths and every tensor offset multiples of 8 (16-byte rows),
// experts <= 256, top_k <= 16. Create() says which rule a config breaks.
//
// This header needs no CUDA: device pointers are exposed as void*/float*.
// Not thread-safe; one GPU per object (the device is made current in each
// call).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "base/result.h"
#include "model/config.h"
#include "model/gpu_transformer_profile.h"
#include "model/param_layout.h"
#include "model/transformer.h"

namespace grove::model {

class GpuTransformer {
 public:
  // Number of usable CUDA devices (0 without a driver or GPU).
  static int DeviceCount();

  // Allocates everything for `config` on `device`; parameters start at 0
  // (UploadParams them). trainable=false (a frozen reference) allocates no
  // gradient buffer, and Backward fails.
  static Result<std::unique_ptr<GpuTransformer>> Create(const ModelConfig& config, int device = 0,
                                                        bool trainable = true);
  ~GpuTransformer();

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  int device() const { return device_; }

  // Whole parameter buffer, layout().total() floats (InvalidArgument
  // otherwise); Upload refreshes the compute copies.
  Status UploadParams(std::span<const float> params);
  // As UploadParams from fp32 params already on this model's device
  // (layout().total() floats in layout order, complete when called, e.g. a
  // CUDA IPC copy): copied device to device, the bf16 mirror refreshed;
  // returns once both are done. On failure the master and mirror may hold a
  // mix: load them again before use.
  Status LoadParamsFromDevice(const float* params);
  Status DownloadParams(std::span<float> params) const;
  // Replaces params[offset, offset + values.size()) and refreshes the
  // compute copies of that range (e.g. the router bias after its update).
  Status UploadRange(int64_t offset, std::span<const float> values);

  // As Transformer::Score (same validation, same semantics: routing replay,
  // routes, expert_load, balance_loss). keep_for_backward keeps this
  // batch's activations for one Backward(); a Score without it leaves them.
  // A frozen model (trainable=false) keeps them too, for KeptFfn; only its
  // Backward fails. return_routes = false leaves ScoreResult::routes empty
  // (the learner's step, which replays them, reads only the log-probs and
  // expert_load). A batch that fails the checks changes nothing here: a
  // pending Score(keep_for_backward)'s activations stay for its Backward.
  Result<ScoreResult<float>> Score(const std::vector<ScoreRequest>& batch, bool keep_for_backward,
                                   bool return_routes = true);

  // After a Score(keep_for_backward=true), layer `layer`'s FFN input as
  // Transformer::KeptFfnInputs has it, on the device (stream() order; valid
  // until the next Score(keep) or ReleaseActivations): x the ffn_norm output
  // (bf16 [rows, hidden], rows = the packed batch's input positions,
  // requests in order); MoE layers: experts (uint16 [rows, top_k]) and gates
  // (fp32 [rows, top_k]), null for dense layers. For measuring quantization
  // error on real activations (rollout/gpu_precision_plan.h).
  struct DeviceFfnInputs {
    int64_t rows = 0;
    const void* x = nullptr;
    const uint16_t* experts = nullptr;
    const float* gates = nullptr;
  };
  Result<DeviceFfnInputs> KeptFfn(int64_t layer) const;
  // The last Score's final-norm output on its scored rows (bf16
  // [last_scored_rows(), hidden], requests in order): lm_head of it gives
  // the full next-token logits. Valid until the next Score.
  const void* last_scored_hidden() const;
  int64_t last_scored_rows() const;
  // As Transformer::Backward: accumulates into the device gradients.
  Status Backward(const std::vector<std::vector<float>>& dlogprobs);
  // The last Score(keep_for_backward=true)'s log-probs on the device
  // (scored_tokens() floats, requests in order; null / 0 when no such Score
  // is pending), and Backward from their gradients already on the device
  // (scored_tokens() floats, written on stream() before this call).
  const float* device_logprobs() const;
  int64_t scored_tokens() const;
  Status BackwardFromDevice(const float* dlogprobs);
  // Gradients := 0 (lazily, see above: costs no pass over them).
  Status ZeroGrad();
  // *result (device double, stream() order) = the sum of the squares of
  // every gradient element, for the optimizer's global norm. Where the
  // experts' weight gradients were last written by their grouped dW kernels
  // in the Backward that overwrote them (one micro-batch since ZeroGrad, and
  // no device_grads since: a writable pointer), those kernels' own sums of
  // what they wrote
  // (kernels::GroupedWeightGradArgs::sum_sq) stand in for reading them:
  // ~90% of gpu-ref's gradients; the rest is read. Either way the exact sum
  // within ~4e-6 relative. workspace: kernels::SumOfSquaresWorkspaceBytes().
  // Returns how many gradient elements the pass read (layout().total() when
  // the kernels' sums were not usable).
  Result<int64_t> GradSumOfSquares(double* result, void* workspace, size_t workspace_bytes);
  Status DownloadGrads(std::span<float> grads) const;
  // Frees what Score and Backward grow to their largest batch so far (the
  // tapes of activations kept for the backward, the scratch forward's, the
  // backward's workspaces), after waiting for this model's streams. Keeps
  // the parameters, gradients and bf16 mirror: the model's
  // state. A pending Score(keep_for_backward) is dropped (Backward then
  // fails until the next such Score). For a caller that ran out of device
  // memory and retries with smaller batches: the buffers grow again, to
  // those batches' sizes.
  Status ReleaseActivations();

  // For an optimizer on the device (learner/): the fp32 master parameters,
  // their gradients (writable: taking the pointer forgets the dW kernels'
  // sums of squares, see GradSumOfSquares) and the bf16 mirror (layout
  // order), and the stream all work is enqueued on (a cudaStream_t). After
  // changing the fp32 parameters on the device without writing the mirror
  // too, call RefreshMirror.
  float* device_params();
  float* device_grads();
  void* device_params_bf16();
  void* stream() const;
  // Recomputes the bf16 mirror from the fp32 master (the only compute copy:
  // every GEMM reads the weights where they lie in it).
  Status RefreshMirror();
  // Waits for the stream.
  Status Synchronize() const;

  // Per-phase timing of Score, Backward and RefreshMirror (and of
  // whatever else a caller laps on this model's stream, e.g. the
  // optimizer); off unless GROVE_GPU_PROFILE=1 at Create or SetEnabled.
  PhaseTimer& profiler();

  struct Impl;

 private:
  GpuTransformer(const ModelConfig& config, int device, bool trainable);
  // The memset a ZeroGrad deferred, when no Backward has overwritten yet.
  Status MaterializeZeroGrad() const;
  ModelConfig config_;
  ParamLayout layout_;
  int device_ = 0;
  bool trainable_ = true;
  std::unique_ptr<Impl> impl_;
};

}  // namespace grove::model
