#include "learner/gpu_step.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "kernels/adamw.h"

namespace grove::learner {
namespace {

Status Cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string("GpuGrpoStep: ") + what + ": " + cudaGetErrorString(err));
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
  const size_t bytes = size_t(layout.total()) * sizeof(float);
  GROVE_RETURN_IF_ERROR(Cuda(cudaMalloc(&s->m_, bytes), "allocate AdamW m"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMalloc(&s->v_, bytes), "allocate AdamW v"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemset(s->m_, 0, bytes), "zero m"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemset(s->v_, 0, bytes), "zero v"));
  return s;
}

Result<UpdateReport> GpuGrpoStep::Update(double lr, double max_grad_norm) {
  model::GpuTransformer& p = *policy_;
  GROVE_RETURN_IF_ERROR(Cuda(cudaSetDevice(p.device()), "set device"));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream());
  const int64_t n = p.layout().total();
  float* grads = p.device_grads();
  UpdateReport report;
  report.lr = lr;
  // The norm through a short-lived cuBLAS handle on the model's stream (the
  // model's own handle is private to it).
  cublasHandle_t h = nullptr;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return Status::Internal("GpuGrpoStep: cublasCreate failed");
  cublasSetStream(h, stream);
  float norm = 0.f;
  cublasStatus_t cs = cublasSnrm2_v2_64(h, n, grads, 1, &norm);
  if (cs == CUBLAS_STATUS_SUCCESS && max_grad_norm > 0 && std::isfinite(norm) && norm > max_grad_norm) {
    const float scale = float(max_grad_norm / double(norm));
    cs = cublasSscal_v2_64(h, n, &scale, grads, 1);
  }
  cublasDestroy(h);
  if (cs != CUBLAS_STATUS_SUCCESS) return Status::Internal("GpuGrpoStep: cuBLAS norm/scale failed");
  report.grad_norm = norm;
  if (!std::isfinite(norm)) {
    report.skipped = true;
    return report;
  }
  ++step_;
  kernels::AdamWHyper hyper;
  hyper.lr = float(lr);
  hyper.beta1 = float(options_.beta1);
  hyper.beta2 = float(options_.beta2);
  hyper.eps = float(options_.eps);
  hyper.step = step_;
  float* params = p.device_params();
  auto* mirror = static_cast<__nv_bfloat16*>(p.device_params_bf16());
  for (const Run& r : runs_) {
    hyper.weight_decay = r.decay ? float(options_.weight_decay) : 0.f;
    GROVE_RETURN_IF_ERROR(kernels::AdamWStep(params + r.offset, grads + r.offset, m_ + r.offset, v_ + r.offset,
                                             mirror + r.offset, r.count, hyper, stream));
  }
  GROVE_RETURN_IF_ERROR(p.RefreshComputeCopies(/*mirror_from_master=*/false));
  GROVE_RETURN_IF_ERROR(p.Synchronize());
  return report;
}

Result<AdamWState> GpuGrpoStep::ExportState() const {
  const int64_t n = policy_->layout().total();
  AdamWState s;
  s.step = step_;
  s.m.resize(n);
  s.v.resize(n);
  GROVE_RETURN_IF_ERROR(Cuda(cudaSetDevice(policy_->device()), "set device"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(s.m.data(), m_, n * sizeof(float), cudaMemcpyDeviceToHost), "download m"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(s.v.data(), v_, n * sizeof(float), cudaMemcpyDeviceToHost), "download v"));
  return s;
}

Status GpuGrpoStep::ImportState(const AdamWState& state) {
  const int64_t n = policy_->layout().total();
  if (int64_t(state.m.size()) != n || int64_t(state.v.size()) != n || state.step < 0)
    return Status::InvalidArgument("GpuGrpoStep: optimizer state of " + std::to_string(state.m.size()) + "/" +
                                   std::to_string(state.v.size()) + " values for " + std::to_string(n) +
                                   " parameters");
  GROVE_RETURN_IF_ERROR(Cuda(cudaSetDevice(policy_->device()), "set device"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(m_, state.m.data(), n * sizeof(float), cudaMemcpyHostToDevice), "upload m"));
  GROVE_RETURN_IF_ERROR(Cuda(cudaMemcpy(v_, state.v.data(), n * sizeof(float), cudaMemcpyHostToDevice), "upload v"));
  step_ = state.step;
  return Status::OK();
}

}  // namespace grove::learner
