// D = A B^T + C for the residual stream (bf16 A [M, K], B [N, K], C and D
// [M, N], fp32 accumulation, one rounding), through cuBLASLt: unlike
// cublasGemmEx it reads C and writes D as separate matrices, so a layer's
// residual update x_out = x_in + f(x_in) W^T needs no copy of x_in into
// x_out first (two [tokens, hidden] copies a layer in the learner's
// forward). The algorithm is chosen once per shape, by timing cuBLASLt's
// candidates on the first call's operands (out of place), and remembered.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "base/result.h"
#include "base/status.h"

namespace grove::model {

class ResidualGemm {
 public:
  // Fails (Internal) when cuBLASLt or the workspace cannot be made.
  static Result<std::unique_ptr<ResidualGemm>> Create();
  ~ResidualGemm();
  ResidualGemm(const ResidualGemm&) = delete;
  ResidualGemm& operator=(const ResidualGemm&) = delete;

  // Row-major D[M, N] = A[M, K] B[N, K]^T + C[M, N], leading dimensions lda,
  // ldb, ldc (D's too), on `stream`. D may be C (in place). Pointers 16-byte
  // aligned; InvalidArgument otherwise or for a shape cuBLASLt has no
  // algorithm for.
  Status Run(int64_t M, int64_t N, int64_t K, const __nv_bfloat16* A, int64_t lda, const __nv_bfloat16* B,
             int64_t ldb, const __nv_bfloat16* C, __nv_bfloat16* D, int64_t ldc, cudaStream_t stream);

 private:
  struct Plan;
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  ResidualGemm() = default;
  Result<Plan*> PlanFor(const Key& key);
  Status Tune(Plan* plan, const __nv_bfloat16* A, const __nv_bfloat16* B, const __nv_bfloat16* C,
              __nv_bfloat16* D, cudaStream_t stream);

  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace grove::model
