#include "learner/gpu_step.h"

#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/grpo_loss.h"
#include "kernels/stochastic_round.h"
#include "kernels/sum_of_squares.h"

namespace grove::learner {
namespace {

// Out of device memory is ResourceExhausted (GrpoTrainer retries the step
// with smaller micro-batches); any other CUDA error is Internal.
Status Cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  const std::string msg = std::string("GpuGrpoStep: ") + what + ": " + cudaGetErrorString(err);
  if (err == cudaErrorMemoryAllocation) return Status::ResourceExhausted(msg);
  return Status::Internal(msg);
}

}  // namespace

GpuGrpoStep::~GpuGrpoStep() {
  if (policy_) cudaSetDevice(policy_->device());
  if (m_) cudaFree(m_);
  if (v_) cudaFree(v_);
}

Result<std::unique_ptr<GpuGrpoStep>> GpuGrpoStep::Create(const model::Model& policy, const model::Model& reference,
                                                         const AdamWOptions& options,
                                                         const std::vector<ParamRange>& no_decay, int device) {
  GROVE_RETURN_IF_ERROR(ValidateAdamWOptions(options));
  std::unique_ptr<GpuGrpoStep> s(new GpuGrpoStep());
  s->options_ = options;
  GROVE_ASSIGN_OR_RETURN(s->policy_, model::GpuTransformer::Create(policy.config(), device, /*trainable=*/true));
  GROVE_ASSIGN_OR_RETURN(s->reference_, model::GpuTransformer::Create(reference.config(), device, false));
  GROVE_RETURN_IF_ERROR(s->policy_->UploadParams(policy.params()));
  GROVE_RETURN_IF_ERROR(s->reference_->UploadParams(reference.params()));
  // Runs of trainable tensors with one decay setting (tensors are 8-aligned
  // and their sizes multiples of 8: GpuTransformer::Create checked that).
  const model::ParamLayout& layout = policy.layout();
  for (const model::TensorInfo& t : layout.tensors()) {
    if (!t.trainable) continue;
    bool decay = true;
    for (const ParamRange& r : no_decay)
      if (size_t(t.offset) >= r.begin && size_t(t.offset + t.numel) <= r.end) decay = false;
    if (!s->runs_.empty() && s->runs_.back().decay == decay &&
        s->runs_.back().offset + s->runs_.back().count == t.offset) {
      s->runs_.back().count += t.numel;
    } else {
      s->runs_.push_back({t.offset, t.numel, decay});
    }
  }
  const size_t bytes = s->MomentBytes();
  GROVE_RETURN_IF_ERROR(Cuda(cudaMalloc(&s->m_, bytes), "allocate AdamW m"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMalloc(&s->v_, bytes), "allocate AdamW v"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemset(s->m_, 0, bytes), "zero m"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemset(s->v_, 0, bytes), "zero v"));
  GROVE_RETURN_IF_ERROR(
      s->norm_buf_.Reserve(sizeof(double) + kernels::SumOfSquaresWorkspaceBytes(), device, "the gradient norm's scratch")
          .status());
  return s;
}

size_t GpuGrpoStep::MomentBytes() const {
  return size_t(policy_->layout().total()) * (options_.moments == MomentPrecision::kBf16 ? 2 : 4);
}

Result<UpdateReport> GpuGrpoStep::Update(double lr, double max_grad_norm, Phase phase) {
  model::GpuTransformer& p = *policy_;
  GROVE_RETURN_IF_ERROR(Cuda(cudaSetDevice(p.device()), "set device"));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream());
  if (phase != moments_of_) {
    if (phase == Phase::kWarmStart && step_ > 0)
      return Status::FailedPrecondition("GpuGrpoStep: a warm-start update after " + std::to_string(step_) +
                                        " GRPO updates (they share the moment buffers)");
    // GRPO after warm-start: its own moments start at zero. (Warm-start
    // before any GRPO update: the moments are still the initial zeros.)
    if (phase == Phase::kGrpo) {
      GROVE_RETURN_IF_ERROR(Cuda(cudaMemsetAsync(m_, 0, MomentBytes(), stream), "zero m"));
      GROVE_RETURN_IF_ERROR(Cuda(cudaMemsetAsync(v_, 0, MomentBytes(), stream), "zero v"));
    }
    moments_of_ = phase;
  }
  UpdateReport report;
  report.lr = lr;
  model::PhaseTimer& prof = p.profiler();
  prof.Start();
  // The global norm in double (kernels/sum_of_squares.h): the model reads
  // the gradients its expert dW kernels did not already sum the squares of
  // (GpuTransformer::GradSumOfSquares); the host needs it for the skip and
  // the clip scale.
  auto* sum_sq = static_cast<double*>(norm_buf_.data());
  GROVE_RETURN_IF_ERROR(p.GradSumOfSquares(sum_sq, sum_sq + 1, kernels::SumOfSquaresWorkspaceBytes()).status());
  float* grads = p.device_grads();  // after the norm: taking it forgets the kernels' sums
  double host_sum_sq = 0;
  GROVE_RETURN_IF_ERROR(
      Cuda(cudaMemcpyAsync(&host_sum_sq, sum_sq, sizeof(double), cudaMemcpyDeviceToHost, stream), "read the norm"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "gradient norm"));
  prof.Lap("optimizer: grad norm");
  const double norm = std::sqrt(host_sum_sq);
  report.grad_norm = norm;
  if (!std::isfinite(norm)) {
    report.skipped = true;
    return report;
  }
  int64_t& taken = phase == Phase::kGrpo ? step_ : warmstart_step_;
  ++taken;
  kernels::AdamWHyper hyper;
  hyper.lr = float(lr);
  hyper.beta1 = float(options_.beta1);
  hyper.beta2 = float(options_.beta2);
  hyper.eps = float(options_.eps);
  hyper.step = taken;
  // Clipping is folded into AdamW's read of the gradient (no separate pass).
  if (max_grad_norm > 0 && norm > max_grad_norm) hyper.grad_scale = float(max_grad_norm / double(norm));
  float* params = p.device_params();
  auto* mirror = static_cast<__nv_bfloat16*>(p.device_params_bf16());
  for (const Run& r : runs_) {
    hyper.weight_decay = r.decay ? float(options_.weight_decay) : 0.f;
    if (options_.moments == MomentPrecision::kBf16) {
      GROVE_RETURN_IF_ERROR(kernels::AdamWStep(params + r.offset, grads + r.offset,
                                               static_cast<__nv_bfloat16*>(m_) + r.offset,
                                               static_cast<__nv_bfloat16*>(v_) + r.offset, mirror + r.offset, r.count,
                                               /*index_base=*/r.offset, hyper, stream));
    } else {
      GROVE_RETURN_IF_ERROR(kernels::AdamWStep(params + r.offset, grads + r.offset, static_cast<float*>(m_) + r.offset,
                                               static_cast<float*>(v_) + r.offset, mirror + r.offset, r.count, hyper,
                                               stream));
    }
  }
  prof.Lap("optimizer: AdamW");  // which wrote the bf16 mirror too: nothing to refresh
  GROVE_RETURN_IF_ERROR(p.Synchronize());
  return report;
}

namespace {

kernels::GrpoLossConfig DeviceLossConfig(const PolicyLossConfig& c) {
  kernels::GrpoLossConfig d;
  d.ratio_level = c.ratio_level == RatioLevel::kSequence ? kernels::GrpoRatioLevel::kSequence
                                                         : kernels::GrpoRatioLevel::kToken;
  d.clip_low = c.clip_low;
  d.clip_high = c.clip_high;
  d.beta = c.beta;
  switch (c.aggregation) {
    case LossAggregation::kSeqMeanTokenMean: d.aggregation = kernels::GrpoAggregation::kSeqMeanTokenMean; break;
    case LossAggregation::kTokenMean: d.aggregation = kernels::GrpoAggregation::kTokenMean; break;
    case LossAggregation::kSeqMeanTokenSumNorm:
      d.aggregation = kernels::GrpoAggregation::kSeqMeanTokenSumNorm;
      break;
  }
  d.max_tokens = c.max_tokens;
  d.tis_cap = c.tis_cap;
  d.dual_clip = c.dual_clip;
  return d;
}

// Bump allocation inside one device buffer, 256-byte aligned pieces.
struct Carver {
  char* base = nullptr;
  size_t used = 0;
  template <typename T>
  T* Take(size_t count) {
    T* p = reinterpret_cast<T*>(base ? base + used : nullptr);
    used += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }
};

}  // namespace

Result<PolicyLossOutput> GpuGrpoStep::LossAndBackward(const PolicyBatch& batch, const PolicyLossConfig& config,
                                                      bool want_grad_logp) {
  GROVE_RETURN_IF_ERROR(ValidatePolicyLossConfig(config));
  model::GpuTransformer& p = *policy_;
  const int64_t T = p.scored_tokens();
  const float* logp = p.device_logprobs();
  if (logp == nullptr) return Status::FailedPrecondition("LossAndBackward needs a pending Score(keep_for_backward=true)");
  const size_t N = batch.advantages.size();
  if (batch.seq_offsets.size() != N + 1 || batch.seq_offsets.front() != 0 || batch.seq_offsets.back() != T)
    return Status::InvalidArgument("LossAndBackward: seq_offsets must be N + 1 = " + std::to_string(N + 1) +
                                   " offsets from 0 to the " + std::to_string(T) + " scored tokens");
  for (size_t i = 0; i < N; ++i)
    if (batch.seq_offsets[i + 1] < batch.seq_offsets[i])
      return Status::InvalidArgument("LossAndBackward: seq_offsets decrease at " + std::to_string(i));
  auto sized = [&](size_t n, const char* what) -> Status {
    if (n != 0 && int64_t(n) != T)
      return Status::InvalidArgument(std::string("LossAndBackward: ") + what + " has " + std::to_string(n) +
                                     " values for " + std::to_string(T) + " tokens");
    return Status::OK();
  };
  GROVE_RETURN_IF_ERROR(sized(batch.old_logp.size(), "old_logp"));
  GROVE_RETURN_IF_ERROR(sized(batch.ref_logp.size(), "ref_logp"));
  GROVE_RETURN_IF_ERROR(sized(batch.rollout_logp.size(), "rollout_logp"));
  GROVE_RETURN_IF_ERROR(sized(batch.mask.size(), "mask"));
  if (config.beta > 0 && batch.ref_logp.empty())
    return Status::InvalidArgument("LossAndBackward: beta > 0 needs ref_logp");
  GROVE_RETURN_IF_ERROR(Cuda(cudaSetDevice(p.device()), "set device"));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream());
  model::PhaseTimer& prof = p.profiler();
  prof.Start();

  // One buffer: inputs, dlogp, stats, workspace (sizes first, then carve).
  const size_t ws_bytes = kernels::GrpoLossWorkspaceBytes(int(N));
  auto carve = [&](Carver& c) {
    struct {
      int32_t* offsets; float *old_logp, *ref_logp, *rollout_logp, *adv, *dlogp; uint8_t* mask;
      kernels::GrpoLossStats* stats; void* ws;
    } v;
    v.offsets = c.Take<int32_t>(N + 1);
    v.old_logp = c.Take<float>(batch.old_logp.size());
    v.ref_logp = c.Take<float>(batch.ref_logp.size());
    v.rollout_logp = c.Take<float>(batch.rollout_logp.size());
    v.adv = c.Take<float>(N);
    v.dlogp = c.Take<float>(size_t(T));
    v.mask = c.Take<uint8_t>(batch.mask.size());
    v.stats = c.Take<kernels::GrpoLossStats>(1);
    v.ws = c.Take<char>(ws_bytes);
    return v;
  };
  Carver sizing;
  carve(sizing);
  // ResourceExhausted when it cannot grow (the trainer then retries smaller).
  GROVE_ASSIGN_OR_RETURN(void* loss_buf,
                         loss_buf_.Reserve(sizing.used, policy_->device(), "GpuGrpoStep loss buffers"));
  Carver at{static_cast<char*>(loss_buf), 0};
  const auto d = carve(at);
  std::vector<int32_t> offsets(batch.seq_offsets.begin(), batch.seq_offsets.end());
  auto up = [&](void* dst, const void* src, size_t bytes) -> Status {
    if (bytes == 0) return Status::OK();
    return Cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), "upload loss inputs");
  };
  GROVE_RETURN_IF_ERROR(up(d.offsets, offsets.data(), offsets.size() * sizeof(int32_t)));
  GROVE_RETURN_IF_ERROR(up(d.old_logp, batch.old_logp.data(), batch.old_logp.size_bytes()));
  GROVE_RETURN_IF_ERROR(up(d.ref_logp, batch.ref_logp.data(), batch.ref_logp.size_bytes()));
  GROVE_RETURN_IF_ERROR(up(d.rollout_logp, batch.rollout_logp.data(), batch.rollout_logp.size_bytes()));
  GROVE_RETURN_IF_ERROR(up(d.adv, batch.advantages.data(), batch.advantages.size_bytes()));
  GROVE_RETURN_IF_ERROR(up(d.mask, batch.mask.data(), batch.mask.size_bytes()));
  kernels::GrpoLossArgs a;
  a.seq_offsets = d.offsets;
  a.logp = logp;
  a.old_logp = batch.old_logp.empty() ? nullptr : d.old_logp;
  a.ref_logp = batch.ref_logp.empty() ? nullptr : d.ref_logp;
  a.rollout_logp = batch.rollout_logp.empty() ? nullptr : d.rollout_logp;
  a.mask = batch.mask.empty() ? nullptr : d.mask;
  a.advantages = d.adv;
  a.tokens = int(T);
  a.sequences = int(N);
  a.total_tokens = batch.total_tokens;
  a.total_sequences = batch.total_sequences;
  a.dlogp = d.dlogp;
  a.stats = d.stats;
  GROVE_RETURN_IF_ERROR(kernels::GrpoLoss(DeviceLossConfig(config), a, d.ws, ws_bytes, stream));
  kernels::GrpoLossStats st;
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(&st, d.stats, sizeof(st), cudaMemcpyDeviceToHost, stream), "stats"));
  PolicyLossOutput out;
  if (want_grad_logp) {
    out.grad_logp.resize(size_t(T));
    GROVE_RETURN_IF_ERROR(Cuda(
        cudaMemcpyAsync(out.grad_logp.data(), d.dlogp, size_t(T) * sizeof(float), cudaMemcpyDeviceToHost, stream),
        "download dlogp"));
  }
  prof.Lap("GRPO loss (device)");
  // The backward is enqueued behind the loss on the same stream; its final
  // synchronization also completes the downloads above.
  GROVE_RETURN_IF_ERROR(p.BackwardFromDevice(d.dlogp));
  out.loss = st.loss;
  out.stats.num_sequences = int64_t(st.num_sequences);
  out.stats.num_tokens = int64_t(st.num_tokens);
  out.stats.pg_loss = st.pg_loss;
  out.stats.kl_loss = st.kl_loss;
  out.stats.ratio_mean = st.ratio_mean;
  out.stats.clip_frac_low = st.clip_frac_low;
  out.stats.clip_frac_high = st.clip_frac_high;
  out.stats.clip_frac_dual = st.clip_frac_dual;
  out.stats.kl_ref_k3_mean = st.kl_ref_k3_mean;
  out.stats.mismatch_log_ratio_mean = st.mismatch_log_ratio_mean;
  out.stats.mismatch_kl_k3 = st.mismatch_kl_k3;
  out.stats.tis_capped_frac = st.tis_capped_frac;
  out.stats.tis_weight_mean = st.tis_weight_mean;
  out.stats.neg_logp_mean = st.neg_logp_mean;
  return out;
}

Status GpuGrpoStep::ReleaseActivations() {
  GROVE_RETURN_IF_ERROR(policy_->ReleaseActivations());
  GROVE_RETURN_IF_ERROR(reference_->ReleaseActivations());
  loss_buf_.Release();
  return Status::OK();
}

Result<AdamWState> GpuGrpoStep::ExportState() const {
  const int64_t n = policy_->layout().total();
  AdamWState s;
  s.step = step_;
  if (moments_of_ != Phase::kGrpo) {
    // The buffers hold the warm-start's moments; GRPO's are still zero.
    s.m.assign(n, 0.f);
    s.v.assign(n, 0.f);
    return s;
  }
  s.m.resize(n);
  s.v.resize(n);
  GROVE_RETURN_IF_ERROR(Cuda(cudaSetDevice(policy_->device()), "set device"));
  if (options_.moments == MomentPrecision::kFp32) {
    GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(s.m.data(), m_, n * sizeof(float), cudaMemcpyDeviceToHost), "download m"));
    GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(s.v.data(), v_, n * sizeof(float), cudaMemcpyDeviceToHost), "download v"));
    return s;
  }
  std::vector<uint16_t> bits(n);
  for (auto [from, to] : {std::pair{m_, &s.m}, std::pair{v_, &s.v}}) {
    GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(bits.data(), from, n * 2, cudaMemcpyDeviceToHost), "download moments"));
    for (int64_t i = 0; i < n; ++i) (*to)[i] = kernels::Bf16BitsToFloat(bits[i]);
  }
  return s;
}

Status GpuGrpoStep::ImportState(const AdamWState& state) {
  const int64_t n = policy_->layout().total();
  if (int64_t(state.m.size()) != n || int64_t(state.v.size()) != n || state.step < 0)
    return Status::InvalidArgument("GpuGrpoStep: optimizer state of " + std::to_string(state.m.size()) + "/" +
                                   std::to_string(state.v.size()) + " values for " + std::to_string(n) +
                                   " parameters");
  GROVE_RETURN_IF_ERROR(Cuda(cudaSetDevice(policy_->device()), "set device"));
  if (options_.moments == MomentPrecision::kFp32) {
    GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(m_, state.m.data(), n * sizeof(float), cudaMemcpyHostToDevice), "upload m"));
    GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(v_, state.v.data(), n * sizeof(float), cudaMemcpyHostToDevice), "upload v"));
  } else {
    // To the nearest bf16, as learner::AdamW::ImportState rounds.
    std::vector<uint16_t> bits(n);
    for (auto [from, to] : {std::pair{&state.m, m_}, std::pair{&state.v, v_}}) {
      for (int64_t i = 0; i < n; ++i) bits[i] = kernels::Bf16RoundNearest((*from)[i]);
      GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(to, bits.data(), n * 2, cudaMemcpyHostToDevice), "upload moments"));
    }
  }
  step_ = state.step;
  moments_of_ = Phase::kGrpo;
  return Status::OK();
}

}  // namespace grove::learner
