#include "model/residual_gemm.h"

#include <string>
#include <vector>

namespace grove::model {
namespace {

// cuBLASLt's heuristics pick kernels that use up to this much scratch; the
// largest residual GEMMs of gpu-ref (32k tokens) gain nothing from more.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;
constexpr int kCandidates = 8;
constexpr int kTimedRuns = 3;

Status Lt(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::OK();
  return Status::Internal(std::string("ResidualGemm: cuBLASLt ") + what + " failed with status " +
                          std::to_string(int(st)));
}

}  // namespace

// One shape's descriptors and chosen algorithm. cuBLASLt is column-major:
// row-major D = A B^T is D^T = B A^T there, so its "A" is our B (K x N
// stored, transposed) and its "B" is our A (K x M stored).
struct ResidualGemm::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t b_layout = nullptr, a_layout = nullptr, cd_layout = nullptr;
  cublasLtMatmulAlgo_t algo{};
  std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's, best first
  bool tuned = false;
  ~Plan() {
    if (cd_layout) cublasLtMatrixLayoutDestroy(cd_layout);
    if (a_layout) cublasLtMatrixLayoutDestroy(a_layout);
    if (b_layout) cublasLtMatrixLayoutDestroy(b_layout);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

Result<std::unique_ptr<ResidualGemm>> ResidualGemm::Create() {
  std::unique_ptr<ResidualGemm> g(new ResidualGemm());
  GROVE_RETURN_IF_ERROR(Lt(cublasLtCreate(&g->lt_), "create"));
  const cudaError_t err = cudaMalloc(&g->workspace_, kWorkspaceBytes);
  if (err != cudaSuccess) {
    g->workspace_ = nullptr;
    return Status::ResourceExhausted(std::string("ResidualGemm: workspace: ") + cudaGetErrorString(err));
  }
  g->workspace_bytes_ = kWorkspaceBytes;
  return g;
}

ResidualGemm::~ResidualGemm() {
  plans_.clear();
  if (workspace_) cudaFree(workspace_);
  if (lt_) cublasLtDestroy(lt_);
}

Result<ResidualGemm::Plan*> ResidualGemm::PlanFor(const Key& key) {
  if (auto it = plans_.find(key); it != plans_.end()) return it->second.get();
  const auto [M, N, K, lda, ldb, ldc] = key;
  auto plan = std::make_unique<Plan>();
  GROVE_RETURN_IF_ERROR(Lt(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc"));
  const cublasOperation_t transpose = CUBLAS_OP_T, none = CUBLAS_OP_N;
  GROVE_RETURN_IF_ERROR(Lt(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &transpose,
                                                          sizeof(transpose)),
                           "transa"));
  GROVE_RETURN_IF_ERROR(
      Lt(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &none, sizeof(none)), "transb"));
  GROVE_RETURN_IF_ERROR(
      Lt(cublasLtMatrixLayoutCreate(&plan->b_layout, CUDA_R_16BF, uint64_t(K), uint64_t(N), ldb), "layout B"));
  GROVE_RETURN_IF_ERROR(
      Lt(cublasLtMatrixLayoutCreate(&plan->a_layout, CUDA_R_16BF, uint64_t(K), uint64_t(M), lda), "layout A"));
  GROVE_RETURN_IF_ERROR(
      Lt(cublasLtMatrixLayoutCreate(&plan->cd_layout, CUDA_R_16BF, uint64_t(N), uint64_t(M), ldc), "layout C"));
  cublasLtMatmulPreference_t pref = nullptr;
  GROVE_RETURN_IF_ERROR(Lt(cublasLtMatmulPreferenceCreate(&pref), "preference"));
  const uint64_t ws = workspace_bytes_;
  const uint32_t align = 16;  // Run checks the pointers
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                           sizeof(ws));
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align));
  cublasLtMatmulHeuristicResult_t found[kCandidates]{};
  int count = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(lt_, plan->op, plan->b_layout, plan->a_layout, plan->cd_layout,
                                        plan->cd_layout, pref, kCandidates, found, &count);
  cublasLtMatmulPreferenceDestroy(pref);
  GROVE_RETURN_IF_ERROR(Lt(st, "heuristic"));
  if (count == 0)
    return Status::InvalidArgument("ResidualGemm: no cuBLASLt algorithm for M=" + std::to_string(M) +
                                   " N=" + std::to_string(N) + " K=" + std::to_string(K));
  plan->candidates.reserve(count);
  for (int i = 0; i < count; ++i) plan->candidates.push_back(found[i].algo);
  plan->algo = found[0].algo;
  Plan* p = plan.get();
  plans_.emplace(key, std::move(plan));
  return p;
}

// The heuristic's first choice is not always the fastest (in the gpu-ref
// step it was slower than cublasGemmEx's): each candidate runs kTimedRuns
// times on the caller's operands, and the fastest is kept. Out of place
// only (D = A B^T + C is then the same each run); the stream is
// synchronized once per shape.
Status ResidualGemm::Tune(Plan* plan, const __nv_bfloat16* A, const __nv_bfloat16* B, const __nv_bfloat16* C,
                          __nv_bfloat16* D, cudaStream_t stream) {
  plan->tuned = true;
  if (plan->candidates.size() < 2 || C == D) return Status::OK();
  cudaEvent_t start = nullptr, stop = nullptr;
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) {
    if (start) cudaEventDestroy(start);
    return Status::Internal("ResidualGemm: event create failed");
  }
  const float one = 1.f;
  float best_ms = 0.f;
  int best = -1;
  Status status = Status::OK();
  for (size_t i = 0; i < plan->candidates.size() && status.ok(); ++i) {
    const cublasLtMatmulAlgo_t& algo = plan->candidates[i];
    auto run = [&] {
      return cublasLtMatmul(lt_, plan->op, &one, B, plan->b_layout, A, plan->a_layout, &one, C, plan->cd_layout,
                            D, plan->cd_layout, &algo, workspace_, workspace_bytes_, stream);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;  // a candidate that cannot run here is skipped
    cudaEventRecord(start, stream);
    for (int r = 0; r < kTimedRuns; ++r) run();
    cudaEventRecord(stop, stream);
    if (cudaEventSynchronize(stop) != cudaSuccess) {
      status = Status::Internal("ResidualGemm: timing failed");
      break;
    }
    float ms = 0.f;
    cudaEventElapsedTime(&ms, start, stop);
    if (best < 0 || ms < best_ms) {
      best = int(i);
      best_ms = ms;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  GROVE_RETURN_IF_ERROR(status);
  if (best >= 0) plan->algo = plan->candidates[best];
  return Status::OK();
}

Status ResidualGemm::Run(int64_t M, int64_t N, int64_t K, const __nv_bfloat16* A, int64_t lda,
                         const __nv_bfloat16* B, int64_t ldb, const __nv_bfloat16* C, __nv_bfloat16* D,
                         int64_t ldc, cudaStream_t stream) {
  if (M == 0 || N == 0) return Status::OK();
  if (M < 0 || N < 0 || K <= 0 || lda < K || ldb < K || ldc < N)
    return Status::InvalidArgument("ResidualGemm: bad shape M=" + std::to_string(M) + " N=" + std::to_string(N) +
                                   " K=" + std::to_string(K));
  for (const void* p : {static_cast<const void*>(A), static_cast<const void*>(B), static_cast<const void*>(C),
                        static_cast<const void*>(D)})
    if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 != 0)
      return Status::InvalidArgument("ResidualGemm: null or not 16-byte aligned operand");
  GROVE_ASSIGN_OR_RETURN(Plan * plan, PlanFor(Key{M, N, K, lda, ldb, ldc}));
  if (!plan->tuned) GROVE_RETURN_IF_ERROR(Tune(plan, A, B, C, D, stream));
  const float one = 1.f;
  return Lt(cublasLtMatmul(lt_, plan->op, &one, B, plan->b_layout, A, plan->a_layout, &one, C, plan->cd_layout,
                           D, plan->cd_layout, &plan->algo, workspace_, workspace_bytes_, stream),
            "matmul");
}

}  // namespace grove::model
