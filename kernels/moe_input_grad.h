// The gradient of an MoE block's input from its routed experts and its
// router, added into the residual gradient in one pass:
//
//   dx[t, :] += sum_j da[row_of_slot[t*top_k + j], :] + dlogits[t, :] W_router
//
// da: the permuted rows' input gradients (through w1 and w3, bf16 [*, h]);
// row_of_slot as kernels/moe_permute.h defines it (-1: a dropped slot, no
// row); dlogits: the router logits' gradient (bf16 [tokens, experts]);
// W_router: the router weight (bf16 [experts, h], logits = x W_router^T);
// dx fp32 [tokens, h].
//
// Why one kernel: the learner added the experts' part (a pass over dx and
// the rows) and then the router's part (a cuBLAS GEMM with k = experts and
// beta = 1: another read and write of dx, ~135 us of a gpu-ref layer at 32k
// tokens where the bytes need ~85). Here a block computes a 64 x 128 tile of
// dlogits W_router on the tensor cores (mma.sync, fp32 accumulation), stages
// it in shared memory, and adds it while the rows are summed, so dx is read
// and written once (H100, gpu-ref layer: 281 us against 225 + 135 apart).
//
// Sums in fp32: the tile's product (bf16 products exact, fp32 adds over
// experts) + the rows' values (in slot order) + the old dx, one rounding
// per add. Deterministic. Device pointers; no host sync.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

struct MoeInputGradArgs {
  const __nv_bfloat16* da = nullptr;        // [*, h], rows indexed by row_of_slot
  const int32_t* row_of_slot = nullptr;     // [tokens * top_k]
  const __nv_bfloat16* dlogits = nullptr;   // [tokens, experts]
  const __nv_bfloat16* w_router = nullptr;  // [experts, h]
  float* dx = nullptr;                      // [tokens, h], added into
  int tokens = 0;
  int top_k = 0;    // 1..16
  int experts = 0;  // 1..256, a multiple of 8
  int h = 0;        // a multiple of 8
};

// InvalidArgument for bad shapes or null / misaligned (16 bytes) pointers;
// Internal for a launch error. tokens == 0 enqueues nothing.
Status MoeInputGrad(const MoeInputGradArgs& args, cudaStream_t stream);

}  // namespace grove::kernels
