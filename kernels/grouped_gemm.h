// The grouped expert GEMM: one launch computes, for every expert e,
//   C[rows of e] = A[rows of e] * W[e]^T      (w_layout kKMajor)
//   C[rows of e] = A[rows of e] * B[e]        (w_layout kMnMajor)
// where A holds the tokens routed to the experts, grouped by expert (rows
// offsets[e] .. offsets[e+1]-1 belong to expert e; any count, zero too),
// W[e] is expert e's Linear weight [n, k] (y = x W^T, as in model/) and
// B[e] a [k, n] matrix: e.g. the same Linear weight read for the backward's
// dX = dY W, where W [out, in] is B with k = out, n = in, so no transposed
// copy of it is needed.
// Inputs bf16, accumulation fp32, output fp32 or bf16. All pointers are
// device pointers; the call only enqueues work on `stream`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

enum class GemmOutType { kF32, kBF16 };

// How each expert's weight matrix is stored, row-major either way:
// kKMajor: W[e] is [n, k] (k contiguous; "K-major" for the tensor cores).
// kMnMajor: B[e] is [k, n] (n contiguous; "MN-major").
enum class GemmWeightLayout { kKMajor, kMnMajor };

// Most experts one call takes (the tile schedule lives in shared memory).
inline constexpr int kGroupedGemmMaxExperts = 1024;

// Which implementation runs. kAuto: on sm_90 (H100/H200) kWgmmaPingpong
// when k >= 1024, the weights are kKMajor and n < 1024 (or the output
// fp32) and no fused epilogue is asked for, kWgmmaStaged otherwise
// (measured, docs/kernels.md; kernel_bench --dx); kMmaSync elsewhere.
// kMnMajor weights: kWgmmaBn128, kWgmmaBn256, kWgmmaPingpong, kWgmmaStaged
// and kMmaSync (so every kAuto pick) read them; kWgmmaBn256Bk32,
// kWgmmaCluster and kWmma refuse them (InvalidArgument). The others exist to be compared (bench/kernels) and
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
  // Expert e's weight: kKMajor [n, k] row-major at w + e * w_expert_rows * k;
  // kMnMajor [k, n] row-major at w + e * w_expert_rows * n.
  const __nv_bfloat16* w = nullptr;
  void* c = nullptr;                      // [total_rows, n] row-major, float or bf16
  const int32_t* expert_offsets = nullptr;  // device, [num_experts + 1]
  int total_rows = 0;                     // rows of A and C
  int num_experts = 0;
  int n = 0;                              // output features (multiple of 8)
  int k = 0;                              // input features (multiple of 8)
  GemmOutType out_type = GemmOutType::kF32;
  GemmWeightLayout w_layout = GemmWeightLayout::kKMajor;
  // Rows of the stored matrix (of k elements for kKMajor, n for kMnMajor)
  // from one expert's weight to the next: at least its own rows (n, or k
  // for kMnMajor); 0: exactly those, i.e. the experts packed as
  // [num_experts, n, k] (or [num_experts, k, n]). Lets the GEMM read
  // weights where they lie in a parameter layout that interleaves each
  // expert's tensors (model/: w1, w3, w2 of one expert, then the next's),
  // with no packed copy. Rows between experts are never read (kMnMajor too:
  // a k block past an expert's k rows reads zeros, not the gap).
  int w_expert_rows = 0;
  // Optional fused epilogue, the SwiGLU backward (the MoE backward's dX
  // through w2 and the gate in one launch): when set, the GEMM's result is
  // dh, the gradient of h = silu(a) * b, never stored; this points at the
  // forward's [a | b] rows ([total_rows, 2n] row-major, a in columns
  // 0..n-1, b in n..2n-1, 16-byte aligned), and C (bf16, [total_rows, 2n],
  // not overlapping it) receives [da | db] as SwiGluBackwardPacked
  // (kernels/swiglu.h) would from dh. The difference: da and db come from
  // the fp32 accumulator itself, so dh skips the bf16 rounding (2^-9
  // relative) that the unfused GEMM -> bf16 dh -> SwiGluBackwardPacked
  // path has; da and db are each rounded to bf16 once, as there. Requires
  // out_type kBF16. Implementations: kWgmmaStaged (its own 128 x 128 tile
  // variant: 7 storer warps compute the epilogue from an fp32 tile in
  // shared memory) and kMmaSync; kAuto picks one of them; the others return
  // InvalidArgument. Rows of C past offsets[num_experts] are not written.
  // Speed: at the model's w2 shape on an H100 0.50 ms against 0.67 for
  // the GEMM and SwiGluBackwardPacked apart (0.88 with the IEEE sigmoid
  // and 3 storer warps); docs/kernels.md.
  const __nv_bfloat16* swiglu_bwd_ab = nullptr;
  // With swiglu_bwd_ab, the router gate of the gated SwiGLU backward
  // (SwiGluBackwardGated's contract, kernels/swiglu.h), all four or none:
  // dh is then the ungated gradient, row r's gate is
  // slot_gates[slot_of_row[r]], C receives [da | db] of gate * dh, h_gated
  // ([total_rows, n] bf16) gate * h, and dgate_partial ([total_rows,
  // SwiGluGatePartials(n)] fp32) each 128-column block's part of <dh, h>,
  // which SwiGluGateGradFromPartials (swiglu.h) sums into the slots.
  // kWgmmaStaged only (kAuto picks it on sm_90; FailedPrecondition
  // elsewhere). Speed: at the model's w2 shape on an H100 0.66-0.68 ms
  // against 0.75 for the GEMM and SwiGluBackwardGated apart; docs/kernels.md.
  const int32_t* swiglu_bwd_slot_of_row = nullptr;
  const float* swiglu_bwd_slot_gates = nullptr;
  __nv_bfloat16* swiglu_bwd_h_gated = nullptr;
  float* swiglu_bwd_dgate_partial = nullptr;
  // Optional fused epilogue, the SwiGLU forward (the MoE forward's w1|w3
  // GEMM and the gate in one launch): when set, each expert's n weight
  // rows are w1 (rows 0..n/2-1) then w3 (n/2..n-1), C receives [a | b] as
  // without it (a = A w1^T in columns 0..n/2-1, b = A w3^T in n/2..n-1),
  // and this ([total_rows, n/2] bf16 row-major, 16-byte aligned, not
  // overlapping C) receives h = silu(a) * b computed from the bf16 a and b
  // that C holds, bit for bit what SwiGluForwardPacked(C, h, rows, n/2)
  // would write, without reading C back. A tile's W rows are w1's and
  // w3's rows of the same features (two TMA boxes), so one tile's
  // accumulator holds a and b of the same 128 features. Requires out_type
  // kBF16, kKMajor weights, n % 16 == 0 and no swiglu_bwd_ab.
  // Implementations: kWgmmaStaged only (kAuto picks it on sm_90 and
  // returns FailedPrecondition elsewhere); the others return
  // InvalidArgument. Rows past offsets[num_experts] are not written.
  __nv_bfloat16* swiglu_out = nullptr;
  // Optional fused epilogue, the log-prob head (model/'s lm_head GEMM, one
  // expert): when set, the fp32 product z never reaches memory. For each
  // row r and 128-column block j (columns 128 j .. 128 j + 127, those < n)
  // with m = max of z over the block's columns in row r:
  //   C (bf16)                       gets u = z - m, rounded once;
  //   logit_block_stats[r * LogitBlocks(n) + j] gets (m, sum of exp(z - m)
  //                                   over the block) from the fp32 z;
  //   logit_target[r]                 gets z[r, logit_targets[r]] in fp32,
  //                                   where 0 <= logit_targets[r] < n (rows
  //                                   with other targets: untouched).
  // kernels/logprob_head.h turns these into log-probs and their gradient.
  // Why u and not z in bf16: u <= 0, and an element whose probability p is
  // worth anything has |u| <= -ln p (m <= the row's log-sum-exp), so
  // exp(u + m - lse) carries a relative error of about -ln(p) * 2^-8 (bf16's
  // unit roundoff) and the gradient's error p * ln(1/p) * 2^-8 <= 2^-8 / e
  // of |dlogp|, where bf16 z would err by |z| * 2^-8 (logits of 20 -> 8%). logit_targets and logit_target
  // go together (both or neither). Requires out_type kBF16, kKMajor
  // weights, no SwiGLU epilogue; kWgmmaPingpong only (kAuto picks it on
  // sm_90 and returns FailedPrecondition elsewhere). Rows past
  // offsets[num_experts] are not written.
  float2* logit_block_stats = nullptr;
  const int32_t* logit_targets = nullptr;
  float* logit_target = nullptr;
  // Optional fused epilogue, the rotary position embedding (model/'s QKV
  // projection): when rope_table is set, C's columns are heads of 128 and
  // each head starting below rope_columns (a multiple of 128: the q and k
  // heads) is rotated as kernels::RopeForward (kernels/rope.h) would rotate
  // C after the GEMM, row r at position rope_positions[r], with the (cos,
  // sin) pairs of rope_table ([positions][64] float2, RopeCosSinTable): the
  // same fp32 arithmetic on the same bf16 values, so the same bits. Requires
  // out_type kBF16, n % 128 == 0, no other epilogue; kWgmmaStaged only
  // (kAuto picks it on sm_90 and returns FailedPrecondition elsewhere).
  const float2* rope_table = nullptr;
  const int32_t* rope_positions = nullptr;
  int rope_columns = 0;
};

// Blocks of GroupedGemmArgs::logit_block_stats per row for n columns.
inline constexpr int kLogitBlockColumns = 128;
inline int LogitBlocks(int n) { return (n + kLogitBlockColumns - 1) / kLogitBlockColumns; }

// Contract on expert_offsets (read on the device, so not checked here):
// offsets[0] == 0, non-decreasing, offsets[num_experts] <= total_rows. A
// violation cannot make the kernel read or write outside A, W or C (each
// expert's rows are clamped to [0, total_rows)), but its rows are then
// undefined. Rows of C past offsets[num_experts] are not written.
// Returns InvalidArgument for bad shapes or misaligned pointers (16 bytes)
// or a w_layout or epilogue that `impl` does not support,
// FailedPrecondition if `impl` cannot run on the current device, Internal
// for a CUDA launch error.
Status GroupedGemm(const GroupedGemmArgs& args, GroupedGemmImpl impl, cudaStream_t stream);

// Columns of GroupedGemmArgs::swiglu_bwd_dgate_partial for n output features.
inline int SwiGluGatePartials(int n) { return (n + 127) / 128; }

const char* GroupedGemmImplName(GroupedGemmImpl impl);

}  // namespace grove::kernels
