#include "learner/adamw.h"

#include <cmath>
#include <string>

#include "kernels/stochastic_round.h"

namespace grove::learner {

Status ValidateAdamWOptions(const AdamWOptions& o) {
  if (!(o.beta1 >= 0.0 && o.beta1 < 1.0))
    return Status::InvalidArgument("adamw beta1 must be in [0, 1), got " + std::to_string(o.beta1));
  if (!(o.beta2 >= 0.0 && o.beta2 < 1.0))
    return Status::InvalidArgument("adamw beta2 must be in [0, 1), got " + std::to_string(o.beta2));
  if (!(o.eps > 0.0) || !std::isfinite(o.eps))
    return Status::InvalidArgument("adamw eps must be a finite value > 0, got " + std::to_string(o.eps));
  if (!(o.weight_decay >= 0.0) || !std::isfinite(o.weight_decay))
    return Status::InvalidArgument("adamw weight_decay must be a finite value >= 0, got " +
                                   std::to_string(o.weight_decay));
  return Status::OK();
}

Result<AdamW> AdamW::Create(size_t num_params, const AdamWOptions& options) {
  GROVE_RETURN_IF_ERROR(ValidateAdamWOptions(options));
  return AdamW(num_params, options);
}

Status AdamW::SetWeightDecayMask(std::span<const uint8_t> mask) {
  if (mask.size() != m_.size())
    return Status::InvalidArgument("weight decay mask has " + std::to_string(mask.size()) + " entries for " +
                                   std::to_string(m_.size()) + " parameters");
  decay_mask_.assign(mask.begin(), mask.end());
  return Status::OK();
}

Status AdamW::SetNoDecayRanges(std::span<const ParamRange> ranges) {
  std::vector<uint8_t> mask(m_.size(), 1);
  for (const ParamRange& r : ranges) {
    if (r.begin > r.end || r.end > m_.size())
      return Status::InvalidArgument("no-decay range [" + std::to_string(r.begin) + ", " + std::to_string(r.end) +
                                     ") is not inside [0, " + std::to_string(m_.size()) + ")");
    for (size_t i = r.begin; i < r.end; ++i) mask[i] = 0;
  }
  decay_mask_ = std::move(mask);
  return Status::OK();
}

Result<MomentPrecision> ParseMomentPrecision(std::string_view name) {
  if (name == "fp32") return MomentPrecision::kFp32;
  if (name == "bf16") return MomentPrecision::kBf16;
  return Status::InvalidArgument("adamw moments: unknown precision '" + std::string(name) + "' (known: fp32, bf16)");
}

const char* MomentPrecisionName(MomentPrecision p) { return p == MomentPrecision::kBf16 ? "bf16" : "fp32"; }

Status AdamW::Step(std::span<float> params, std::span<const float> grads, double lr) {
  const size_t n = m_.size();
  if (params.size() != n || grads.size() != n)
    return Status::InvalidArgument("adamw step: " + std::to_string(params.size()) + " params and " +
                                   std::to_string(grads.size()) + " grads for a state of " + std::to_string(n));
  if (!(lr >= 0.0) || !std::isfinite(lr))
    return Status::InvalidArgument("adamw step: learning rate must be finite and >= 0, got " + std::to_string(lr));
  ++step_;
  const double k = static_cast<double>(step_);
  const double bc1 = 1.0 - std::pow(options_.beta1, k);
  const double bc2 = 1.0 - std::pow(options_.beta2, k);
  // p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), folded into two fp32 constants.
  const float step_size = static_cast<float>(lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float b1 = static_cast<float>(options_.beta1), b2 = static_cast<float>(options_.beta2);
  const float one_minus_b1 = static_cast<float>(1.0 - options_.beta1);
  const float one_minus_b2 = static_cast<float>(1.0 - options_.beta2);
  const float eps = static_cast<float>(options_.eps);
  const float decay = static_cast<float>(1.0 - lr * options_.weight_decay);
  float* __restrict p = params.data();
  const float* __restrict g = grads.data();
  float* __restrict m = m_.data();
  float* __restrict v = v_.data();
  // Two copies of a branch-free body (with and without a mask) so the
  // compiler vectorizes both; the mask picks the decay factor by a select.
  // The stored moments are rounded after the parameter's update used them.
  auto update = [&](auto decay_of, auto store_moments) {
    for (size_t i = 0; i < n; ++i) {
      const float gi = g[i];
      const float mi = b1 * m[i] + one_minus_b1 * gi;
      const float vi = b2 * v[i] + one_minus_b2 * gi * gi;
      store_moments(i, mi, vi);
      p[i] = p[i] * decay_of(i) - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
    }
  };
  auto with_decay = [&](auto store_moments) {
    if (decay_mask_.empty()) {
      update([decay](size_t) { return decay; }, store_moments);
    } else {
      const uint8_t* mask = decay_mask_.data();
      update([decay, mask](size_t i) { return mask[i] != 0 ? decay : 1.0f; }, store_moments);
    }
  };
  if (options_.moments == MomentPrecision::kFp32) {
    with_decay([m, v](size_t i, float mi, float vi) {
      m[i] = mi;
      v[i] = vi;
    });
    return Status::OK();
  }
  const int64_t step = step_;
  with_decay([m, v, step](size_t i, float mi, float vi) {
    // The same bits as kernels/adamw.cu's for this index and step.
    const uint32_t r = kernels::StochasticRoundBits(kernels::StochasticRoundStepKey(step, uint64_t(i) >> 32), i);
    m[i] = kernels::Bf16BitsToFloat(kernels::Bf16StochasticRound(mi, r));
    v[i] = kernels::Bf16BitsToFloat(kernels::Bf16StochasticRound(vi, r >> 16));
  });
  return Status::OK();
}

AdamWState AdamW::ExportState() const { return AdamWState{step_, m_, v_}; }

Status AdamW::ImportState(const AdamWState& s) {
  if (s.m.size() != m_.size() || s.v.size() != v_.size())
    return Status::InvalidArgument("adamw state has " + std::to_string(s.m.size()) + "/" +
                                   std::to_string(s.v.size()) + " moments for " + std::to_string(m_.size()) +
                                   " parameters");
  if (s.step < 0) return Status::InvalidArgument("adamw state step is negative");
  step_ = s.step;
  m_ = s.m;
  v_ = s.v;
  if (options_.moments == MomentPrecision::kBf16) {
    for (float& x : m_) x = kernels::Bf16BitsToFloat(kernels::Bf16RoundNearest(x));
    for (float& x : v_) x = kernels::Bf16BitsToFloat(kernels::Bf16RoundNearest(x));
  }
  return Status::OK();
}

double GlobalGradNorm(std::span<const float> grads) {
  // Four partial sums: independent chains the compiler can keep in registers.
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  const size_t n = grads.size();
  for (; i + 4 <= n; i += 4) {
    s0 += static_cast<double>(grads[i]) * grads[i];
    s1 += static_cast<double>(grads[i + 1]) * grads[i + 1];
    s2 += static_cast<double>(grads[i + 2]) * grads[i + 2];
    s3 += static_cast<double>(grads[i + 3]) * grads[i + 3];
  }
  for (; i < n; ++i) s0 += static_cast<double>(grads[i]) * grads[i];
  return std::sqrt((s0 + s1) + (s2 + s3));
}

double ClipGradNorm(std::span<float> grads, double max_norm) {
  const double norm = GlobalGradNorm(grads);
  if (max_norm > 0.0 && std::isfinite(norm) && norm > max_norm) {
    const float scale = static_cast<float>(max_norm / norm);
    for (float& g : grads) g *= scale;
  }
  return norm;
}

}  // namespace grove::learner
