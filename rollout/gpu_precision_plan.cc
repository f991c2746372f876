#include "rollout/gpu_precision_plan.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <string>

#include "rollout/gpu_precision_plan_kernels.h"

namespace grove::rollout {
namespace {

Status Cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  const std::string msg = std::string("gpu plan: ") + what + ": " + cudaGetErrorString(err);
  if (err == cudaErrorMemoryAllocation) return Status::ResourceExhausted(msg);
  return Status::Internal(msg);
}
Status Cublas(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::OK();
  return Status::Internal(std::string("gpu plan: cuBLAS ") + what + " failed with status " + std::to_string(int(st)));
}
#define PLAN_CUDA(expr) GROVE_RETURN_IF_ERROR(Cuda((expr), #expr))

using actors::DeviceBuffer;

// `count` Ts (at least one) of `buf` on the current device, grown on demand
// (contents not kept); ResourceExhausted when the device has no room.
template <typename T>
Result<T*> Get(DeviceBuffer& buf, int64_t count) {
  int device = 0;
  PLAN_CUDA(cudaGetDevice(&device));
  GROVE_ASSIGN_OR_RETURN(void* p, buf.Reserve(size_t(std::max<int64_t>(count, 1)) * sizeof(T), device,
                                               "gpu plan workspace"));
  return static_cast<T*>(p);
}

template <typename T>
Status Upload(DeviceBuffer& buf, const std::vector<T>& host, T** out, cudaStream_t st) {
  GROVE_ASSIGN_OR_RETURN(*out, Get<T>(buf, int64_t(host.size())));
  if (host.empty()) return Status::OK();
  return Cuda(cudaMemcpyAsync(*out, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, st), "upload");
}

// cuBLAS on the model's stream, fp32 GEMMs in full fp32 (no TF32).
class Blas {
 public:
  ~Blas() {
    if (h_) cublasDestroy(h_);
  }
  Status Init(cudaStream_t st) {
    GROVE_RETURN_IF_ERROR(Cublas(cublasCreate(&h_), "create"));
    GROVE_RETURN_IF_ERROR(Cublas(cublasSetStream(h_, st), "set stream"));
    return Cublas(cublasSetMathMode(h_, CUBLAS_PEDANTIC_MATH), "math mode");
  }
  // Row-major y[n, out] = x[n, in] W[out, in]^T, fp32.
  Status Linear(const float* x, const float* w, float* y, int64_t n, int64_t in, int64_t out) {
    if (n == 0) return Status::OK();
    const float one = 1.f, zero = 0.f;
    return Cublas(cublasSgemm(h_, CUBLAS_OP_T, CUBLAS_OP_N, int(out), int(n), int(in), &one, w, int(in), x, int(in),
                              &zero, y, int(out)),
                  "sgemm");
  }
  // Row-major z[n, V] (fp32) = h[n, H] W[V, H]^T with bf16 h and W, fp32
  // accumulation: the learner's lm_head.
  Status LinearBf16(const void* h, const void* w, float* z, int64_t n, int64_t H, int64_t V) {
    if (n == 0) return Status::OK();
    const float one = 1.f, zero = 0.f;
    return Cublas(cublasGemmEx(h_, CUBLAS_OP_T, CUBLAS_OP_N, int(V), int(n), int(H), &one, w, CUDA_R_16BF, int(H), h,
                               CUDA_R_16BF, int(H), &zero, z, CUDA_R_32F, int(V), CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT),
                  "lm_head");
  }

 private:
  cublasHandle_t h_ = nullptr;
};

struct TensorRange {
  int64_t offset = 0, rows = 0, cols = 0;
  PrecisionFormat format = PrecisionFormat::kInt4;
};

// Round-trips tensors of the model's fp32 master in place (refreshing the
// bf16 mirror) and puts them back: from a device copy of each kept
// meanwhile, or, where the device has no room for that copy (a whole
// model's FFN weights: 6 GB on gpu-ref), from `device_full` (the full
// weights elsewhere on the device) or `host` (on the host), when given.
class DeviceRoundTrip {
 public:
  explicit DeviceRoundTrip(model::GpuTransformer& m, std::span<const float> host = {},
                           const float* device_full = nullptr)
      : m_(m), host_(host), device_full_(device_full) {}
  ~DeviceRoundTrip() { (void)Restore(); }
  Status Apply(std::vector<TensorRange> ranges) {
    GROVE_RETURN_IF_ERROR(Restore());
    ranges_ = std::move(ranges);
    int64_t total = 0;
    for (const TensorRange& r : ranges_) total += r.rows * r.cols;
    Result<float*> backup = Get<float>(backup_, total);
    if (!backup.ok() &&
        (backup.status().code() != StatusCode::kResourceExhausted || (host_.empty() && device_full_ == nullptr)))
      return backup.status();
    from_host_ = !backup.ok();
    cudaStream_t st = static_cast<cudaStream_t>(m_.stream());
    float* P = m_.device_params();
    int64_t at = 0;
    applied_ = true;
    for (const TensorRange& r : ranges_) {
      const int64_t n = r.rows * r.cols;
      if (!from_host_)
        PLAN_CUDA(cudaMemcpyAsync(*backup + at, P + r.offset, n * sizeof(float), cudaMemcpyDeviceToDevice, st));
      RoundTripOnDevice(r.format, P + r.offset, r.rows, r.cols, st);
      at += n;
    }
    PLAN_CUDA(cudaGetLastError());
    return m_.RefreshMirror();
  }
  Status Restore() {
    if (!applied_) return Status::OK();
    applied_ = false;
    if (from_host_) return device_full_ ? m_.LoadParamsFromDevice(device_full_) : m_.UploadParams(host_);
    cudaStream_t st = static_cast<cudaStream_t>(m_.stream());
    float* backup = static_cast<float*>(backup_.data());
    float* P = m_.device_params();
    int64_t at = 0;
    for (const TensorRange& r : ranges_) {
      const int64_t n = r.rows * r.cols;
      PLAN_CUDA(cudaMemcpyAsync(P + r.offset, backup + at, n * sizeof(float), cudaMemcpyDeviceToDevice, st));
      at += n;
    }
    return m_.RefreshMirror();
  }

 private:
  model::GpuTransformer& m_;
  std::span<const float> host_;
  const float* device_full_;
  DeviceBuffer backup_;
  std::vector<TensorRange> ranges_;
  bool applied_ = false, from_host_ = false;
};

TensorRange RangeOf(const model::ParamLayout& layout, const std::string& name, PrecisionFormat f) {
  const model::TensorInfo* t = layout.Find(name);
  return {t->offset, t->shape[0], t->shape[1], f};
}

Status CheckUnits(const model::GpuTransformer& model, const std::vector<PlanUnit>& units) {
  const model::ModelConfig& c = model.config();
  for (const PlanUnit& u : units)
    for (const std::string& t : u.tensors)
      if (!model.layout().Find(t) || u.layer < 0 || u.layer >= c.layers || u.expert >= c.experts)
        return Status::InvalidArgument("plan unit " + u.name + " does not belong to this model");
  return Status::OK();
}

// The mean over the scored rows of KL(q || p), p from the final hidden rows
// `hs_p` and q from the model's last Score's (both bf16 [rows, H]), through
// the model's lm_head (its bf16 mirror).
class KlOfLastScore {
 public:
  Status Init(model::GpuTransformer& m) {
    m_ = &m;
    return blas_.Init(static_cast<cudaStream_t>(m.stream()));
  }
  // Copies the last Score's hidden rows as the reference p.
  Status KeepReference() {
    const int64_t n = m_->last_scored_rows() * m_->config().hidden;
    GROVE_ASSIGN_OR_RETURN(ref_, Get<uint16_t>(ref_buf_, n));
    rows_ = m_->last_scored_rows();
    return Cuda(cudaMemcpyAsync(ref_, m_->last_scored_hidden(), n * sizeof(uint16_t), cudaMemcpyDeviceToDevice,
                                static_cast<cudaStream_t>(m_->stream())),
                "keep reference hidden rows");
  }
  Result<double> MeanKl() {
    if (m_->last_scored_rows() != rows_) return Status::Internal("gpu plan: scored rows changed between forwards");
    if (rows_ == 0) return 0.0;
    const int64_t V = m_->config().vocab_size, H = m_->config().hidden;
    cudaStream_t st = static_cast<cudaStream_t>(m_->stream());
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(rows_, (int64_t(1) << 26) / V));
    GROVE_ASSIGN_OR_RETURN(float* zp, Get<float>(zp_buf_, chunk * V));
    GROVE_ASSIGN_OR_RETURN(float* zq, Get<float>(zq_buf_, chunk * V));
    GROVE_ASSIGN_OR_RETURN(double* kl, Get<double>(kl_buf_, 1));
    PLAN_CUDA(cudaMemsetAsync(kl, 0, sizeof(double), st));
    const void* W = static_cast<const uint16_t*>(m_->device_params_bf16()) + m_->layout().Offset("lm_head");
    const uint16_t* hq = static_cast<const uint16_t*>(m_->last_scored_hidden());
    for (int64_t r0 = 0; r0 < rows_; r0 += chunk) {
      const int64_t n = std::min(chunk, rows_ - r0);
      GROVE_RETURN_IF_ERROR(blas_.LinearBf16(ref_ + r0 * H, W, zp, n, H, V));
      GROVE_RETURN_IF_ERROR(blas_.LinearBf16(hq + r0 * H, W, zq, n, H, V));
      gpu_plan::AccumulateRowKl(zp, zq, kl, n, V, st);
    }
    PLAN_CUDA(cudaGetLastError());
    double h = 0;
    PLAN_CUDA(cudaMemcpyAsync(&h, kl, sizeof(double), cudaMemcpyDeviceToHost, st));
    PLAN_CUDA(cudaStreamSynchronize(st));
    return h / double(rows_);
  }
  int64_t rows() const { return rows_; }

 private:
  model::GpuTransformer* m_ = nullptr;
  Blas blas_;
  DeviceBuffer ref_buf_, zp_buf_, zq_buf_, kl_buf_;
  uint16_t* ref_ = nullptr;
  int64_t rows_ = 0;
};

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The local errors of `units` on the model's kept forward.
Status LocalErrorsOfKeptForward(model::GpuTransformer& model, std::vector<PlanUnit>& units) {
  const model::ModelConfig& c = model.config();
  const model::ParamLayout& layout = model.layout();
  const int64_t H = c.hidden, K = c.top_k;
  cudaStream_t st = static_cast<cudaStream_t>(model.stream());
  Blas blas;
  GROVE_RETURN_IF_ERROR(blas.Init(st));
  DeviceBuffer rows_b, unit_b, g2_b, xg_b, a_b, b_b, h_b, yref_b, yq_b, err_b, w_b;
  std::map<int64_t, std::vector<size_t>> by_layer;
  for (size_t i = 0; i < units.size(); ++i) by_layer[units[i].layer].push_back(i);
  const float* P = model.device_params();
  for (const auto& [layer, members] : by_layer) {
    GROVE_ASSIGN_OR_RETURN(model::GpuTransformer::DeviceFfnInputs in, model.KeptFfn(layer));
    const int64_t R = in.rows;
    std::vector<uint16_t> ids;
    std::vector<float> gates;
    if (in.experts) {
      ids.resize(R * K);
      gates.resize(R * K);
      PLAN_CUDA(cudaMemcpyAsync(ids.data(), in.experts, ids.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost, st));
      PLAN_CUDA(cudaMemcpyAsync(gates.data(), in.gates, gates.size() * sizeof(float), cudaMemcpyDeviceToHost, st));
      PLAN_CUDA(cudaStreamSynchronize(st));
    }
    // Each unit's rows, in the CPU's order: a segment of the gathered rows.
    struct Segment {
      size_t unit;
      int64_t p0, n, F, h0;  // h0: offset of its [n, F] block in a, b, h
      std::array<int64_t, 3> w;  // w1, w3, w2 offsets in the master
    };
    std::vector<Segment> segs;
    std::vector<int32_t> rows, unit_of_row;
    std::vector<double> g2;
    int64_t h_total = 0;
    for (size_t li = 0; li < members.size(); ++li) {
      PlanUnit& u = units[members[li]];
      const int64_t p0 = int64_t(rows.size());
      if (u.expert >= 0) {
        if (ids.empty()) return Status::InvalidArgument("plan unit " + u.name + ": layer has no routed experts");
        for (int64_t t = 0; t < R; ++t)
          for (int64_t j = 0; j < K; ++j)
            if (ids[t * K + j] == u.expert) {
              rows.push_back(int32_t(t));
              g2.push_back(double(gates[t * K + j]) * gates[t * K + j]);
            }
      } else {
        for (int64_t t = 0; t < R; ++t) rows.push_back(int32_t(t));
        g2.resize(rows.size(), 1.0);
      }
      const int64_t n = int64_t(rows.size()) - p0;
      unit_of_row.resize(rows.size(), int32_t(li));
      u.rows_seen = n;
      u.error.fill(0.0);
      const model::TensorInfo* w1 = layout.Find(u.tensors[0]);
      Segment s{members[li], p0, n, w1->shape[0], h_total,
                {w1->offset, layout.Offset(u.tensors[1]), layout.Offset(u.tensors[2])}};
      h_total += n * s.F;
      if (n > 0) segs.push_back(s);
    }
    const int64_t Pn = int64_t(rows.size());
    if (Pn == 0) continue;
    int32_t *d_rows = nullptr, *d_unit = nullptr;
    double* d_g2 = nullptr;
    GROVE_RETURN_IF_ERROR(Upload(rows_b, rows, &d_rows, st));
    GROVE_RETURN_IF_ERROR(Upload(unit_b, unit_of_row, &d_unit, st));
    GROVE_RETURN_IF_ERROR(Upload(g2_b, g2, &d_g2, st));
    GROVE_ASSIGN_OR_RETURN(float* xg, Get<float>(xg_b, Pn * H));
    GROVE_ASSIGN_OR_RETURN(float* a, Get<float>(a_b, h_total));
    GROVE_ASSIGN_OR_RETURN(float* b, Get<float>(b_b, h_total));
    GROVE_ASSIGN_OR_RETURN(float* h, Get<float>(h_b, h_total));
    GROVE_ASSIGN_OR_RETURN(float* yref, Get<float>(yref_b, Pn * H));
    GROVE_ASSIGN_OR_RETURN(float* yq, Get<float>(yq_b, Pn * H));
    const int64_t nu = int64_t(members.size()), nf = int64_t(kPlanFormats.size());
    GROVE_ASSIGN_OR_RETURN(double* err, Get<double>(err_b, nf * nu));
    PLAN_CUDA(cudaMemsetAsync(err, 0, nf * nu * sizeof(double), st));
    gpu_plan::GatherRowsToF32(in.x, d_rows, xg, Pn, H, st);
    // The weights each unit reads: the master itself, or a packed copy of
    // the layer's unit tensors round-tripped through one format.
    std::vector<std::array<int64_t, 3>> packed(segs.size());
    int64_t w_total = 0;
    for (size_t s = 0; s < segs.size(); ++s)
      for (int i = 0; i < 3; ++i) {
        packed[s][i] = w_total;
        w_total += segs[s].F * H;
      }
    GROVE_ASSIGN_OR_RETURN(float* wq, Get<float>(w_b, w_total));
    auto forward = [&](const float* base, bool from_packed, float* y) -> Status {
      for (size_t s = 0; s < segs.size(); ++s) {
        const Segment& g = segs[s];
        const float* w1 = base + (from_packed ? packed[s][0] : g.w[0]);
        const float* w3 = base + (from_packed ? packed[s][1] : g.w[1]);
        GROVE_RETURN_IF_ERROR(blas.Linear(xg + g.p0 * H, w1, a + g.h0, g.n, H, g.F));
        GROVE_RETURN_IF_ERROR(blas.Linear(xg + g.p0 * H, w3, b + g.h0, g.n, H, g.F));
      }
      gpu_plan::SwiGlu(a, b, h, h_total, st);
      for (size_t s = 0; s < segs.size(); ++s) {
        const Segment& g = segs[s];
        const float* w2 = base + (from_packed ? packed[s][2] : g.w[2]);
        GROVE_RETURN_IF_ERROR(blas.Linear(h + g.h0, w2, y + g.p0 * H, g.n, g.F, H));
      }
      return Cuda(cudaGetLastError(), "unit forward");
    };
    GROVE_RETURN_IF_ERROR(forward(P, false, yref));
    for (int64_t fi = 0; fi < nf; ++fi) {
      for (size_t s = 0; s < segs.size(); ++s) {
        const PlanUnit& u = units[segs[s].unit];
        for (int i = 0; i < 3; ++i) {
          const model::TensorInfo* t = layout.Find(u.tensors[i]);
          PLAN_CUDA(cudaMemcpyAsync(wq + packed[s][i], P + t->offset, t->numel * sizeof(float),
                                    cudaMemcpyDeviceToDevice, st));
          RoundTripOnDevice(kPlanFormats[fi], wq + packed[s][i], t->shape[0], t->shape[1], st);
        }
      }
      GROVE_RETURN_IF_ERROR(forward(wq, true, yq));
      gpu_plan::AccumulateWeightedSqDiff(yq, yref, d_unit, d_g2, err + fi * nu, Pn, H, st);
    }
    PLAN_CUDA(cudaGetLastError());
    std::vector<double> h_err(nf * nu);
    PLAN_CUDA(cudaMemcpyAsync(h_err.data(), err, h_err.size() * sizeof(double), cudaMemcpyDeviceToHost, st));
    PLAN_CUDA(cudaStreamSynchronize(st));
    for (size_t li = 0; li < members.size(); ++li)
      for (int64_t fi = 0; fi < nf; ++fi) units[members[li]].error[fi] = h_err[fi * nu + li];
  }
  return Status::OK();
}

}  // namespace

void RoundTripOnDevice(PrecisionFormat f, float* w, int64_t rows, int64_t cols, void* stream) {
  switch (f) {
    case PrecisionFormat::kInt4: return gpu_plan::RoundTripInt4(w, rows, cols, stream);
    case PrecisionFormat::kInt8: return gpu_plan::RoundTripInt8(w, rows, cols, stream);
    case PrecisionFormat::kBF16: return gpu_plan::RoundTripBf16(w, rows, cols, stream);
  }
}

Status MeasureLocalUnitErrorsOnGpu(model::GpuTransformer& model, const std::vector<model::ScoreRequest>& calibration,
                                   std::vector<PlanUnit>& units) {
  GROVE_RETURN_IF_ERROR(CheckUnits(model, units));
  GROVE_RETURN_IF_ERROR(model.Score(calibration, /*keep_for_backward=*/true).status());
  return LocalErrorsOfKeptForward(model, units);
}

// The scaling with the reference forward already scored (its hidden rows
// kept in `kl`).
static Status ScaleWithReference(model::GpuTransformer& model, const std::vector<model::ScoreRequest>& calibration,
                                 std::vector<PlanUnit>& units, KlOfLastScore& kl) {
  std::map<int64_t, double> local;  // layer -> sum of its units' int4 errors
  for (const PlanUnit& u : units) local[u.layer] += u.error[0];
  std::map<int64_t, double> factor;
  DeviceRoundTrip rt(model);
  for (const auto& [layer, sum] : local) {
    std::vector<TensorRange> ranges;
    for (const PlanUnit& u : units)
      if (u.layer == layer)
        for (const std::string& name : u.tensors) ranges.push_back(RangeOf(model.layout(), name, PrecisionFormat::kInt4));
    GROVE_RETURN_IF_ERROR(rt.Apply(std::move(ranges)));
    GROVE_RETURN_IF_ERROR(model.Score(calibration, /*keep_for_backward=*/false).status());
    GROVE_ASSIGN_OR_RETURN(double mean_kl, kl.MeanKl());
    factor[layer] = sum > 0 ? mean_kl / sum : 0.0;
  }
  GROVE_RETURN_IF_ERROR(rt.Restore());
  for (PlanUnit& u : units)
    for (double& e : u.error) e *= factor[u.layer];
  return Status::OK();
}

Status ScaleByLayerSensitivityOnGpu(model::GpuTransformer& model,
                                    const std::vector<model::ScoreRequest>& calibration,
                                    std::vector<PlanUnit>& units) {
  GROVE_RETURN_IF_ERROR(CheckUnits(model, units));
  KlOfLastScore kl;
  GROVE_RETURN_IF_ERROR(kl.Init(model));
  GROVE_RETURN_IF_ERROR(model.Score(calibration, /*keep_for_backward=*/false).status());
  GROVE_RETURN_IF_ERROR(kl.KeepReference());
  return ScaleWithReference(model, calibration, units, kl);
}

Status MeasureUnitErrorsOnGpu(model::GpuTransformer& model, const std::vector<model::ScoreRequest>& calibration,
                              std::vector<PlanUnit>& units, GpuPlanTiming* timing) {
  GROVE_RETURN_IF_ERROR(CheckUnits(model, units));
  GpuPlanTiming t;
  auto t0 = std::chrono::steady_clock::now();
  KlOfLastScore kl;
  GROVE_RETURN_IF_ERROR(kl.Init(model));
  // One forward serves both: its kept FFN inputs and its final hidden rows
  // (the full model's distributions for the KL scaling).
  GROVE_RETURN_IF_ERROR(model.Score(calibration, /*keep_for_backward=*/true).status());
  GROVE_RETURN_IF_ERROR(kl.KeepReference());
  PLAN_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(model.stream())));
  t.forward_s = Seconds(t0);
  t0 = std::chrono::steady_clock::now();
  GROVE_RETURN_IF_ERROR(LocalErrorsOfKeptForward(model, units));
  t.local_s = Seconds(t0);
  t0 = std::chrono::steady_clock::now();
  GROVE_RETURN_IF_ERROR(ScaleWithReference(model, calibration, units, kl));
  t.kl_s = Seconds(t0);
  if (timing) *timing = t;
  return Status::OK();
}

Result<MismatchReport> MeasureMismatchOnGpu(model::GpuTransformer& model, const FormatChooser& choose,
                                            const std::vector<model::ScoreRequest>& sequences,
                                            std::span<const float> full, const float* device_full) {
  const model::ModelConfig& c = model.config();
  std::vector<TensorRange> ranges;
  for (const model::TensorInfo& t : model.layout().tensors()) {
    if (t.shape.size() != 2) continue;
    const std::optional<PrecisionFormat> f =
        choose(actors::TensorSpec{t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
    // bf16: what the mirror every GEMM reads holds already.
    if (f && *f != PrecisionFormat::kBF16) ranges.push_back({t.offset, t.shape[0], t.shape[1], *f});
  }
  KlOfLastScore kl;
  GROVE_RETURN_IF_ERROR(kl.Init(model));
  GROVE_ASSIGN_OR_RETURN(model::ScoreResult<float> reference,
                         model.Score(sequences, /*keep_for_backward=*/false));
  GROVE_RETURN_IF_ERROR(kl.KeepReference());
  DeviceRoundTrip rt(model, full, device_full);
  GROVE_RETURN_IF_ERROR(rt.Apply(std::move(ranges)));
  GROVE_ASSIGN_OR_RETURN(model::ScoreResult<float> quantized, model.Score(sequences, /*keep_for_backward=*/false));
  GROVE_ASSIGN_OR_RETURN(double mean_kl, kl.MeanKl());
  GROVE_RETURN_IF_ERROR(rt.Restore());
  // Routes on the scored positions, as MeasureMismatch compares them.
  const int64_t M = c.moe_layers(), K = c.top_k, row = M * K;
  MismatchReport rep;
  rep.tokens = kl.rows();
  rep.mean_kl = mean_kl;
  int64_t differ = 0;
  for (size_t s = 0; s < sequences.size() && row > 0; ++s) {
    const int64_t L = int64_t(sequences[s].tokens.size());
    for (int64_t t = sequences[s].score_from - 1; t < L - 1; ++t)
      differ += RouteSetsDiffer(reference.routes[s].data() + t * row, quantized.routes[s].data() + t * row, M, K);
  }
  if (rep.tokens > 0) rep.routes_differ = double(differ) / double(rep.tokens);
  return rep;
}

Result<double> RelativeChangeOnGpu(model::GpuTransformer& model, const float* w, const float* ref, int64_t n,
                                   double* scratch) {
  if (w == nullptr || ref == nullptr || scratch == nullptr)
    return Status::InvalidArgument("RelativeChangeOnGpu: null pointer");
  PLAN_CUDA(cudaSetDevice(model.device()));
  cudaStream_t st = static_cast<cudaStream_t>(model.stream());
  double* sums = scratch + 2 * gpu_plan::kRelativeChangeBlocks;
  gpu_plan::RelativeChangeSums(w, ref, n, scratch, sums, st);
  PLAN_CUDA(cudaGetLastError());
  double h[2] = {0, 0};
  PLAN_CUDA(cudaMemcpyAsync(h, sums, sizeof h, cudaMemcpyDeviceToHost, st));
  PLAN_CUDA(cudaStreamSynchronize(st));
  const double d2 = h[0], r2 = h[1];
  // ReplanTrigger::RelativeChange's definition, its zero cases included.
  return r2 > 0 ? std::sqrt(d2 / r2) : (d2 > 0 ? INFINITY : 0.0);
}

Result<std::unique_ptr<GpuPlanMeasurer>> GpuPlanMeasurer::Create(const model::ModelConfig& config, int device,
                                                                 Sampler sampler) {
  if (!sampler) return Status::InvalidArgument("GpuPlanMeasurer needs a sampler for its calibration completions");
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<model::GpuTransformer> m,
                         model::GpuTransformer::Create(config, device, /*trainable=*/false));
  return std::unique_ptr<GpuPlanMeasurer>(new GpuPlanMeasurer(std::move(m), std::move(sampler)));
}

Result<std::vector<model::ScoreRequest>> GpuPlanMeasurer::Calibrate(std::span<const float> full,
                                                                    const std::vector<std::vector<int32_t>>& prompts,
                                                                    int64_t max_new_tokens, int32_t stop_token,
                                                                    uint64_t seed) {
  if (prompts.empty()) return Status::InvalidArgument("calibration needs at least one prompt");
  const auto t0 = std::chrono::steady_clock::now();
  full_ = {};
  device_full_ = nullptr;
  GROVE_RETURN_IF_ERROR(model_->UploadParams(full));
  full_ = full;
  return Sample(full, prompts, max_new_tokens, stop_token, seed, t0);
}

Result<std::vector<model::ScoreRequest>> GpuPlanMeasurer::CalibrateFromDevice(
    const float* device_full, const std::vector<std::vector<int32_t>>& prompts, int64_t max_new_tokens,
    int32_t stop_token, uint64_t seed) {
  if (prompts.empty()) return Status::InvalidArgument("calibration needs at least one prompt");
  const auto t0 = std::chrono::steady_clock::now();
  full_ = {};
  device_full_ = nullptr;
  GROVE_RETURN_IF_ERROR(model_->LoadParamsFromDevice(device_full));
  device_full_ = device_full;
  return Sample({}, prompts, max_new_tokens, stop_token, seed, t0);
}

Result<std::vector<model::ScoreRequest>> GpuPlanMeasurer::Sample(std::span<const float> host_full,
                                                                 const std::vector<std::vector<int32_t>>& prompts,
                                                                 int64_t max_new_tokens, int32_t stop_token,
                                                                 uint64_t seed,
                                                                 std::chrono::steady_clock::time_point t0) {
  model::SamplingOptions so;
  so.temperature = 1.0;
  so.max_new_tokens = max_new_tokens;
  so.stop_tokens = {stop_token};
  so.seed = seed;
  GROVE_ASSIGN_OR_RETURN(std::vector<model::Completion<float>> completions,
                         sampler_(model_->device_params(), host_full, prompts, so));
  sample_s_ = Seconds(t0);
  return CalibrationRequests(prompts, completions);
}

Result<double> GpuPlanMeasurer::RelativeChangeFromDevice(const float* device_full) {
  GROVE_ASSIGN_OR_RETURN(void* scratch,
                         change_scratch_.Reserve((2 * gpu_plan::kRelativeChangeBlocks + 2) * sizeof(double),
                                                 model_->device(), "relative change scratch"));
  return RelativeChangeOnGpu(*model_, device_full, model_->device_params(), model_->layout().total(),
                             static_cast<double*>(scratch));
}

Status GpuPlanMeasurer::MeasureUnitErrors(const std::vector<model::ScoreRequest>& calibration,
                                          std::vector<PlanUnit>& units) {
  return MeasureUnitErrorsOnGpu(*model_, calibration, units, &timing_);
}

Result<MismatchReport> GpuPlanMeasurer::MeasureMismatch(const FormatChooser& choose,
                                                        const std::vector<model::ScoreRequest>& calibration) {
  return MeasureMismatchOnGpu(*model_, choose, calibration, full_, device_full_);
}

}  // namespace grove::rollout
