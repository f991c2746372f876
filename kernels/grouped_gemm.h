// The grouped expert GEMM: one launch computes, for every expert e,
//   C[rows of e] = A[rows of e] * W[e]^T
// where A holds the tokens routed to the experts, grouped by expert (rows
// offsets[e] .. offsets[e+1]-1 belong to expert e; any count, zero too), and
// W[e] is expert e's Linear weight [n, k] (y = x W^T, as in model/).
// Inputs bf16, accumulation fp32, output fp32 or bf16. All pointers are
// device pointers; the call only enqueues work on `stream`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

enum class GemmOutType { kF32, kBF16 };

// Most experts one call takes (the tile schedule lives in shared memory).
inline constexpr int kGroupedGemmMaxExperts = 1024;

// Which implementation runs. kAuto: on sm_90 (H100/H200) kWgmmaPingpong
// when k >= 1024 and kWgmmaStaged otherwise (measured, docs/kernels.md);
// kMmaSync elsewhere. The others exist to be compared (bench/kernels) and
// tested against each other. All wgmma ones are sm_90a, persistent and
// warp-specialized: one producer warpgroup feeds a TMA + mbarrier ring.
enum class GroupedGemmImpl {
  kAuto,
  kWgmmaBn128,       // two consumer warpgroups share one 128 x 128 tile
  kWgmmaBn256,       // ... one 128 x 256 tile
  kWgmmaBn256Bk32,   // kWgmmaBn256 with k steps of 32 in an 8-deep ring (slower; kept measured)
  kWgmmaPingpong,    // consumer warpgroups on alternate 128 x 128 tiles (epilogue overlaps)
  kWgmmaCluster,     // kWgmmaBn256 on 2-CTA clusters sharing W tiles by multicast (slower)
  kWgmmaStaged,      // kWgmmaBn256 (3 stages), bf16 epilogue staged in shared memory and
                     //   stored by the idle producer warps; fp32 output runs kWgmmaBn256
  kMmaSync,          // sm_80+: cp.async ring + ldmatrix + mma.sync, 128 x 128, persistent
  kWmma,             // the kMmaSync tiling in plain CUDA C++ (nvcuda::wmma), for comparison
};

struct GroupedGemmArgs {
  const __nv_bfloat16* a = nullptr;       // [total_rows, k] row-major
  const __nv_bfloat16* w = nullptr;       // expert e's [n, k] row-major at w + e * w_expert_rows * k
  void* c = nullptr;                      // [total_rows, n] row-major, float or bf16
  const int32_t* expert_offsets = nullptr;  // device, [num_experts + 1]
  int total_rows = 0;                     // rows of A and C
  int num_experts = 0;
  int n = 0;                              // output features (multiple of 8)
  int k = 0;                              // input features (multiple of 8)
  GemmOutType out_type = GemmOutType::kF32;
  // Rows of k elements from one expert's W to the next (>= n); 0: n, i.e.
  // the experts packed as [num_experts, n, k]. Lets the GEMM read weights
  // where they lie in a parameter layout that interleaves each expert's
  // tensors (model/: w1, w2, w3 of one expert, then the next's), with no
  // packed copy.
  int w_expert_rows = 0;
};

// Contract on expert_offsets (read on the device, so not checked here):
// offsets[0] == 0, non-decreasing, offsets[num_experts] <= total_rows. A
// violation cannot make the kernel read or write outside A, W or C (each
// expert's rows are clamped to [0, total_rows)), but its rows are then
// undefined. Rows of C past offsets[num_experts] are not written.
// Returns InvalidArgument for bad shapes or misaligned pointers (16 bytes),
// FailedPrecondition if `impl` cannot run on the current device, Internal
// for a CUDA launch error.
Status GroupedGemm(const GroupedGemmArgs& args, GroupedGemmImpl impl, cudaStream_t stream);

const char* GroupedGemmImplName(GroupedGemmImpl impl);

}  // namespace grove::kernels
