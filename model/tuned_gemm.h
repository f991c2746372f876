// The learner's dense GEMMs, each with the algorithm that measured fastest
// for its shape. Row-major D[M, N] = op(A) op(B) + beta C: A and B bf16, C
// and D of one type (bf16 or fp32), fp32 accumulation -- the model's one
// GEMM form. Through cuBLASLt, C and D may be different matrices, so a
// residual update x_out = x_in + f W^T needs no copy of x_in into x_out.
//
// The first call of a shape class times cuBLASLt's heuristic candidates
// (up to 8) and, where D is C, cublasGemmEx itself, on the call's own
// operands, then keeps the fastest for the process. A class is the exact
// shape up to 8192 in each dimension and power-of-two buckets past it (a
// batch's token count changes every step; re-timing each would cost more
// than it gains); another shape of the class runs the recorded algorithm
// where cuBLASLt accepts it, else the heuristic's first choice. Every
// TunedGemm of the process uses the same choices, so two models in one
// process give the same bits (tests compare them bit for bit); two
// processes may differ in the last bit where timings tie. A call that
// accumulates into D (D is C, beta != 0) is timed on a scratch matrix,
// never on D.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "base/result.h"
#include "base/status.h"

namespace grove::model {

struct GemmCall {
  bool trans_a = false, trans_b = false;  // op(A) = A^T: A is [K, M]; op(B) = B^T: B is [N, K]
  int64_t m = 0, n = 0, k = 0;
  const __nv_bfloat16* a = nullptr;
  int64_t lda = 0;
  const __nv_bfloat16* b = nullptr;
  int64_t ldb = 0;
  float beta = 0.f;
  const void* c = nullptr;  // read when beta != 0; may be d
  void* d = nullptr;
  bool f32 = false;  // C and D fp32 (else bf16)
  int64_t ldc = 0;   // C's and D's
};

class TunedGemm {
 public:
  // `gemm_ex`: a cuBLAS handle the caller keeps on `stream` (a candidate
  // where D is C). Internal / ResourceExhausted when cuBLASLt or its
  // workspace cannot be made.
  static Result<std::unique_ptr<TunedGemm>> Create(cublasHandle_t gemm_ex, cudaStream_t stream);
  ~TunedGemm();
  TunedGemm(const TunedGemm&) = delete;
  TunedGemm& operator=(const TunedGemm&) = delete;

  // Runs `call` on the stream given at Create. InvalidArgument for a bad
  // shape, a null or not 16-byte aligned operand, or a shape no algorithm
  // runs.
  Status Run(const GemmCall& call);

 private:
  struct Plan;
  TunedGemm() = default;
  Result<Plan*> PlanFor(const GemmCall& call);
  Result<int> Time(const Plan& plan, const GemmCall& call);
  Status Resolve(Plan* plan, const GemmCall& call);
  cublasStatus_t Launch(const Plan& plan, const GemmCall& call, void* d, int algo);

  cublasLtHandle_t lt_ = nullptr;
  cublasHandle_t gemm_ex_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<std::string, std::unique_ptr<Plan>> plans_;  // by ShapeKey
};

}  // namespace grove::model
