#include "model/tuned_gemm.h"

#include <glog/logging.h>

#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace grove::model {
namespace {

// cuBLASLt's heuristics pick kernels that use up to this much scratch.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;
constexpr int kCandidates = 8;
constexpr int kTimedRuns = 3;
// An accumulating call's timing scratch is allocated up to this size;
// larger ones take the heuristic's first choice untimed.
constexpr size_t kMaxScratchBytes = size_t{512} << 20;
constexpr int kGemmEx = -1;  // Plan::chosen: cublasGemmEx
constexpr size_t kMaxPlans = 256;

Status LtStatus(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::OK();
  if (st == CUBLAS_STATUS_ALLOC_FAILED)
    return Status::ResourceExhausted(std::string("TunedGemm: cuBLAS ") + what + ": out of device memory");
  return Status::Internal(std::string("TunedGemm: cuBLAS ") + what + " failed with status " +
                          std::to_string(int(st)));
}

std::string ShapeKey(const GemmCall& c) {
  int device = 0;
  cudaGetDevice(&device);
  return std::to_string(device) + (c.trans_a ? "T" : "N") + (c.trans_b ? "T" : "N") + " " + std::to_string(c.m) +
         "x" + std::to_string(c.n) + "x" + std::to_string(c.k) + " ld " + std::to_string(c.lda) + "," +
         std::to_string(c.ldb) + "," + std::to_string(c.ldc) + (c.f32 ? " f32" : " bf16") +
         (c.c == c.d ? " c=d" : " c!=d");
}

// Dimensions past kExactDims are tuned in power-of-two buckets: a batch's
// token count changes from step to step, and timing every new one would
// cost more than it saves. The weights' dimensions stay exact.
constexpr int64_t kExactDims = 8192;
int64_t Bucket(int64_t x) {
  if (x <= kExactDims) return x;
  int64_t b = kExactDims;
  while (b < x) b *= 2;
  return b;
}
std::string BucketKey(const GemmCall& c) {
  GemmCall b = c;
  b.m = Bucket(c.m);
  b.n = Bucket(c.n);
  b.k = Bucket(c.k);
  b.lda = b.ldb = b.ldc = 0;  // follow the dimensions
  return ShapeKey(b);
}

// The process's choices, so that every TunedGemm runs a shape the same way.
struct Choice {
  bool gemm_ex = false;
  cublasLtMatmulAlgo_t algo{};
};
std::mutex& ChoicesMutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, Choice>& Choices() {
  static auto* choices = new std::map<std::string, Choice>();
  return *choices;
}

}  // namespace

// One exact shape's descriptors and how it runs. cuBLASLt is column-major:
// row-major D = op(A) op(B) is D^T = op(B)^T op(A)^T there, so its "A" is
// our B and its "B" our A, each described as stored.
struct TunedGemm::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t lt_a = nullptr, lt_b = nullptr, cd = nullptr;
  std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's for this shape, best first
  int chosen = 0;                                // index into candidates, or kGemmEx
  bool resolved = false;                         // chosen is final
  ~Plan() {
    if (cd) cublasLtMatrixLayoutDestroy(cd);
    if (lt_b) cublasLtMatrixLayoutDestroy(lt_b);
    if (lt_a) cublasLtMatrixLayoutDestroy(lt_a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

Result<std::unique_ptr<TunedGemm>> TunedGemm::Create(cublasHandle_t gemm_ex, cudaStream_t stream) {
  std::unique_ptr<TunedGemm> g(new TunedGemm());
  g->gemm_ex_ = gemm_ex;
  g->stream_ = stream;
  GROVE_RETURN_IF_ERROR(LtStatus(cublasLtCreate(&g->lt_), "cublasLtCreate"));
  const cudaError_t err = cudaMalloc(&g->workspace_, kWorkspaceBytes);
  if (err != cudaSuccess) {
    g->workspace_ = nullptr;
    return Status::ResourceExhausted(std::string("TunedGemm: workspace: ") + cudaGetErrorString(err));
  }
  g->workspace_bytes_ = kWorkspaceBytes;
  return g;
}

TunedGemm::~TunedGemm() {
  plans_.clear();
  if (workspace_) cudaFree(workspace_);
  if (lt_) cublasLtDestroy(lt_);
}

Result<TunedGemm::Plan*> TunedGemm::PlanFor(const GemmCall& c) {
  std::string key = ShapeKey(c);
  if (auto it = plans_.find(key); it != plans_.end()) return it->second.get();
  // Token counts vary from batch to batch: keep the descriptors of a
  // bounded number of recent shapes.
  if (plans_.size() >= kMaxPlans) plans_.clear();
  auto plan = std::make_unique<Plan>();
  const cudaDataType_t out = c.f32 ? CUDA_R_32F : CUDA_R_16BF;
  const cublasOperation_t op_a = c.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's A is our B
  const cublasOperation_t op_b = c.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  GROVE_RETURN_IF_ERROR(LtStatus(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc"));
  GROVE_RETURN_IF_ERROR(LtStatus(
      cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)), "transa"));
  GROVE_RETURN_IF_ERROR(LtStatus(
      cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)), "transb"));
  // Stored shapes: cuBLASLt's A (our B) is n x k, or k x n transposed; its
  // B (our A) k x m, or m x k; C and D n x m.
  GROVE_RETURN_IF_ERROR(LtStatus(cublasLtMatrixLayoutCreate(&plan->lt_a, CUDA_R_16BF, c.trans_b ? c.k : c.n,
                                                            c.trans_b ? c.n : c.k, c.ldb),
                                 "layout A"));
  GROVE_RETURN_IF_ERROR(LtStatus(cublasLtMatrixLayoutCreate(&plan->lt_b, CUDA_R_16BF, c.trans_a ? c.m : c.k,
                                                            c.trans_a ? c.k : c.m, c.lda),
                                 "layout B"));
  GROVE_RETURN_IF_ERROR(LtStatus(cublasLtMatrixLayoutCreate(&plan->cd, out, c.n, c.m, c.ldc), "layout C"));
  cublasLtMatmulPreference_t pref = nullptr;
  GROVE_RETURN_IF_ERROR(LtStatus(cublasLtMatmulPreferenceCreate(&pref), "preference"));
  const uint64_t ws = workspace_bytes_;
  const uint32_t align = 16;  // Run checks the pointers
  cublasStatus_t st =
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align));
  cublasLtMatmulHeuristicResult_t found[kCandidates]{};
  int count = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(lt_, plan->op, plan->lt_a, plan->lt_b, plan->cd, plan->cd, pref,
                                        kCandidates, found, &count);
  cublasLtMatmulPreferenceDestroy(pref);
  GROVE_RETURN_IF_ERROR(LtStatus(st, "heuristic"));
  for (int i = 0; i < count; ++i) plan->candidates.push_back(found[i].algo);
  if (plan->candidates.empty() && c.c != c.d)
    return Status::InvalidArgument("TunedGemm: no cuBLASLt algorithm for " + key);
  plan->chosen = plan->candidates.empty() ? kGemmEx : 0;
  Plan* p = plan.get();
  plans_.emplace(std::move(key), std::move(plan));
  return p;
}

cublasStatus_t TunedGemm::Launch(const Plan& plan, const GemmCall& c, void* d, int algo) {
  const float one = 1.f;
  if (algo == kGemmEx) {
    // Reads and writes d: the call's D, which is its C (cublasGemmEx is
    // offered only then), or Tune's scratch.
    return cublasGemmEx(gemm_ex_, c.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, c.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                        int(c.n), int(c.m), int(c.k), &one, c.b, CUDA_R_16BF, int(c.ldb), c.a, CUDA_R_16BF,
                        int(c.lda), &c.beta, d, c.f32 ? CUDA_R_32F : CUDA_R_16BF, int(c.ldc), CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT);
  }
  return cublasLtMatmul(lt_, plan.op, &one, c.b, plan.lt_a, c.a, plan.lt_b, &c.beta, c.c, plan.cd, d, plan.cd,
                        &plan.candidates[algo], workspace_, workspace_bytes_, stream_);
}

// Times each option kTimedRuns times after one untimed run; the stream is
// synchronized once. Where D is C and beta != 0 each run would add into D
// again, so the runs write a scratch matrix instead (cuBLASLt's candidates
// reading C from D; cublasGemmEx, which reads and writes one matrix, on the
// scratch alone: its values do not change its speed). Returns the fastest
// option (an index into plan.candidates, or kGemmEx), or the plan's first
// choice where no timing could be made.
Result<int> TunedGemm::Time(const Plan& plan, const GemmCall& c) {
  const bool accumulates = c.c == c.d && c.beta != 0.f;
  const size_t d_bytes = size_t(c.m) * size_t(c.ldc) * (c.f32 ? 4 : 2);
  void* target = c.d;
  void* scratch = nullptr;
  if (accumulates) {
    if (d_bytes > kMaxScratchBytes || cudaMalloc(&scratch, d_bytes) != cudaSuccess) {
      cudaGetLastError();  // no room for a scratch: the heuristic's choice stands
      return plan.chosen;
    }
    target = scratch;
  }
  std::vector<int> options;
  for (int i = 0; i < int(plan.candidates.size()); ++i) options.push_back(i);
  if (c.c == c.d) options.push_back(kGemmEx);
  cudaEvent_t start = nullptr, stop = nullptr;
  Status status = Status::OK();
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess)
    status = Status::Internal("TunedGemm: event create failed");
  float best_ms = 0.f;
  int best = plan.chosen;
  bool any = false;
  for (int option : options) {
    if (!status.ok()) break;
    if (Launch(plan, c, target, option) != CUBLAS_STATUS_SUCCESS) continue;  // cannot run here: skipped
    cudaEventRecord(start, stream_);
    for (int r = 0; r < kTimedRuns; ++r) Launch(plan, c, target, option);
    cudaEventRecord(stop, stream_);
    if (cudaEventSynchronize(stop) != cudaSuccess) {
      status = Status::Internal("TunedGemm: timing failed");
      break;
    }
    float ms = 0.f;
    cudaEventElapsedTime(&ms, start, stop);
    if (!any || ms < best_ms) {
      best = option;
      best_ms = ms;
      any = true;
    }
  }
  if (start) cudaEventDestroy(start);
  if (stop) cudaEventDestroy(stop);
  if (scratch) cudaFree(scratch);
  GROVE_RETURN_IF_ERROR(status);
  VLOG(1) << "TunedGemm " << ShapeKey(c) << ": "
          << (best == kGemmEx ? std::string("cublasGemmEx") : "cuBLASLt candidate " + std::to_string(best)) << " of "
          << options.size() << ", " << best_ms / kTimedRuns << " ms";
  return best;
}

// The shape's bucket has a process-wide choice (the first call of the
// bucket times the options on its own shape and records it). A cuBLASLt
// algorithm recorded for another shape of the bucket runs this one if
// cuBLASLt says it can (cublasLtMatmulAlgoCheck, within the workspace);
// else this shape keeps the heuristic's first choice.
Status TunedGemm::Resolve(Plan* plan, const GemmCall& c) {
  const std::string bucket = BucketKey(c);
  std::optional<Choice> choice;
  {
    std::lock_guard<std::mutex> lock(ChoicesMutex());
    if (auto it = Choices().find(bucket); it != Choices().end()) choice = it->second;
  }
  if (!choice) {
    GROVE_ASSIGN_OR_RETURN(const int best, Time(*plan, c));
    Choice timed;
    timed.gemm_ex = best == kGemmEx;
    if (!timed.gemm_ex) timed.algo = plan->candidates[best];
    std::lock_guard<std::mutex> lock(ChoicesMutex());
    // Another TunedGemm may have recorded the bucket meanwhile: its choice
    // wins, so that the process stays consistent.
    choice = Choices().try_emplace(bucket, timed).first->second;
  }
  plan->resolved = true;
  if (choice->gemm_ex) {
    plan->chosen = kGemmEx;  // the bucket key includes "D is C"
    return Status::OK();
  }
  cublasLtMatmulHeuristicResult_t check{};
  if (cublasLtMatmulAlgoCheck(lt_, plan->op, plan->lt_a, plan->lt_b, plan->cd, plan->cd, &choice->algo, &check) ==
          CUBLAS_STATUS_SUCCESS &&
      check.workspaceSize <= workspace_bytes_) {
    plan->candidates.push_back(choice->algo);
    plan->chosen = int(plan->candidates.size()) - 1;
  }
  return Status::OK();
}

Status TunedGemm::Run(const GemmCall& c) {
  if (c.m == 0 || c.n == 0) return Status::OK();
  const int64_t a_cols = c.trans_a ? c.m : c.k, b_cols = c.trans_b ? c.k : c.n;
  if (c.m < 0 || c.n < 0 || c.k <= 0 || c.lda < a_cols || c.ldb < b_cols || c.ldc < c.n)
    return Status::InvalidArgument("TunedGemm: bad shape " + ShapeKey(c));
  for (const void* p : {static_cast<const void*>(c.a), static_cast<const void*>(c.b), c.c,
                        static_cast<const void*>(c.d)})
    if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 != 0)
      return Status::InvalidArgument("TunedGemm: null or not 16-byte aligned operand");
  GROVE_ASSIGN_OR_RETURN(Plan * plan, PlanFor(c));
  if (!plan->resolved) GROVE_RETURN_IF_ERROR(Resolve(plan, c));
  return LtStatus(Launch(*plan, c, c.d, plan->chosen), plan->chosen == kGemmEx ? "gemm ex" : "matmul");
}

}  // namespace grove::model
