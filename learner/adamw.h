// AdamW (Loshchilov & Hutter 2019) over the model's one flat fp32 parameter
// buffer, with PyTorch's update order so a run can be compared with one there:
//   p <- p * (1 - lr * weight_decay)          only where decay is enabled
//   m <- beta1 * m + (1 - beta1) * g
//   v <- beta2 * v + (1 - beta2) * g^2
//   p <- p - lr * (m / (1 - beta1^k)) / (sqrt(v / (1 - beta2^k)) + eps)
// where k is the step count after this step (1 on the first step). Bias
// corrections are computed in double; the per-element update is fp32.
//
// Weight decay is decoupled (never enters m or v) and can be switched off per
// element, so norms, biases and embeddings can be excluded.
//
// The moments are kept in fp32, or in bf16 as DeepSeek-V3 trains (half the
// optimizer state's memory and 22 instead of 30 bytes of traffic a
// parameter on the GPU): each step computes m and v in fp32 from the stored
// values, updates the parameter with those fp32 values, and stores them
// rounded stochastically (kernels/stochastic_round.h says why not to
// nearest) with random bits that depend only on the parameter's index and
// the step, the same on the host and the device. The master weights and
// gradients stay fp32 either way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace grove::learner {

enum class MomentPrecision { kFp32, kBf16 };

// "fp32" or "bf16"; anything else is InvalidArgument naming both.
Result<MomentPrecision> ParseMomentPrecision(std::string_view name);
const char* MomentPrecisionName(MomentPrecision p);

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  MomentPrecision moments = MomentPrecision::kFp32;
};

// InvalidArgument unless beta1, beta2 in [0, 1), eps > 0, weight_decay >= 0.
Status ValidateAdamWOptions(const AdamWOptions& options);

// A half-open range [begin, end) of the flat parameter buffer.
struct ParamRange {
  size_t begin = 0;
  size_t end = 0;
};

// The optimizer's state as flat arrays, for checkpoints (fp32 whatever the
// moments' precision: a checkpoint loads into either).
struct AdamWState {
  int64_t step = 0;      // steps taken
  std::vector<float> m;  // first moment, one per parameter
  std::vector<float> v;  // second moment, one per parameter
};

class AdamW {
 public:
  // State for num_params parameters, zeroed, step 0, decay on everywhere.
  static Result<AdamW> Create(size_t num_params, const AdamWOptions& options);

  size_t num_params() const { return m_.size(); }
  int64_t step() const { return step_; }
  const AdamWOptions& options() const { return options_; }

  // Per-element decay switch: mask[i] != 0 decays parameter i. Size must be
  // num_params().
  Status SetWeightDecayMask(std::span<const uint8_t> mask);
  // Decay everywhere except in these ranges (each inside [0, num_params())).
  Status SetNoDecayRanges(std::span<const ParamRange> ranges);
  bool decays(size_t i) const { return decay_mask_.empty() || decay_mask_[i] != 0; }

  // One update with learning rate lr (>= 0). params and grads must have
  // num_params() entries. Gradients are used as given: clip them first.
  Status Step(std::span<float> params, std::span<const float> grads, double lr);

  // The moments as fp32 values (exact bf16 values with bf16 moments).
  AdamWState ExportState() const;
  // Sizes must match num_params(); step >= 0. With bf16 moments the
  // imported values are rounded to the nearest bf16.
  Status ImportState(const AdamWState& state);
  std::span<const float> m() const { return m_; }
  std::span<const float> v() const { return v_; }

 private:
  AdamW(size_t n, const AdamWOptions& o) : options_(o), m_(n, 0.f), v_(n, 0.f) {}

  AdamWOptions options_;
  int64_t step_ = 0;
  std::vector<float> m_, v_;
  std::vector<uint8_t> decay_mask_;  // empty: decay everywhere
};

// sqrt(sum g^2), accumulated in double. Inf or NaN when a gradient is.
double GlobalGradNorm(std::span<const float> grads);

// Scales grads so their global norm is at most max_norm (max_norm <= 0: no
// clipping) and returns the norm before clipping, for logging. When that norm
// is not finite the gradients are left alone: the caller must skip the step.
double ClipGradNorm(std::span<float> grads, double max_norm);

}  // namespace grove::learner
