// Glue kernels of GpuTransformer (internal to model/gpu_transformer.cc):
// casts, row gathers of the scored positions and
// the forward's balance-loss statistics -- what is specific to how the model
// lays its tensors out; the step's real kernels are in kernels/. Each launcher only
// enqueues work on `stream`; shapes are checked by the caller. bf16 is
// __nv_bfloat16, every pointer a device pointer, rows of bf16 tensors
// 16-byte aligned (widths multiples of 8).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace grove::model::gpu {

using bf16 = __nv_bfloat16;

// dst[i] = bf16(src[i]).
void CastToBf16(const float* src, bf16* dst, int64_t n, cudaStream_t stream);
// dst[i] += float(src[i]). (No longer in the backward, whose RMSNorm adds
// into the residual itself; kernel_bench times the old path with it.)
void AddBf16Into(const bf16* src, float* dst, int64_t n, cudaStream_t stream);

// Rows of src gathered: dst[i] = src[index[i]].
void GatherRows(const bf16* src, const int32_t* index, bf16* dst, int rows, int h, cudaStream_t stream);
// dst[index[i]] = src[i] (dst pre-zeroed; indices distinct).
void ScatterRows(const float* src, const int32_t* index, float* dst, int rows, int h, cudaStream_t stream);

// dx[t] += sum_j a[p] over p = pos[t,j]: the gradients of the expert
// inputs (through w1 and w3 together, bf16, rounded once by their grouped
// GEMM) summed in fp32 into the fp32 residual gradient
// (kernels::MoePermuteBackward gives bf16; this adds into the residual in
// the same pass). h a multiple of 8.
void MoeScatterBackward(const bf16* a, const int32_t* pos, float* dx, int rows, int top_k, int h,
                        cudaStream_t stream);

// Sequence-wise balance loss statistics for its value in the forward
// (model/moe.h; kernels::RouterBackward has the gradient): per sequence q and
// expert e, prob_mean[q,e] = mean over its rows of s_e / sum s, count[q,e]
// = routed pairs; sequence q's rows are cu_seqlens[q] .. cu_seqlens[q+1]-1.
// Both outputs are overwritten, the same bits every run: each of
// kBalanceSplits blocks a sequence sums its share of rows in a fixed order
// into `workspace` (BalanceStatsWorkspaceBytes), a second pass adds the
// shares in order. experts <= 256.
constexpr int kBalanceSplits = 16;
size_t BalanceStatsWorkspaceBytes(int seqs, int experts);
void BalanceStats(const float* scores, const uint16_t* ids, const int32_t* cu_seqlens, int seqs, int experts,
                  int top_k, void* workspace, float* prob_mean, int32_t* count, cudaStream_t stream);

}  // namespace grove::model::gpu
