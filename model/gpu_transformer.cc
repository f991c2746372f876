#include "model/gpu_transformer.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <glog/logging.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "base/parallel_for.h"
#include "kernels/attention.h"
#include "kernels/embedding.h"
#include "kernels/grouped_gemm.h"
#include "kernels/grouped_weight_grad.h"
#include "kernels/logprob_head.h"
#include "kernels/moe_input_grad.h"
#include "kernels/moe_permute.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/router.h"
#include "kernels/sum_of_squares.h"
#include "kernels/swiglu.h"
#include "model/gpu_transformer_kernels.h"
#include "model/tuned_gemm.h"

namespace grove::model {
namespace {

using gpu::bf16;

// Out of device memory is ResourceExhausted (a caller can retry with less,
// GrpoTrainer does); any other CUDA error is Internal.
Status Cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  const std::string msg = std::string("GpuTransformer: ") + what + ": " + cudaGetErrorString(err);
  if (err == cudaErrorMemoryAllocation) return Status::ResourceExhausted(msg);
  return Status::Internal(msg);
}
Status Cublas(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::OK();
  if (st == CUBLAS_STATUS_ALLOC_FAILED)
    return Status::ResourceExhausted(std::string("GpuTransformer: cuBLAS ") + what + ": out of device memory");
  return Status::Internal(std::string("GpuTransformer: cuBLAS ") + what + " failed with status " +
                          std::to_string(int(st)));
}
#define GPU_OK(expr) GROVE_RETURN_IF_ERROR(Cuda((expr), #expr))
// Launch errors of the glue kernels surface at the next check.
#define GPU_LAUNCHED(what) GROVE_RETURN_IF_ERROR(Cuda(cudaGetLastError(), what))

// A device allocation that grows on demand (contents are lost on growth).
class DevBuf {
 public:
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; o.bytes_ = 0; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    if (this != &o) {
      Release();
      p_ = o.p_;
      bytes_ = o.bytes_;
      o.p_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  ~DevBuf() { Release(); }
  // Frees the allocation (the next Reserve allocates anew).
  void Release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return Status::OK();
    Release();
    const cudaError_t err = cudaMalloc(&p_, std::max<size_t>(bytes, 256));
    if (err != cudaSuccess) {
      p_ = nullptr;
      // The runtime also recorded the failure as this thread's last error:
      // clear it, or the next GPU_LAUNCHED check (cudaGetLastError) would
      // report it as a failed launch, also in a retry with less memory.
      if (cudaPeekAtLastError() == err) cudaGetLastError();
      return Status::ResourceExhausted("GpuTransformer: cannot allocate " + std::to_string(bytes) +
                                       " bytes on the GPU: " + cudaGetErrorString(err));
    }
    bytes_ = bytes;
    return Status::OK();
  }
  template <typename T>
  Status Reserve(int64_t count, T** out) {
    GROVE_RETURN_IF_ERROR(Reserve(size_t(std::max<int64_t>(count, 1)) * sizeof(T)));
    *out = static_cast<T*>(p_);
    return Status::OK();
  }
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Whether Backward writes every element of this tensor's gradient in each
// call (so that after ZeroGrad it can overwrite instead of accumulate): every
// tensor but the router's selection bias, which gets no gradient, and the
// embedding, whose gradient is a scatter-add (ZeroGrad zeroes both: 134 MB
// for gpu-ref's embedding). A tensor added to ParamLayout is zeroed by
// ZeroGrad until Backward learns to write it.
bool BackwardWritesAll(const std::string& name) {
  auto ends_with = [&](std::string_view suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (name == "norm" || name == "lm_head") return true;
  for (std::string_view s : {".attn_norm", ".attn.wq", ".attn.wk", ".attn.wv", ".attn.wo", ".ffn_norm", ".mlp.w1",
                             ".mlp.w2", ".mlp.w3", ".moe.router", ".moe.shared.w1", ".moe.shared.w2",
                             ".moe.shared.w3"})
    if (ends_with(s)) return true;
  return name.find(".moe.experts.") != std::string::npos && (ends_with(".w1") || ends_with(".w2") || ends_with(".w3"));
}

// The one of `impls` that `name_of` calls `v` (none: nullopt); appends all
// their names to `names` (", "-separated) for the caller's error message.
template <typename Impl>
std::optional<Impl> ImplNamed(const std::string& v, std::initializer_list<Impl> impls, const char* (*name_of)(Impl),
                              std::string* names) {
  std::optional<Impl> found;
  for (Impl impl : impls) {
    *names += std::string(names->empty() ? "" : ", ") + name_of(impl);
    if (v == name_of(impl)) found = impl;
  }
  return found;
}

// Page-locked host memory, grown on demand (contents not kept).
class PinnedBuf {
 public:
  PinnedBuf() = default;
  PinnedBuf(const PinnedBuf&) = delete;
  PinnedBuf& operator=(const PinnedBuf&) = delete;
  ~PinnedBuf() { Release(); }
  void Release() {
    if (p_) cudaFreeHost(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  Result<char*> Reserve(size_t bytes) {
    if (bytes <= bytes_) return static_cast<char*>(p_);
    Release();
    if (cudaMallocHost(&p_, bytes) != cudaSuccess) {
      cudaGetLastError();
      p_ = nullptr;
      return Status::ResourceExhausted("GpuTransformer: cannot allocate " + std::to_string(bytes) +
                                       " bytes of page-locked host memory");
    }
    bytes_ = bytes;
    return static_cast<char*>(p_);
  }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// What one layer's forward keeps for the backward.
struct LayerTape {
  DevBuf x_mid, h1, qkv, o, lse, h2, rstd1, rstd2;  // qkv [R, qd + 2 kd] = [q | k | v] per row
  DevBuf fab, fh;                     // dense SwiGLU or the shared experts: [R, 2F] = [a | b], h [R, F] bf16
  DevBuf scores, gates, pos, src;     // router and grouping
  DevBuf eab;                         // the experts' [a | b] per row (h and y are not kept: SwiGluBackwardGated)
  DevBuf xe;                          // the experts' inputs in expert order, when kept
  bool xe_kept = false;               // xe holds this forward's permuted h2
};

// One forward's state. Score(keep=false) runs in its own Tape that keeps
// one LayerTape (reused by every layer) and two residual buffers.
struct Tape {
  int rows = 0, seqs = 0, scored = 0, max_seqlen = 0;
  double len_sq = 0;              // sum of squared sequence lengths (attention FLOPs)
  std::vector<size_t> sizes;      // log-probs per request
  std::vector<int32_t> h_counts;  // [moe layers, experts] of the last forward
  DevBuf tokens, pos, cu_seqlens, sc_row, sc_target, replay;
  DevBuf lm_offsets;              // [chunks][2] int32: {0, the chunk's rows}, the fused head's one expert
  DevBuf row_offsets;             // {0, rows} int32: the dense FFN's GEMMs run as one grouped-GEMM expert
  std::vector<DevBuf> resid;      // residual stream entering each layer (+ the final one)
  std::vector<LayerTape> layers;
  DevBuf ids, counts, offsets, prob_mean, bal_count;  // [moe layers, ...]
  DevBuf rstd_final, h_final, hs, lse, logp;
  // [scored, vocab], when kept (Impl::keep_logits); else recomputed per
  // chunk. fp32 logits, or with the fused head (Impl::fused_lm_head) bf16 u = z - m
  // of each 128-column block (GroupedGemmArgs::logit_block_stats), whose
  // (m, sum) pairs logit_stats holds [scored, LogitBlocks(vocab)] and the
  // targets' fp32 logits target_logit.
  DevBuf logits, logit_stats, target_logit;
  bool logits_kept = false;
  bool valid = false;
};

// How the model runs its dense GEMMs: cublasGemmEx on `handle` (bound to
// the model's stream), or the algorithm measured fastest per shape
// (model/tuned_gemm.h) when `tuned` is set.
struct GemmRunner {
  cublasHandle_t handle = nullptr;
  TunedGemm* tuned = nullptr;
};

Status RunTuned(TunedGemm& tuned, const GemmCall& call, const char* what) {
  const Status s = tuned.Run(call);
  if (s.ok()) return s;
  return Status(s.code(), std::string("GpuTransformer: GEMM ") + what + ": " + s.message());
}

// Row-major C[M,N] = alpha op(A) op(B) + beta C with bf16 A, B and fp32
// accumulation; C bf16 or fp32. cuBLAS is column-major: C^T = op(B)^T op(A)^T.
Status Gemm(const GemmRunner& g, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda,
            const bf16* B, int64_t ldb, void* C, bool c_f32, int64_t ldc, float beta, const char* what) {
  if (M == 0 || N == 0) return Status::OK();
  if (g.tuned) return RunTuned(*g.tuned, GemmCall{ta, tb, M, N, K, A, lda, B, ldb, beta, C, C, c_f32, ldc}, what);
  const float alpha = 1.f;
  return Cublas(cublasGemmEx(g.handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, int(N),
                             int(M), int(K), &alpha, B, CUDA_R_16BF, int(ldb), A, CUDA_R_16BF, int(lda), &beta, C,
                             c_f32 ? CUDA_R_32F : CUDA_R_16BF, int(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                what);
}

// Row-major D[M,N] = A B^T + C (bf16), C and D apart: the residual updates.
// Needs the tuned runner (cublasGemmEx has one C).
Status ResidualGemm(const GemmRunner& g, int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda,
                    const bf16* B, int64_t ldb, const bf16* C, bf16* D, int64_t ldc, const char* what) {
  return RunTuned(*g.tuned, GemmCall{false, true, M, N, K, A, lda, B, ldb, 1.f, C, D, false, ldc}, what);
}

// Score's per-request index loops on up to 8 host threads: over a 32k-row
// batch (~3M route ids each way) they take ~10 ms on one core; fewer than 4
// requests run inline (not worth the threads' start).
template <typename F>
void ForEachRequest(int n, F&& fn) {
  grove::ParallelFor(n, n < 4 ? 1 : 8, [&](int64_t i) { fn(int(i)); });
}

// dst[0, n) = src[0, n), returning the largest value copied (init if
// none): one pass that both stages and range-checks. Sixteen independent
// maxima, so that GCC's -O2 cost model vectorizes the loop (one running
// maximum it leaves scalar: 4.6x slower over replayed ids).
template <typename T>
T CopyAndMax(const T* __restrict src, int64_t n, T* __restrict dst, T init) {
  constexpr int64_t kLanes = 16;
  T lane[kLanes];
  std::fill_n(lane, kLanes, init);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const T v = src[i + k];
      dst[i + k] = v;
      lane[k] = v > lane[k] ? v : lane[k];
    }
  T hi = *std::max_element(lane, lane + kLanes);
  for (; i < n; ++i) {
    dst[i] = src[i];
    hi = std::max(hi, src[i]);
  }
  return hi;
}

// grove's grouped GEMM as a dense one: a single expert over all `rows` rows
// (offsets: {0, rows} on the device), bf16 out, K-major W; the caller adds
// the epilogue.
kernels::GroupedGemmArgs OneExpertGemm(const __nv_bfloat16* a, const __nv_bfloat16* w, __nv_bfloat16* c,
                                       const int32_t* offsets, int64_t rows, int64_t n, int64_t k) {
  kernels::GroupedGemmArgs g;
  g.a = a;
  g.w = w;
  g.c = c;
  g.expert_offsets = offsets;
  g.total_rows = int(rows);
  g.num_experts = 1;
  g.n = int(n);
  g.k = int(k);
  g.out_type = kernels::GemmOutType::kBF16;
  return g;
}

// Scored rows per LM-head chunk: a chunk's logits are at most 2^27 values
// (512 MiB of fp32, half that of the fused head's bf16 u), so the [scored,
// vocab] block (3.8 GB of fp32 at 28k rows x 32k vocab) need not be whole in
// memory: unless the forward keeps it (Impl::keep_logits), the backward
// recomputes each chunk's (one more lm_head GEMM, ~1% of a step's FLOPs).
int64_t LmHeadChunk(int64_t vocab) { return std::max<int64_t>(1, (int64_t(1) << 27) / vocab); }

}  // namespace

struct GpuTransformer::Impl {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  // The dense GEMMs, each shape with the algorithm measured fastest
  // (model/tuned_gemm.h); the forward's residual updates (wo; the shared
  // or dense w2) read the stream and write the next one in one GEMM
  // instead of a copy and an accumulating cublasGemmEx. Null with
  // GROVE_GEMM=cublas: cublasGemmEx and the copies, kept for comparing.
  std::unique_ptr<TunedGemm> tuned_gemm;
  DevBuf params, grads, mirror;
  Tape kept, scratch;
  const Tape* last = nullptr;  // the last Score's tape (its final hidden rows)
  // The MoE forward's expert h [Pn, F] and y [Pn, H] (bf16), not kept for
  // the backward, which recomputes h from eab and needs no y (the router
  // gate stays out of the GEMMs: kernels::SwiGluBackwardGated); the
  // backward reuses expert_h for gate * h, the x of w2's weight gradient.
  DevBuf expert_h, expert_y;
  // Backward workspace.
  DevBuf dres, dres_b, dmain, dqkv, dout_b, dwork, attn_ws, norm_ws, dz, dhs, dlogits,
      dgate, deab, deh, dey, dxe, xe, g, dgate_partial, router_logits, logits, index_ws, embed_ws, router_ws, dlogits_f;
  std::vector<float> h_prob_mean;
  std::vector<int32_t> h_bal_count;
  // Score's index arrays on their way to the device, written straight into
  // page-locked memory so that the uploads are true asynchronous copies
  // (from pageable memory the driver stages them at a fraction of the bus
  // speed, on the step's critical path). `staged` is recorded after the
  // uploads; the next Score waits for it before refilling.
  PinnedBuf staging;
  cudaEvent_t staged = nullptr;
  // Score's routes for its result as the requests hold them, [row][moe
  // layer][k]: each layer's router writes a copy of its ids here
  // (RouterArgs::ids_copy), downloaded into page-locked memory, so each
  // request's routes are one copy (the [layer][row][k] ids the backward
  // reads, downloaded to pageable memory and transposed on the host, kept
  // the GPU idle ~2 ms a gpu-ref step).
  DevBuf route_rows;
  PinnedBuf route_host;
  DevBuf balance_ws;  // gpu::BalanceStats' per-split sums
  std::unique_ptr<PhaseTimer> prof;
  // Side streams for the experts' weight gradients, forked from `stream`
  // once their inputs exist and joined back before those are overwritten
  // (the next MoE layer's backward, or the end of Backward): the gradients
  // they write are disjoint from everything else.
  std::vector<cudaStream_t> side;
  std::vector<cublasHandle_t> side_cublas;
  std::vector<cudaEvent_t> side_done;
  cudaEvent_t fork = nullptr;
  // The experts' weight gradients as two GroupedWeightGrad launches per MoE
  // layer (w2; w1 and w3 together) instead of two cuBLAS calls per expert:
  // the default on sm_90, where its TMA kernel beats the cuBLAS loop (gpu-ref
  // step on an H100: expert dW 24.8 -> 22.3 ms; docs/gpu-learner.md); the
  // cuBLAS loop elsewhere (the mma.sync kernel loses to it). GROVE_EXPERT_DW
  // = cublas | grouped | an implementation's name (WeightGradImplName)
  // overrides, for comparisons.
  bool grouped_dw = false;
  kernels::WeightGradImpl dw_impl = kernels::WeightGradImpl::kAuto;
  // The forward's grouped expert GEMMs (K-major, weights in the mirror):
  // kAuto unless GROVE_GROUPED_GEMM names an implementation
  // (GroupedGemmImplName), for comparing them inside the whole step.
  kernels::GroupedGemmImpl fwd_gemm_impl = kernels::GroupedGemmImpl::kAuto;
  // The MoE forward's SwiGLU in the epilogue of the w1|w3 grouped GEMM
  // (GroupedGemmArgs::swiglu_out: h written from the tile, eab not read
  // back; the same bits as GEMM + SwiGluForwardPacked). Only where the GEMM
  // has it: sm_90 with fwd_gemm_impl kAuto or kWgmmaStaged; elsewhere the
  // unfused path runs. On: 0.81 -> 0.64 ms a gpu-ref MoE layer, step 165 ->
  // 162 ms (H100; docs/gpu-learner.md). GROVE_FUSED_SWIGLU_FWD=0 turns it off.
  bool fused_swiglu_fwd = true;
  // The MoE backward's gated SwiGLU in the epilogue of the w2 dX grouped
  // GEMM (GroupedGemmArgs::swiglu_bwd_slot_of_row: no dh in memory, one
  // bf16 rounding fewer than GEMM + SwiGluBackwardGated). sm_90 only. On:
  // 0.75 -> 0.67 ms a gpu-ref layer (H100, 7 storer warps; with 3 it was
  // 0.98). GROVE_FUSED_SWIGLU_BWD=0 turns it off.
  bool fused_swiglu_bwd = true;
  // The MoE block input's gradient from the experts' rows and from the
  // router in one pass over the residual gradient (kernels::MoeInputGrad)
  // instead of the rows' scatter and a cuBLAS GEMM with beta = 1 (H100,
  // gpu-ref: 225 + 135 -> 281 us a layer; docs/gpu-learner.md). Where its
  // shape rules hold (experts a multiple of 8, <= 256; top_k <= 16).
  // GROVE_FUSED_MOE_INPUT_GRAD=0 turns it off.
  bool fused_input_grad = true;
  // The LM head with the log-softmax statistics in the lm_head GEMM's
  // epilogue (GroupedGemmArgs::logit_block_stats; sm_90 only: Create clears
  // it elsewhere): no fp32
  // logits written and read back, the kept ones half the size (bf16 u),
  // the gradient written over them in place. GROVE_FUSED_LM_HEAD=0 turns it
  // off (cuBLAS fp32 logits and kernels::TokenLogProbForward/Backward).
  bool fused_lm_head = true;
  // The dense and shared-expert FFNs' SwiGLU in their GEMMs' epilogues, as
  // the routed experts' (fused_swiglu_fwd / _bwd): the w1|w3 GEMM and the
  // w2 dX GEMM run as grove's grouped GEMM with one expert (sm_90) instead
  // of cuBLAS + SwiGluForwardPacked / SwiGluBackwardPacked, so [a | b] is
  // not read back for h and dh never reaches memory.
  // GROVE_FUSED_DENSE_SWIGLU=0 turns it off.
  bool fused_dense_swiglu = true;
  // The forward's rotary embedding in the QKV GEMM's epilogue
  // (GroupedGemmArgs::rope_table: grove's GEMM, RopeForward's bits on its
  // output) instead of cuBLAS + RopeForward, and the backward's in the
  // attention backward's dq and dk stores (AttentionShape::rope_table,
  // RopeBackward's bits) instead of RopeBackward. sm_90, head_dim 128.
  // GROVE_FUSED_ROPE=0 turns it off. rope_table ([max_seq_len, 64] (cos,
  // sin), RopeCosSinTable) is made at Create when it is on; empty otherwise.
  bool fused_rope = true;
  DevBuf rope_table;
  bool hopper = false;
  // Whether an MoE layer's expert-ordered inputs xe (h2 permuted, [Pn, H]
  // bf16) are kept from the forward for the backward's w1|w3 weight
  // gradient, instead of permuting h2 again there: saves a Pn x H gather and
  // write per layer (0.4 GB written, as much read, per gpu-ref layer at 32k
  // tokens) for Pn H 2 bytes kept per layer (5.6 GiB over gpu-ref's 15 MoE
  // layers). kAuto keeps a layer's xe when free device memory then exceeds
  // it plus what the backward's workspace may still need
  // (BackwardWorkspaceEstimate), else that layer recomputes; the results are
  // the same bits either way. GROVE_KEEP_EXPERT_INPUTS = auto | 1 | 0.
  enum class KeepMode { kAuto, kAlways, kNever };
  KeepMode keep_xe = KeepMode::kAuto;
  // Whether the LM head's logits of the scored rows ([S, V]) are kept from
  // the forward, so that the backward skips their recompute (one lm_head
  // GEMM of 2 S V H FLOPs, ~3 ms of the gpu-ref step) for S V 4 bytes of
  // fp32 logits (3.8 GB at gpu-ref's 28k scored rows and 32k vocabulary),
  // or S V 2 of bf16 u with the fused head (fused_lm_head). kAuto as for
  // xe. Both sides run the same chunked forward GEMMs, so the log-probs are
  // the same bits either way, and so are the gradients up to one chunk of
  // scored rows (LmHeadChunk: 4096 at gpu-ref's vocabulary); beyond it the
  // fused head with kept u runs the lm_head dX and dW GEMMs over all rows
  // at once (no per-chunk read-modify-write of the fp32 dW: 6.3 -> 6.0 ms
  // at gpu-ref), which sums the same products in another order.
  // GROVE_KEEP_LOGITS = auto | 1 | 0.
  KeepMode keep_logits = KeepMode::kAuto;
  // ZeroGrad zeroes at once only the gradients no backward writes whole
  // (`zeroed_now`, [offset, count) runs: the embedding's and the router
  // biases'); every other tensor's gradient the next Backward writes
  // instead of adding to (beta = 0 in the GEMMs, overwrite in the experts'
  // dW), which saves most of the 6.7 GB memset and the read half of the dW
  // read-modify-writes of the reference model. `overwrite_pending` from ZeroGrad until a Backward completes;
  // reading the gradients meanwhile zeroes them first.
  std::vector<std::pair<int64_t, int64_t>> zeroed_now;
  bool overwrite_pending = false;
  // The experts' dW kernels' sums of the squares of what they write
  // (GroupedWeightGradArgs::sum_sq; one region per MoE layer, two launches
  // each), so the optimizer's norm reads only the other gradients
  // (GradSumOfSquares): `squares_unread`, the layout's runs outside the
  // experts' weights (fixed at Create). `squares_valid` while the sums
  // describe the gradients: set by an overwriting Backward with every MoE
  // layer on the grouped kernel; anything else that may change the
  // gradients (an accumulating Backward, ZeroGrad, its deferred memset,
  // device_grads) clears it.
  DevBuf dw_squares;
  int64_t dw_square_slots = 0;
  std::vector<kernels::SquaresRun> squares_unread;
  bool squares_valid = false;
  void ForgetSquares() { squares_valid = false; }

  void Lap(const char* phase, double flops = 0) { prof->Lap(phase, flops); }

  // Device bytes the MoE backward's workspace may still allocate (the bf16
  // dey, dxe, xe [Pn, H], deh [Pn, F], deab [Pn, 2F]; fp32 and bf16 residual
  // gradients [R, H]) less what it already holds, plus 1 GiB for the rest
  // (the LM head's 512 MiB logits chunk, cuBLAS, attention workspaces).
  size_t BackwardWorkspaceEstimate(int64_t Pn, int64_t R, int64_t H, int64_t F) const {
    const size_t want = size_t(Pn) * size_t(3 * H + 3 * F) * 2 + size_t(R) * size_t(H) * 16;
    size_t held = 0;
    for (const DevBuf* b : {&dey, &dxe, &xe, &deh, &deab, &dres, &dres_b, &dmain})
      held += b->bytes();
    return (want > held ? want - held : 0) + (size_t(1) << 30);
  }

  // Whether the dense / shared FFN of hidden Fd runs its SwiGLU in the
  // grouped GEMM's epilogues (fused_dense_swiglu; the shapes the epilogues take).
  bool DenseSwiGluFused(int64_t Fd, int64_t H) const {
    return fused_dense_swiglu && hopper && Fd % 8 == 0 && H % 8 == 0;
  }
  // The fused LM head's GEMM on one chunk of scored rows (n of them; the
  // chunk's {0, n} offsets on the device): u into `u` [n, V] bf16, block
  // statistics into `stats`, the targets' logits when `targets` is set.
  Status FusedLmHead(const __nv_bfloat16* hs, const __nv_bfloat16* w, const int32_t* offsets, int n, int V, int H,
                     __nv_bfloat16* u, float2* stats, const int32_t* targets, float* target_logit) const {
    kernels::GroupedGemmArgs ga = OneExpertGemm(hs, w, u, offsets, n, V, H);
    ga.logit_block_stats = stats;
    ga.logit_targets = targets;
    ga.logit_target = target_logit;
    return kernels::GroupedGemm(ga, kernels::GroupedGemmImpl::kAuto, stream);
  }
  // Whether a forward keeps `need` bytes for its backward in `buf` (which
  // may hold some from an earlier forward) under `mode`: kAuto when free
  // device memory exceeds what is still to allocate plus `reserve`.
  static bool Keeps(KeepMode mode, const DevBuf& buf, size_t need, size_t reserve) {
    if (mode != KeepMode::kAuto) return mode == KeepMode::kAlways;
    if (buf.bytes() >= need) return true;  // held since an earlier forward
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return free_bytes > need - buf.bytes() + reserve;
  }
  // Whether this forward keeps layer `lt`'s expert inputs (keep_xe).
  bool KeepExpertInputs(const LayerTape& lt, int64_t Pn, int64_t R, int64_t H, int64_t F) const {
    return Keeps(keep_xe, lt.xe, size_t(Pn) * size_t(H) * 2, BackwardWorkspaceEstimate(Pn, R, H, F));
  }

  ~Impl() {
    for (cublasHandle_t h : side_cublas) cublasDestroy(h);
    for (cudaStream_t s : side) cudaStreamDestroy(s);
    for (cudaEvent_t e : side_done) cudaEventDestroy(e);
    if (fork) cudaEventDestroy(fork);
    if (staged) cudaEventDestroy(staged);
    prof.reset();
    if (cublas) cublasDestroy(cublas);
    if (stream) cudaStreamDestroy(stream);
  }
};

int GpuTransformer::DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

GpuTransformer::GpuTransformer(const ModelConfig& config, int device, bool trainable)
    : config_(config), layout_(config), device_(device), trainable_(trainable), impl_(std::make_unique<Impl>()) {}

GpuTransformer::~GpuTransformer() {
  if (impl_) cudaSetDevice(device_);
}

Result<std::unique_ptr<GpuTransformer>> GpuTransformer::Create(const ModelConfig& c, int device, bool trainable) {
  GROVE_RETURN_IF_ERROR(c.Validate());
  if (c.head_dim != 32 && c.head_dim != 64 && c.head_dim != 128)
    return Status::InvalidArgument("GpuTransformer: head_dim " + std::to_string(c.head_dim) +
                                   " unsupported (the attention kernel takes 32, 64 or 128)");
  if (c.hidden % 8 != 0 || c.hidden > kernels::kRmsNormMaxHidden)
    return Status::InvalidArgument("GpuTransformer: hidden must be a multiple of 8, at most " +
                                   std::to_string(kernels::kRmsNormMaxHidden));
  if (c.experts > 0 && (c.experts > kernels::kRouterMaxExperts || c.top_k > kernels::kRouterMaxTopK ||
                        c.expert_hidden % 8 != 0))
    return Status::InvalidArgument("GpuTransformer: needs experts <= 256, top_k <= 16, expert_hidden % 8 == 0");
  if (c.dense_hidden % 8 != 0) return Status::InvalidArgument("GpuTransformer: dense_hidden must be a multiple of 8");
  if (c.vocab_size % 8 != 0)
    return Status::InvalidArgument("GpuTransformer: vocab_size " + std::to_string(c.vocab_size) +
                                   " must be a multiple of 8 (16-byte logit rows for the log-prob head)");
  std::unique_ptr<GpuTransformer> m(new GpuTransformer(c, device, trainable));
  for (const TensorInfo& t : m->layout_.tensors())
    if (t.offset % 8 != 0)
      return Status::InvalidArgument("GpuTransformer: tensor " + t.name + " starts at element " +
                                     std::to_string(t.offset) +
                                     ", not a multiple of 8 (16-byte rows); make experts a multiple of 8");
  // Every SwiGLU's w3 right after its w1 (one [2F, H] matrix for the
  // forward GEMM, the dX GEMM and the weight gradient), wk right after wq and
  // wv after wk (one [qd + 2 kd, H] matrix, likewise), and each expert's
  // three tensors at one stride: ParamLayout's order, relied on here.
  auto follows = [&](const std::string& first, const std::string& next) -> Status {
    const TensorInfo* a = m->layout_.Find(first);
    const TensorInfo* b = m->layout_.Find(next);
    if ((a == nullptr) != (b == nullptr) || (a && b->offset != a->offset + a->numel))
      return Status::Internal("GpuTransformer: " + next + " does not follow " + first + " in the parameter layout");
    return Status::OK();
  };
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    GROVE_RETURN_IF_ERROR(follows(p + "attn.wq", p + "attn.wk"));
    GROVE_RETURN_IF_ERROR(follows(p + "attn.wk", p + "attn.wv"));
    std::vector<std::string> pairs = {c.is_moe_layer(l) ? "moe.shared." : "mlp."};
    for (int64_t e = 0; c.is_moe_layer(l) && e < c.experts; ++e) pairs.push_back("moe.experts." + std::to_string(e) + ".");
    for (const std::string& q : pairs) GROVE_RETURN_IF_ERROR(follows(p + q + "w1", p + q + "w3"));
  }
  const int count = DeviceCount();
  if (device < 0 || device >= count)
    return Status::FailedPrecondition("GpuTransformer: device " + std::to_string(device) + " not present (" +
                                      std::to_string(count) + " CUDA devices)");
  GPU_OK(cudaSetDevice(device));
  Impl& im = *m->impl_;
  GPU_OK(cudaStreamCreateWithFlags(&im.stream, cudaStreamNonBlocking));
  GROVE_RETURN_IF_ERROR(Cublas(cublasCreate(&im.cublas), "create"));
  GROVE_RETURN_IF_ERROR(Cublas(cublasSetStream(im.cublas, im.stream), "set stream"));
  {
    const char* env = std::getenv("GROVE_GEMM");
    const std::string v = env ? env : "tuned";
    if (v != "tuned" && v != "cublas")
      return Status::InvalidArgument("GROVE_GEMM must be tuned or cublas, got '" + v + "'");
    if (v == "tuned") {
      GROVE_ASSIGN_OR_RETURN(im.tuned_gemm, TunedGemm::Create(im.cublas, im.stream));
    }
  }
  im.prof = std::make_unique<PhaseTimer>(im.stream);
  if (const char* env = std::getenv("GROVE_GPU_PROFILE"); env && std::string(env) == "1") im.prof->SetEnabled(true);
  {
    int major = 0, minor = 0;
    GPU_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    GPU_OK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    im.hopper = major == 9 && minor == 0;
    im.grouped_dw = im.hopper;
  }
  if (const char* env = std::getenv("GROVE_EXPERT_DW")) {
    const std::string v = env;
    using kernels::WeightGradImpl;
    std::string names = "cublas, grouped";
    const std::optional<WeightGradImpl> impl =
        ImplNamed(v,
                  {WeightGradImpl::kMmaSync, WeightGradImpl::kWgmma, WeightGradImpl::kWgmmaN256,
                   WeightGradImpl::kTma, WeightGradImpl::kTmaN128,
                   WeightGradImpl::kTmaPersistentRed, WeightGradImpl::kTmaPersistentN256},
                  kernels::WeightGradImplName, &names);
    if (!impl && v != "cublas" && v != "grouped")
      return Status::InvalidArgument("GROVE_EXPERT_DW must be one of " + names + ", got '" + v + "'");
    im.grouped_dw = v != "cublas";
    if (impl) im.dw_impl = *impl;
  }
  for (auto [var, flag] : {std::pair{"GROVE_FUSED_SWIGLU_FWD", &im.fused_swiglu_fwd},
                           std::pair{"GROVE_FUSED_SWIGLU_BWD", &im.fused_swiglu_bwd},
                           std::pair{"GROVE_FUSED_MOE_INPUT_GRAD", &im.fused_input_grad},
                           std::pair{"GROVE_FUSED_LM_HEAD", &im.fused_lm_head},
                           std::pair{"GROVE_FUSED_DENSE_SWIGLU", &im.fused_dense_swiglu},
                           std::pair{"GROVE_FUSED_ROPE", &im.fused_rope}}) {
    const char* env = std::getenv(var);
    if (env == nullptr) continue;
    const std::string v = env;
    if (v != "0" && v != "1") return Status::InvalidArgument(std::string(var) + " must be 0 or 1, got '" + v + "'");
    *flag = v == "1";
  }
  // auto | 1 | 0 (unset: as initialized).
  auto keep_mode = [](const char* var, Impl::KeepMode* mode) -> Status {
    const char* env = std::getenv(var);
    if (env == nullptr) return Status::OK();
    const std::string v = env;
    if (v == "auto") *mode = Impl::KeepMode::kAuto;
    else if (v == "1") *mode = Impl::KeepMode::kAlways;
    else if (v == "0") *mode = Impl::KeepMode::kNever;
    else return Status::InvalidArgument(std::string(var) + " must be auto, 1 or 0, got '" + v + "'");
    return Status::OK();
  };
  GROVE_RETURN_IF_ERROR(keep_mode("GROVE_KEEP_EXPERT_INPUTS", &im.keep_xe));
  GROVE_RETURN_IF_ERROR(keep_mode("GROVE_KEEP_LOGITS", &im.keep_logits));
  im.fused_lm_head = im.fused_lm_head && im.hopper;
  if (im.fused_rope && im.hopper && c.head_dim == 128 && c.hidden % 8 == 0) {
    float2* table = nullptr;
    GROVE_RETURN_IF_ERROR(im.rope_table.Reserve(c.max_seq_len * (c.head_dim / 2), &table));
    GROVE_RETURN_IF_ERROR(
        kernels::RopeCosSinTable(table, int(c.max_seq_len), int(c.head_dim), c.rope_base, im.stream));
  }
  if (const char* env = std::getenv("GROVE_GROUPED_GEMM")) {
    const std::string v = env;
    using kernels::GroupedGemmImpl;
    std::string names;
    const std::optional<GroupedGemmImpl> impl =
        ImplNamed(v,
                  {GroupedGemmImpl::kAuto, GroupedGemmImpl::kWgmmaBn128, GroupedGemmImpl::kWgmmaBn256,
                   GroupedGemmImpl::kWgmmaBn256Bk32, GroupedGemmImpl::kWgmmaPingpong, GroupedGemmImpl::kWgmmaCluster,
                   GroupedGemmImpl::kWgmmaStaged, GroupedGemmImpl::kMmaSync, GroupedGemmImpl::kWmma},
                  kernels::GroupedGemmImplName, &names);
    if (!impl) return Status::InvalidArgument("GROVE_GROUPED_GEMM must be one of " + names + ", got '" + v + "'");
    im.fwd_gemm_impl = *impl;
  }
  if (trainable && c.experts > 0) {
    // GROVE_EXPERT_DW_STREAMS=N > 0 runs the experts' dW GEMMs on N side
    // streams, joined back only before their inputs are next overwritten, so
    // they overlap the main stream's router, attention and shared-expert
    // backward of the layers below. Default 0 (in order on the main stream):
    // on the H100 neither 1 overlapped stream (backward 133-134 ms either
    // way: the overlapped kernels slow each other) nor 4 forked-and-joined
    // ones (dW 34.9 vs 31.8 ms) was faster.
    int ns = 0;
    if (const char* env = std::getenv("GROVE_EXPERT_DW_STREAMS")) ns = std::clamp(std::atoi(env), 0, 16);
    if (ns > 0) {
      im.side.resize(ns, nullptr);
      im.side_cublas.resize(ns, nullptr);
      im.side_done.resize(ns, nullptr);
      GPU_OK(cudaEventCreateWithFlags(&im.fork, cudaEventDisableTiming));
      for (int i = 0; i < ns; ++i) {
        GPU_OK(cudaStreamCreateWithFlags(&im.side[i], cudaStreamNonBlocking));
        GPU_OK(cudaEventCreateWithFlags(&im.side_done[i], cudaEventDisableTiming));
        GROVE_RETURN_IF_ERROR(Cublas(cublasCreate(&im.side_cublas[i]), "create"));
        GROVE_RETURN_IF_ERROR(Cublas(cublasSetStream(im.side_cublas[i], im.side[i]), "set stream"));
      }
    }
  }
  const int64_t N = m->layout_.total();
  float* p = nullptr;
  GROVE_RETURN_IF_ERROR(im.params.Reserve(N, &p));
  GPU_OK(cudaMemset(p, 0, N * sizeof(float)));
  bf16* mb = nullptr;
  GROVE_RETURN_IF_ERROR(im.mirror.Reserve(N, &mb));
  if (trainable) {
    float* g = nullptr;
    GROVE_RETURN_IF_ERROR(im.grads.Reserve(N, &g));
    GPU_OK(cudaMemset(g, 0, N * sizeof(float)));
    // Two grouped dW launches per MoE layer: w2 [H, F] and w1|w3 [2F, H].
    const ModelConfig& c = m->config_;
    kernels::GroupedWeightGradArgs w2, w13;
    w2.num_experts = w13.num_experts = int(c.experts);
    w2.n = int(c.hidden), w2.k = int(c.expert_hidden);
    w13.n = int(2 * c.expert_hidden), w13.k = int(c.hidden);
    im.dw_square_slots = c.moe_layers() * (kernels::GroupedWeightGradSquareSlots(w2) +
                                           kernels::GroupedWeightGradSquareSlots(w13));
    GROVE_RETURN_IF_ERROR(im.dw_squares.Reserve(size_t(std::max<int64_t>(im.dw_square_slots, 1)) * sizeof(double)));
    // What those kernels' sums leave to read: everything outside the
    // experts' weight tensors (what the grouped dW writes).
    std::vector<std::pair<int64_t, int64_t>> experts;  // [begin, end) of the layout
    for (const TensorInfo& t : m->layout_.tensors())
      if (t.name.find("moe.experts.") != std::string::npos) experts.emplace_back(t.offset, t.offset + t.numel);
    std::sort(experts.begin(), experts.end());
    int64_t at = 0;
    for (const auto& [begin, end] : experts) {
      if (begin > at) im.squares_unread.push_back({g + at, begin - at});
      at = std::max(at, end);
    }
    if (at < N) im.squares_unread.push_back({g + at, N - at});
    for (const TensorInfo& t : m->layout_.tensors()) {
      if (BackwardWritesAll(t.name)) continue;
      if (!im.zeroed_now.empty() && im.zeroed_now.back().first + im.zeroed_now.back().second == t.offset)
        im.zeroed_now.back().second += t.numel;
      else
        im.zeroed_now.emplace_back(t.offset, t.numel);
    }
  }
  GROVE_RETURN_IF_ERROR(m->RefreshMirror());
  GROVE_RETURN_IF_ERROR(m->Synchronize());
  return m;
}

float* GpuTransformer::device_params() { return impl_->params.as<float>(); }
float* GpuTransformer::device_grads() {
  // Zeroes what a pending overwrite would have replaced; failures surface
  // at the caller's next synchronizing call on the stream.
  if (impl_->overwrite_pending) (void)MaterializeZeroGrad();
  impl_->ForgetSquares();  // the caller may write through the pointer
  return impl_->grads.as<float>();
}

Status GpuTransformer::MaterializeZeroGrad() const {
  if (!impl_->overwrite_pending) return Status::OK();
  GPU_OK(cudaSetDevice(device_));
  GPU_OK(cudaMemsetAsync(impl_->grads.as<float>(), 0, layout_.total() * sizeof(float), impl_->stream));
  impl_->overwrite_pending = false;
  impl_->ForgetSquares();
  return Status::OK();
}

Result<int64_t> GpuTransformer::GradSumOfSquares(double* result, void* workspace, size_t workspace_bytes) {
  if (!trainable_) return Status::FailedPrecondition("GradSumOfSquares on a GpuTransformer created without gradients");
  GPU_OK(cudaSetDevice(device_));
  Impl& im = *impl_;
  GROVE_RETURN_IF_ERROR(MaterializeZeroGrad());
  const float* g = im.grads.as<float>();
  if (im.squares_valid && im.squares_unread.size() <= size_t(kernels::kSumOfSquaresMaxRuns)) {
    int64_t read = 0;
    for (const kernels::SquaresRun& r : im.squares_unread) read += r.count;
    GROVE_RETURN_IF_ERROR(kernels::SumOfSquaresOfRuns(im.squares_unread.data(), int(im.squares_unread.size()),
                                                      im.dw_squares.as<double>(),
                                                      im.dw_square_slots, result, workspace, workspace_bytes,
                                                      im.stream));
    return read;
  }
  GROVE_RETURN_IF_ERROR(kernels::SumOfSquares(g, layout_.total(), result, workspace, workspace_bytes, im.stream));
  return layout_.total();
}
void* GpuTransformer::device_params_bf16() { return impl_->mirror.as<void>(); }
void* GpuTransformer::stream() const { return impl_->stream; }
PhaseTimer& GpuTransformer::profiler() { return *impl_->prof; }

Status GpuTransformer::Synchronize() const {
  GPU_OK(cudaSetDevice(device_));
  return Cuda(cudaStreamSynchronize(impl_->stream), "synchronize");
}

Status GpuTransformer::RefreshMirror() {
  GPU_OK(cudaSetDevice(device_));
  Impl& im = *impl_;
  gpu::CastToBf16(im.params.as<float>(), im.mirror.as<bf16>(), layout_.total(), im.stream);
  im.Lap("bf16 mirror from master");
  GPU_LAUNCHED("refresh mirror");
  return Status::OK();
}

Status GpuTransformer::UploadParams(std::span<const float> params) {
  if (int64_t(params.size()) != layout_.total())
    return Status::InvalidArgument("UploadParams: " + std::to_string(params.size()) + " values for " +
                                   std::to_string(layout_.total()) + " parameters");
  GPU_OK(cudaSetDevice(device_));
  GPU_OK(cudaMemcpyAsync(impl_->params.as<float>(), params.data(), params.size() * sizeof(float),
                         cudaMemcpyHostToDevice, impl_->stream));
  GROVE_RETURN_IF_ERROR(RefreshMirror());
  return Synchronize();
}

Status GpuTransformer::LoadParamsFromDevice(const float* params) {
  if (params == nullptr) return Status::InvalidArgument("LoadParamsFromDevice: null params");
  GPU_OK(cudaSetDevice(device_));
  GPU_OK(cudaMemcpyAsync(impl_->params.as<float>(), params, size_t(layout_.total()) * sizeof(float),
                         cudaMemcpyDeviceToDevice, impl_->stream));
  GROVE_RETURN_IF_ERROR(RefreshMirror());
  return Synchronize();
}

Status GpuTransformer::UploadRange(int64_t offset, std::span<const float> values) {
  if (offset < 0 || offset + int64_t(values.size()) > layout_.total())
    return Status::InvalidArgument("UploadRange: [" + std::to_string(offset) + ", " +
                                   std::to_string(offset + int64_t(values.size())) + ") outside the " +
                                   std::to_string(layout_.total()) + " parameters");
  GPU_OK(cudaSetDevice(device_));
  Impl& im = *impl_;
  GPU_OK(cudaMemcpyAsync(im.params.as<float>() + offset, values.data(), values.size() * sizeof(float),
                         cudaMemcpyHostToDevice, im.stream));
  gpu::CastToBf16(im.params.as<float>() + offset, im.mirror.as<bf16>() + offset, int64_t(values.size()), im.stream);
  GPU_LAUNCHED("upload range");
  return Synchronize();
}

Status GpuTransformer::DownloadParams(std::span<float> params) const {
  if (int64_t(params.size()) != layout_.total())
    return Status::InvalidArgument("DownloadParams: room for " + std::to_string(params.size()) + " of " +
                                   std::to_string(layout_.total()) + " parameters");
  GPU_OK(cudaSetDevice(device_));
  GPU_OK(cudaMemcpyAsync(params.data(), impl_->params.as<float>(), params.size() * sizeof(float),
                         cudaMemcpyDeviceToHost, impl_->stream));
  return Synchronize();
}

Status GpuTransformer::ZeroGrad() {
  if (!trainable_) return Status::FailedPrecondition("ZeroGrad on a GpuTransformer created without gradients");
  GPU_OK(cudaSetDevice(device_));
  impl_->prof->Start();
  float* g = impl_->grads.as<float>();
  for (const auto& [offset, count] : impl_->zeroed_now)
    GPU_OK(cudaMemsetAsync(g + offset, 0, count * sizeof(float), impl_->stream));
  impl_->overwrite_pending = true;
  impl_->ForgetSquares();
  impl_->Lap("zero grads");
  return Status::OK();
}

Status GpuTransformer::ReleaseActivations() {
  GPU_OK(cudaSetDevice(device_));
  Impl& im = *impl_;
  // Work still queued may read these buffers (a failed Backward returns
  // with its kernels in flight, and the experts' dW on the side streams
  // writes the gradients): let it finish before anything is freed, and so
  // that a ZeroGrad after this call is ordered after those writes.
  GPU_OK(cudaStreamSynchronize(im.stream));
  for (cudaStream_t s : im.side) GPU_OK(cudaStreamSynchronize(s));
  // Everything a forward or backward sizes to its batch. Not params, grads
  // or mirror: they are the model (and the gradients an optimizer
  // step reads), sized to it at Create.
  im.kept = Tape{};
  im.scratch = Tape{};
  im.last = nullptr;
  for (DevBuf* b : {&im.dres, &im.dres_b, &im.dmain, &im.dqkv, &im.dout_b, &im.dwork,
                    &im.attn_ws, &im.norm_ws, &im.dz, &im.dhs, &im.dlogits, &im.dgate, &im.deab,
                    &im.deh, &im.dey, &im.dxe, &im.xe, &im.g, &im.dgate_partial, &im.router_logits, &im.logits,
                    &im.index_ws, &im.embed_ws, &im.router_ws, &im.dlogits_f, &im.route_rows,
                    &im.balance_ws})
    b->Release();
  im.h_prob_mean = {};
  im.h_bal_count = {};
  return Status::OK();
}

Status GpuTransformer::DownloadGrads(std::span<float> grads) const {
  if (!trainable_) return Status::FailedPrecondition("DownloadGrads on a GpuTransformer created without gradients");
  if (int64_t(grads.size()) != layout_.total())
    return Status::InvalidArgument("DownloadGrads: room for " + std::to_string(grads.size()) + " of " +
                                   std::to_string(layout_.total()) + " gradients");
  GROVE_RETURN_IF_ERROR(MaterializeZeroGrad());
  GPU_OK(cudaSetDevice(device_));
  GPU_OK(cudaMemcpyAsync(grads.data(), impl_->grads.as<float>(), grads.size() * sizeof(float),
                         cudaMemcpyDeviceToHost, impl_->stream));
  return Synchronize();
}

namespace {

template <typename T>
Status Upload(DevBuf& buf, const T* host, int64_t count, cudaStream_t stream) {
  T* d = nullptr;
  GROVE_RETURN_IF_ERROR(buf.Reserve(count, &d));
  if (count == 0) return Status::OK();
  return Cuda(cudaMemcpyAsync(d, host, size_t(count) * sizeof(T), cudaMemcpyHostToDevice, stream), "upload");
}

}  // namespace

Result<ScoreResult<float>> GpuTransformer::Score(const std::vector<ScoreRequest>& batch, bool keep,
                                                 bool return_routes) {
  const ModelConfig& c = config_;
  // The lengths here, the values as the staging copy below reads them (the
  // GPU idles while the host checks and stages: one pass, not two).
  GROVE_RETURN_IF_ERROR(ValidateScoreShapes(c, batch));
  GPU_OK(cudaSetDevice(device_));
  Impl& im = *impl_;
  im.prof->Start();
  cudaStream_t st = im.stream;
  const GemmRunner cb{im.cublas, im.tuned_gemm.get()};
  const int64_t M = c.moe_layers(), K = c.top_k, E = c.experts, V = c.vocab_size, H = c.hidden,
                hd = c.head_dim, qd = c.heads * hd, kd = c.kv_heads * hd, qkvd = qd + 2 * kd;
  Tape& tp = keep ? im.kept : im.scratch;

  // Host-side index arrays of the packed batch (row r = input position),
  // sized first, then filled per request in parallel straight into the
  // page-locked staging buffer, then uploaded.
  const bool replay = !batch[0].replay_routes.empty();
  const int B = int(batch.size());
  std::vector<int32_t> seq_len(B), row0(B + 1, 0), sc0(B + 1, 0);
  std::vector<size_t> scored(B);
  int max_len = 0;
  for (int i = 0; i < B; ++i) {
    const ScoreRequest& r = batch[i];
    const int n = int(r.tokens.size()) - 1;
    seq_len[i] = n;
    row0[i + 1] = row0[i] + n;
    scored[i] = size_t(n + 1 - r.score_from);
    sc0[i + 1] = sc0[i] + int(scored[i]);
    max_len = std::max(max_len, n);
  }
  const int R = row0[B], S = sc0[B];
  const size_t replay_count = replay ? size_t(M) * R * K : 0;
  // The LM head runs on chunks of the scored rows (LmHeadChunk).
  const int64_t lm_chunk = std::min<int64_t>(S, LmHeadChunk(V));
  const int64_t lm_chunks = S > 0 ? (S + lm_chunk - 1) / lm_chunk : 0;
  // Layout: tokens, pos [R]; cu [B+1]; sc_row, sc_target [S]; lm_off
  // [lm_chunks][2]; row_off {0, R} (int32); replay ids [R][M][K] (uint16: as the requests
  // hold them, one copy per request; each layer's router reads its slice
  // with stride M K).
  const size_t n32 = 2 * size_t(R) + size_t(B) + 1 + 2 * size_t(S) + 2 * size_t(lm_chunks) + 2;
  if (!im.staged) GPU_OK(cudaEventCreateWithFlags(&im.staged, cudaEventDisableTiming));
  GPU_OK(cudaEventSynchronize(im.staged));  // the last Score's uploads have read the buffer
  GROVE_ASSIGN_OR_RETURN(char* pinned, im.staging.Reserve(n32 * sizeof(int32_t) + replay_count * sizeof(uint16_t)));
  int32_t* const tokens = reinterpret_cast<int32_t*>(pinned);
  int32_t* const pos = tokens + R;
  int32_t* const cu = pos + R;
  int32_t* const sc_row = cu + B + 1;
  int32_t* const sc_target = sc_row + S;
  int32_t* const lm_off = sc_target + S;
  int32_t* const row_off = lm_off + 2 * lm_chunks;
  row_off[0] = 0;
  row_off[1] = R;
  uint16_t* const replay_ids = reinterpret_cast<uint16_t*>(row_off + 2);
  std::copy(row0.begin(), row0.end(), cu);
  for (int64_t i = 0; i < lm_chunks; ++i) {
    lm_off[2 * i] = 0;
    lm_off[2 * i + 1] = int32_t(std::min<int64_t>(lm_chunk, S - i * lm_chunk));
  }
  std::vector<uint8_t> values_ok(B);
  ForEachRequest(B, [&](int i) {
    const ScoreRequest& r = batch[i];
    const int n = seq_len[i], r0 = row0[i];
    // Token ids are checked through min and max: a negative id is a huge
    // unsigned one.
    const uint32_t top_token =
        std::max(CopyAndMax(reinterpret_cast<const uint32_t*>(r.tokens.data()), n,
                            reinterpret_cast<uint32_t*>(tokens + r0), 0u),
                 uint32_t(r.tokens[n]));
    for (int t = 0; t < n; ++t) pos[r0 + t] = t;
    for (int64_t t = r.score_from, j = sc0[i]; t < n + 1; ++t, ++j) {
      sc_row[j] = r0 + int32_t(t) - 1;
      sc_target[j] = r.tokens[t];
    }
    const uint16_t top_expert =
        replay ? CopyAndMax(r.replay_routes.data(), int64_t(n) * M * K, replay_ids + size_t(r0) * M * K, uint16_t{0})
               : uint16_t{0};
    values_ok[i] = top_token < uint32_t(V) && (!replay || top_expert < E);
  });
  if (std::find(values_ok.begin(), values_ok.end(), 0) != values_ok.end()) {
    // Nothing was launched; the full check names the request and element.
    Status bad = ValidateScoreRequests(c, batch);
    return bad.ok() ? Status::Internal("Score: a value check failed that ValidateScoreRequests passes") : bad;
  }
  // The batch is good: from here this Score replaces the tape's last one.
  tp.valid = false;
  im.last = &tp;
  tp.sizes = std::move(scored);
  tp.rows = R;
  tp.seqs = B;
  tp.scored = S;
  tp.max_seqlen = max_len;
  GROVE_RETURN_IF_ERROR(Upload(tp.tokens, tokens, R, st));
  GROVE_RETURN_IF_ERROR(Upload(tp.pos, pos, R, st));
  GROVE_RETURN_IF_ERROR(Upload(tp.cu_seqlens, cu, B + 1, st));
  GROVE_RETURN_IF_ERROR(Upload(tp.sc_row, sc_row, S, st));
  GROVE_RETURN_IF_ERROR(Upload(tp.sc_target, sc_target, S, st));
  GROVE_RETURN_IF_ERROR(Upload(tp.lm_offsets, lm_off, 2 * lm_chunks, st));
  GROVE_RETURN_IF_ERROR(Upload(tp.row_offsets, row_off, 2, st));
  if (replay) GROVE_RETURN_IF_ERROR(Upload(tp.replay, replay_ids, int64_t(replay_count), st));
  GPU_OK(cudaEventRecord(im.staged, st));
  im.Lap("fwd: host index prep + upload");
  // FLOPs for the timer's TFLOP/s: 2 m n k per product; causal attention
  // 2 (QK^T and PV) x 2 x len^2 / 2 x head_dim per head forward, 2.5x that
  // backward (five products).
  tp.len_sq = 0;
  for (int n : seq_len) tp.len_sq += double(n) * n;
  const double attn_fwd_flops = 2.0 * tp.len_sq * double(hd) * double(c.heads);

  const float* P = im.params.as<float>();
  const bf16* W = im.mirror.as<bf16>();
  auto name = [](int64_t l, const char* s) { return "layers." + std::to_string(l) + "." + s; };
  auto Wb = [&](const std::string& n) { return W + layout_.Offset(n); };
  auto Pf = [&](const std::string& n) { return P + layout_.Offset(n); };

  const int n_resid = keep ? int(c.layers) + 1 : 2;
  if (int(tp.resid.size()) < n_resid) tp.resid.resize(n_resid);
  const int n_lt = keep ? int(c.layers) : 1;
  if (int(tp.layers.size()) < n_lt) tp.layers.resize(n_lt);
  auto resid = [&](int64_t i) -> DevBuf& { return tp.resid[keep ? i : i % 2]; };
  for (int i = 0; i < n_resid; ++i) GROVE_RETURN_IF_ERROR(tp.resid[i].Reserve(size_t(R) * H * sizeof(bf16)));

  uint16_t* ids_all = nullptr;
  int32_t *counts_all = nullptr, *offsets_all = nullptr, *bal_count = nullptr;
  float* prob_mean = nullptr;
  GROVE_RETURN_IF_ERROR(tp.ids.Reserve(M * R * K, &ids_all));
  GROVE_RETURN_IF_ERROR(im.route_rows.Reserve(size_t(std::max<int64_t>(M * R * K, 1)) * sizeof(uint16_t)));
  GROVE_RETURN_IF_ERROR(tp.counts.Reserve(M * E, &counts_all));
  GROVE_RETURN_IF_ERROR(tp.offsets.Reserve(M * (E + 1), &offsets_all));
  GROVE_RETURN_IF_ERROR(tp.bal_count.Reserve(M * B * E, &bal_count));
  GROVE_RETURN_IF_ERROR(im.balance_ws.Reserve(std::max<size_t>(gpu::BalanceStatsWorkspaceBytes(B, int(E)), 1)));
  void* const balance_ws = im.balance_ws.as<void>();
  GROVE_RETURN_IF_ERROR(tp.prob_mean.Reserve(M * B * E, &prob_mean));

  kernels::AttentionShape ash;
  ash.cu_seqlens = tp.cu_seqlens.as<int32_t>();
  ash.batch = B;
  ash.max_seqlen = max_len;
  ash.total_tokens = R;
  ash.num_heads = int(c.heads);
  ash.num_kv_heads = int(c.kv_heads);
  ash.head_dim = int(hd);
  ash.q_row_stride = ash.kv_row_stride = qkvd;

  GROVE_RETURN_IF_ERROR(
      kernels::EmbeddingForward(tp.tokens.as<int32_t>(), Wb("embed"), resid(0).as<bf16>(), R, int(V), int(H), st));
  im.Lap("embedding");
  const float eps = float(c.norm_eps);
  for (int64_t l = 0; l < c.layers; ++l) {
    LayerTape& lt = tp.layers[keep ? l : 0];
    bf16* xin = resid(l).as<bf16>();
    bf16* xout = resid(l + 1).as<bf16>();
    bf16 *h1, *qkv, *o, *x_mid, *h2;
    float *rstd1, *rstd2, *lse;
    GROVE_RETURN_IF_ERROR(lt.h1.Reserve(R * H, &h1));
    GROVE_RETURN_IF_ERROR(lt.qkv.Reserve(R * qkvd, &qkv));
    GROVE_RETURN_IF_ERROR(lt.o.Reserve(R * qd, &o));
    GROVE_RETURN_IF_ERROR(lt.x_mid.Reserve(R * H, &x_mid));
    GROVE_RETURN_IF_ERROR(lt.h2.Reserve(R * H, &h2));
    GROVE_RETURN_IF_ERROR(lt.rstd1.Reserve(R, &rstd1));
    GROVE_RETURN_IF_ERROR(lt.rstd2.Reserve(R, &rstd2));
    GROVE_RETURN_IF_ERROR(lt.lse.Reserve(int64_t(c.heads) * R, &lse));
    // Attention block.
    GROVE_RETURN_IF_ERROR(kernels::RmsNormForward(xin, Pf(name(l, "attn_norm")), h1, rstd1, R, int(H), eps, st));
    im.Lap("rmsnorm fwd");
    // wq, wk, wv are adjacent in the layout (checked at Create): one GEMM
    // against [Wq; Wk; Wv] gives every row's [q | k | v].
    if (im.rope_table.bytes() > 0) {
      // The rotation in the GEMM's epilogue (fused_rope): q's and k's heads
      // are the first (heads + kv_heads) 128-column heads of a row.
      kernels::GroupedGemmArgs qkv_gemm =
          OneExpertGemm(h1, Wb(name(l, "attn.wq")), qkv, tp.row_offsets.as<int32_t>(), R, qkvd, H);
      qkv_gemm.rope_table = im.rope_table.as<float2>();
      qkv_gemm.rope_positions = tp.pos.as<int32_t>();
      qkv_gemm.rope_columns = int(qd + kd);
      GROVE_RETURN_IF_ERROR(kernels::GroupedGemm(qkv_gemm, kernels::GroupedGemmImpl::kAuto, st));
      im.Lap("dense GEMM + rope fwd", 2.0 * R * H * qkvd);
    } else {
      GROVE_RETURN_IF_ERROR(
          Gemm(cb, false, true, R, qkvd, H, h1, H, Wb(name(l, "attn.wq")), H, qkv, false, qkvd, 0, "wq|wk|wv"));
      im.Lap("dense GEMM fwd", 2.0 * R * H * qkvd);
      // q's and k's heads are adjacent in a row: one rotation over both.
      GROVE_RETURN_IF_ERROR(kernels::RopeForward(qkv, tp.pos.as<int32_t>(), R, int(c.heads + c.kv_heads), int(hd),
                                                 c.rope_base, st, qkvd));
      im.Lap("rope");
    }
    GROVE_RETURN_IF_ERROR(kernels::AttentionForward(ash, qkv, qkv + qd, qkv + qd + kd, o, lse, st));
    im.Lap("attention fwd", attn_fwd_flops);
    if (im.tuned_gemm) {
      GROVE_RETURN_IF_ERROR(ResidualGemm(cb, R, H, qd, o, qd, Wb(name(l, "attn.wo")), qd, xin, x_mid, H, "wo"));
    } else {
      GPU_OK(cudaMemcpyAsync(x_mid, xin, size_t(R) * H * sizeof(bf16), cudaMemcpyDeviceToDevice, st));
      im.Lap("residual copies");
      GROVE_RETURN_IF_ERROR(
          Gemm(cb, false, true, R, H, qd, o, qd, Wb(name(l, "attn.wo")), qd, x_mid, false, H, 1, "wo"));
    }
    im.Lap("dense GEMM fwd", 2.0 * R * H * qd);
    // Feed-forward block.
    GROVE_RETURN_IF_ERROR(kernels::RmsNormForward(x_mid, Pf(name(l, "ffn_norm")), h2, rstd2, R, int(H), eps, st));
    im.Lap("rmsnorm fwd");
    const bool moe = c.is_moe_layer(l);
    const int64_t Fd = moe ? c.shared_experts * c.expert_hidden : c.dense_hidden;
    // xout = x_mid + the shared (or dense) FFN, then the routed experts'
    // combine adds into it. With a residual GEMM and an FFN the copy is
    // folded into the GEMM.
    const bool fold_copy = im.tuned_gemm && Fd > 0;
    if (!fold_copy) {
      GPU_OK(cudaMemcpyAsync(xout, x_mid, size_t(R) * H * sizeof(bf16), cudaMemcpyDeviceToDevice, st));
      im.Lap("residual copies");
    }
    // w1n names [W1; W3] (w3 follows w1, checked at Create).
    const std::string w1n = moe ? "moe.shared.w1" : "mlp.w1", w2n = moe ? "moe.shared.w2" : "mlp.w2";
    if (Fd > 0) {
      // w1 and w3 are adjacent in the layout: one GEMM against [W1; W3].
      bf16 *fab, *fh;
      GROVE_RETURN_IF_ERROR(lt.fab.Reserve(R * 2 * Fd, &fab));
      GROVE_RETURN_IF_ERROR(lt.fh.Reserve(R * Fd, &fh));
      if (im.DenseSwiGluFused(Fd, H)) {
        kernels::GroupedGemmArgs up =
            OneExpertGemm(h2, Wb(name(l, w1n.c_str())), fab, tp.row_offsets.as<int32_t>(), R, 2 * Fd, H);
        up.swiglu_out = fh;
        GROVE_RETURN_IF_ERROR(kernels::GroupedGemm(up, kernels::GroupedGemmImpl::kAuto, st));
        im.Lap("dense GEMM + swiglu fwd", 4.0 * R * Fd * H);
      } else {
        GROVE_RETURN_IF_ERROR(
            Gemm(cb, false, true, R, 2 * Fd, H, h2, H, Wb(name(l, w1n.c_str())), H, fab, false, 2 * Fd, 0, "w1|w3"));
        im.Lap("dense GEMM fwd", 4.0 * R * Fd * H);
        GROVE_RETURN_IF_ERROR(kernels::SwiGluForwardPacked(fab, fh, R, int(Fd), st));
        im.Lap("swiglu fwd");
      }
      if (fold_copy) {
        GROVE_RETURN_IF_ERROR(
            ResidualGemm(cb, R, H, Fd, fh, Fd, Wb(name(l, w2n.c_str())), Fd, x_mid, xout, H, "w2"));
      } else {
        GROVE_RETURN_IF_ERROR(
            Gemm(cb, false, true, R, H, Fd, fh, Fd, Wb(name(l, w2n.c_str())), Fd, xout, false, H, 1, "w2"));
      }
      im.Lap("dense GEMM fwd", 2.0 * R * Fd * H);
    }
    if (!moe) continue;
    const int64_t mi = c.moe_index(l), F = c.expert_hidden, Pn = int64_t(R) * K;
    float *logits, *scores, *gates;
    int32_t *pos_g, *src_g;
    bf16 *xe, *eab, *eh, *ey;
    GROVE_RETURN_IF_ERROR(im.router_logits.Reserve(R * E, &logits));
    GROVE_RETURN_IF_ERROR(lt.scores.Reserve(R * E, &scores));
    GROVE_RETURN_IF_ERROR(lt.gates.Reserve(R * K, &gates));
    GROVE_RETURN_IF_ERROR(lt.pos.Reserve(Pn, &pos_g));
    GROVE_RETURN_IF_ERROR(lt.src.Reserve(Pn, &src_g));
    lt.xe_kept = keep && trainable_ && im.KeepExpertInputs(lt, Pn, R, H, F);  // only a trainable model runs a backward
    GROVE_RETURN_IF_ERROR((lt.xe_kept ? lt.xe : im.xe).Reserve(Pn * H, &xe));
    GROVE_RETURN_IF_ERROR(lt.eab.Reserve(Pn * 2 * F, &eab));
    GROVE_RETURN_IF_ERROR(im.expert_h.Reserve(Pn * F, &eh));
    GROVE_RETURN_IF_ERROR(im.expert_y.Reserve(Pn * H, &ey));
    GROVE_RETURN_IF_ERROR(
        Gemm(cb, false, true, R, E, H, h2, H, Wb(name(l, "moe.router")), H, logits, true, E, 0, "router"));
    kernels::RouterArgs ra;
    ra.logits = logits;
    ra.bias = Pf(name(l, "moe.router_bias"));
    ra.replay_ids = replay ? tp.replay.as<uint16_t>() + mi * K : nullptr;
    ra.replay_stride = int(M * K);
    ra.scores = scores;
    ra.ids = ids_all + mi * R * K;
    ra.ids_copy = im.route_rows.as<uint16_t>() + mi * K;
    ra.ids_copy_stride = int(M * K);
    ra.gates = gates;
    ra.tokens = R;
    ra.experts = int(E);
    ra.top_k = int(K);
    ra.sigmoid = c.score_func == ScoreFunc::kSigmoid;
    ra.norm_topk = c.norm_topk;
    ra.route_scale = float(c.route_scale);
    GROVE_RETURN_IF_ERROR(kernels::RouterTopK(ra, st));
    int32_t* offsets = offsets_all + mi * (E + 1);
    const size_t index_bytes = kernels::MoeRouteIndexWorkspaceBytes(R, int(K), int(E));
    GROVE_RETURN_IF_ERROR(im.index_ws.Reserve(index_bytes));
    GROVE_RETURN_IF_ERROR(kernels::MoeRouteIndex(ra.ids, R, int(K), int(E), im.index_ws.as<void>(), index_bytes,
                                                 offsets, pos_g, src_g, counts_all + mi * E, st));
    im.Lap("router + route index fwd", 2.0 * R * E * H);
    GROVE_RETURN_IF_ERROR(kernels::MoePermute(h2, pos_g, src_g, xe, int(Pn), int(K), int(H), st));
    im.Lap("moe permute/combine fwd");
    // The experts' weights where they lie in the mirror: ParamLayout puts
    // each expert's w1, w3, w2 together (3 F H elements; the backward's dX
    // GEMMs read them in place too), so expert e's w1 (F rows of H) is 3F
    // rows of H after expert e-1's, and its w2 (H rows of F) 3H rows of F.
    const std::string e0 = name(l, "moe.experts.0.");
    const int64_t expert_stride = 3 * F * H;
    kernels::GroupedGemmArgs ga;
    ga.expert_offsets = offsets;
    ga.total_rows = int(Pn);
    ga.num_experts = int(E);
    ga.out_type = kernels::GemmOutType::kBF16;
    // w1 and w3 as one [2F, H] matrix per expert (w3 follows w1): one
    // grouped GEMM writes [a | b] per row.
    ga.a = xe; ga.w = Wb(e0 + "w1"); ga.c = eab; ga.n = int(2 * F); ga.k = int(H);
    ga.w_expert_rows = int(expert_stride / H);
    const bool fuse_swiglu = im.fused_swiglu_fwd && im.hopper && F % 8 == 0 &&
                             (im.fwd_gemm_impl == kernels::GroupedGemmImpl::kAuto ||
                              im.fwd_gemm_impl == kernels::GroupedGemmImpl::kWgmmaStaged);
    kernels::GroupedGemmArgs up = ga;
    if (fuse_swiglu) up.swiglu_out = eh;  // h from the GEMM's epilogue
    GROVE_RETURN_IF_ERROR(kernels::GroupedGemm(up, im.fwd_gemm_impl, st));
    im.Lap(fuse_swiglu ? "grouped GEMM + swiglu fwd" : "grouped GEMM fwd", 4.0 * Pn * F * H);
    if (!fuse_swiglu) {
      GROVE_RETURN_IF_ERROR(kernels::SwiGluForwardPacked(eab, eh, Pn, int(F), st));
      im.Lap("swiglu fwd");
    }
    ga.a = eh; ga.w = Wb(e0 + "w2"); ga.c = ey; ga.n = int(H); ga.k = int(F);
    ga.w_expert_rows = int(expert_stride / F);
    GROVE_RETURN_IF_ERROR(kernels::GroupedGemm(ga, im.fwd_gemm_impl, st));
    im.Lap("grouped GEMM fwd", 2.0 * Pn * F * H);
    GROVE_RETURN_IF_ERROR(kernels::MoeCombine(ey, gates, pos_g, xout, /*accumulate=*/true, R, int(K), int(H), st));
    if (c.balance_alpha > 0)
      gpu::BalanceStats(scores, ra.ids, tp.cu_seqlens.as<int32_t>(), B, int(E), int(K), balance_ws,
                        prob_mean + mi * B * E, bal_count + mi * B * E, st);
    im.Lap("moe permute/combine fwd");
    GPU_LAUNCHED("moe combine");
  }
  // Final norm, LM head on the scored rows, log-probs.
  bf16 *hf, *hs;
  float *rstd_f, *lse, *logp;
  const int64_t chunk = lm_chunk;
  GROVE_RETURN_IF_ERROR(tp.h_final.Reserve(R * H, &hf));
  GROVE_RETURN_IF_ERROR(tp.rstd_final.Reserve(R, &rstd_f));
  GROVE_RETURN_IF_ERROR(tp.hs.Reserve(S * H, &hs));
  const bool fused_head = im.fused_lm_head;
  const size_t logit_bytes = fused_head ? sizeof(bf16) : sizeof(float);
  {
    const int64_t Pn_max = c.moe_layers() > 0 ? int64_t(R) * K : 0;
    tp.logits_kept = keep && trainable_ &&
                     Impl::Keeps(im.keep_logits, tp.logits, size_t(S) * size_t(V) * logit_bytes,
                                 im.BackwardWorkspaceEstimate(Pn_max, R, H, c.expert_hidden));
  }
  // The chunk buffer when not kept: the fused head's u goes where the
  // backward's dz will (the same [chunk, V] bf16).
  DevBuf& logit_buf = tp.logits_kept ? tp.logits : fused_head ? im.dz : im.logits;
  const int64_t logit_count = std::max<int64_t>(tp.logits_kept ? S * V : chunk * V, 1);
  GROVE_RETURN_IF_ERROR(logit_buf.Reserve(size_t(logit_count) * logit_bytes));
  void* const logits = logit_buf.as<void>();
  const int logit_blocks = kernels::LogitBlocks(int(V));
  float2* logit_stats = nullptr;
  float* target_logit = nullptr;
  if (fused_head) {
    GROVE_RETURN_IF_ERROR(tp.logit_stats.Reserve(S * logit_blocks, &logit_stats));
    GROVE_RETURN_IF_ERROR(tp.target_logit.Reserve(S, &target_logit));
  }
  GROVE_RETURN_IF_ERROR(tp.lse.Reserve(S, &lse));
  GROVE_RETURN_IF_ERROR(tp.logp.Reserve(S, &logp));
  GROVE_RETURN_IF_ERROR(
      kernels::RmsNormForward(resid(c.layers).as<bf16>(), Pf("norm"), hf, rstd_f, R, int(H), eps, st));
  gpu::GatherRows(hf, tp.sc_row.as<int32_t>(), hs, S, int(H), st);
  im.Lap("rmsnorm fwd");
  for (int64_t r0 = 0; r0 < S; r0 += chunk) {
    const int64_t n = std::min<int64_t>(chunk, S - r0);
    if (fused_head) {
      bf16* out = static_cast<bf16*>(logits) + (tp.logits_kept ? r0 * V : 0);
      GROVE_RETURN_IF_ERROR(im.FusedLmHead(hs + r0 * H, Wb("lm_head"), tp.lm_offsets.as<int32_t>() + 2 * (r0 / chunk),
                                           int(n), int(V), int(H), out, logit_stats + r0 * logit_blocks,
                                           tp.sc_target.as<int32_t>() + r0, target_logit + r0));
      continue;
    }
    float* out = static_cast<float*>(logits) + (tp.logits_kept ? r0 * V : 0);
    GROVE_RETURN_IF_ERROR(
        Gemm(cb, false, true, n, V, H, hs + r0 * H, H, Wb("lm_head"), H, out, true, V, 0, "lm_head"));
    GROVE_RETURN_IF_ERROR(kernels::TokenLogProbForward(out, tp.sc_target.as<int32_t>() + r0, logp + r0, lse + r0,
                                                       int(n), int(V), st));
  }
  if (fused_head)
    GROVE_RETURN_IF_ERROR(kernels::TokenLogProbFromBlockStats(logit_stats, target_logit, tp.sc_target.as<int32_t>(),
                                                              logp, lse, int(S), int(V), st));
  im.Lap("lm head + log-prob fwd", 2.0 * S * V * H);
  GPU_LAUNCHED("log-probs");

  // Results to the host.
  std::vector<float> h_logp(S);
  const size_t route_count = size_t(M) * R * K;
  GROVE_ASSIGN_OR_RETURN(char* route_pinned,
                         im.route_host.Reserve(std::max<size_t>(route_count, 1) * sizeof(uint16_t)));
  const uint16_t* h_routes = reinterpret_cast<const uint16_t*>(route_pinned);
  tp.h_counts.assign(size_t(M) * E, 0);
  GPU_OK(cudaMemcpyAsync(h_logp.data(), logp, S * sizeof(float), cudaMemcpyDeviceToHost, st));
  if (M > 0) {
    if (return_routes)
      GPU_OK(cudaMemcpyAsync(route_pinned, im.route_rows.as<uint16_t>(), route_count * sizeof(uint16_t),
                             cudaMemcpyDeviceToHost, st));
    GPU_OK(cudaMemcpyAsync(tp.h_counts.data(), counts_all, tp.h_counts.size() * sizeof(int32_t),
                           cudaMemcpyDeviceToHost, st));
  }
  const bool balance = M > 0 && c.balance_alpha > 0;
  if (balance) {
    im.h_prob_mean.resize(size_t(M) * B * E);
    im.h_bal_count.resize(size_t(M) * B * E);
    GPU_OK(cudaMemcpyAsync(im.h_prob_mean.data(), prob_mean, im.h_prob_mean.size() * sizeof(float),
                           cudaMemcpyDeviceToHost, st));
    GPU_OK(cudaMemcpyAsync(im.h_bal_count.data(), bal_count, im.h_bal_count.size() * sizeof(int32_t),
                           cudaMemcpyDeviceToHost, st));
  }
  im.Lap("fwd results to host");
  GROVE_RETURN_IF_ERROR(Synchronize());

  ScoreResult<float> out;
  out.logprobs.resize(B);
  for (int i = 0, at = 0; i < B; at += int(tp.sizes[i]), ++i)
    out.logprobs[i].assign(h_logp.begin() + at, h_logp.begin() + at + tp.sizes[i]);
  if (return_routes) {
    // ~6 MB of ids into fresh vectors for a 32k-row batch: ~1 ms of host
    // time with the GPU idle, which a caller that replays routes (or only
    // wants log-probs) skips.
    out.routes.resize(B);
    ForEachRequest(B, [&](int i) {
      const size_t row_len = size_t(M) * K, first = size_t(cu[i]) * row_len;
      out.routes[i].assign(h_routes + first, h_routes + first + size_t(seq_len[i]) * row_len);
    });
  }
  out.expert_load.assign(M, std::vector<int64_t>(E, 0));
  for (int64_t mi = 0; mi < M; ++mi)
    for (int64_t e = 0; e < E; ++e) out.expert_load[mi][e] = tp.h_counts[mi * E + e];
  if (balance) {
    double loss = 0;
    for (int64_t mi = 0; mi < M; ++mi)
      for (int q = 0; q < B; ++q) {
        const double len = seq_len[q];
        if (len == 0) continue;
        for (int64_t e = 0; e < E; ++e) {
          const size_t i = (mi * B + q) * E + e;
          loss += c.balance_alpha * (double(E) / (double(K) * len) * im.h_bal_count[i]) * im.h_prob_mean[i];
        }
      }
    out.balance_loss = loss;
  }
  tp.valid = keep;
  return out;
}

Status GpuTransformer::Backward(const std::vector<std::vector<float>>& dlogprobs) {
  if (!trainable_) return Status::FailedPrecondition("Backward on a GpuTransformer created without gradients");
  Impl& im = *impl_;
  Tape& tp = im.kept;
  if (!tp.valid) return Status::FailedPrecondition("Backward needs a Score(keep_for_backward=true) before it");
  if (dlogprobs.size() != tp.sizes.size())
    return Status::InvalidArgument("Backward: " + std::to_string(dlogprobs.size()) + " gradient rows for " +
                                   std::to_string(tp.sizes.size()) + " scored requests");
  std::vector<float> g;
  for (size_t i = 0; i < dlogprobs.size(); ++i) {
    if (dlogprobs[i].size() != tp.sizes[i])
      return Status::InvalidArgument("Backward: request " + std::to_string(i) + " has " +
                                     std::to_string(dlogprobs[i].size()) + " gradients for " +
                                     std::to_string(tp.sizes[i]) + " log-probs");
    g.insert(g.end(), dlogprobs[i].begin(), dlogprobs[i].end());
  }
  GPU_OK(cudaSetDevice(device_));
  im.prof->Start();
  float* dg = nullptr;
  GROVE_RETURN_IF_ERROR(im.g.Reserve(int64_t(g.size()), &dg));
  GPU_OK(cudaMemcpyAsync(dg, g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice, im.stream));
  im.Lap("bwd: host prep + upload");
  return BackwardFromDevice(dg);
}

Result<GpuTransformer::DeviceFfnInputs> GpuTransformer::KeptFfn(int64_t layer) const {
  const Tape& tp = impl_->kept;
  if (!tp.valid) return Status::FailedPrecondition("KeptFfn needs a Score(keep_for_backward=true) before it");
  if (layer < 0 || layer >= config_.layers)
    return Status::InvalidArgument("KeptFfn: layer " + std::to_string(layer) + " not in [0, " +
                                   std::to_string(config_.layers) + ")");
  DeviceFfnInputs in;
  in.rows = tp.rows;
  in.x = tp.layers[layer].h2.as<void>();
  if (config_.is_moe_layer(layer)) {
    in.experts = tp.ids.as<uint16_t>() + config_.moe_index(layer) * int64_t(tp.rows) * config_.top_k;
    in.gates = tp.layers[layer].gates.as<float>();
  }
  return in;
}

const void* GpuTransformer::last_scored_hidden() const {
  return impl_->last ? impl_->last->hs.as<void>() : nullptr;
}

int64_t GpuTransformer::last_scored_rows() const { return impl_->last ? impl_->last->scored : 0; }

const float* GpuTransformer::device_logprobs() const { return impl_->kept.valid ? impl_->kept.logp.as<float>() : nullptr; }

int64_t GpuTransformer::scored_tokens() const { return impl_->kept.valid ? impl_->kept.scored : 0; }

Status GpuTransformer::BackwardFromDevice(const float* dg) {
  if (!trainable_) return Status::FailedPrecondition("Backward on a GpuTransformer created without gradients");
  Impl& im = *impl_;
  Tape& tp = im.kept;
  if (!tp.valid) return Status::FailedPrecondition("Backward needs a Score(keep_for_backward=true) before it");
  if (dg == nullptr) return Status::InvalidArgument("BackwardFromDevice: null gradient");
  tp.valid = false;
  GPU_OK(cudaSetDevice(device_));
  const ModelConfig& c = config_;
  cudaStream_t st = im.stream;
  const GemmRunner cb{im.cublas, im.tuned_gemm.get()};
  const int64_t K = c.top_k, E = c.experts, V = c.vocab_size, H = c.hidden,
                hd = c.head_dim, qd = c.heads * hd, kd = c.kv_heads * hd, qkvd = qd + 2 * kd;
  const int R = tp.rows, S = tp.scored, B = tp.seqs;
  const float* P = im.params.as<float>();
  const bf16* W = im.mirror.as<bf16>();
  float* G = im.grads.as<float>();
  auto name = [](int64_t l, const char* s) { return "layers." + std::to_string(l) + "." + s; };
  auto Wb = [&](const std::string& n) { return W + layout_.Offset(n); };
  auto Pf = [&](const std::string& n) { return P + layout_.Offset(n); };
  auto Gf = [&](const std::string& n) { return G + layout_.Offset(n); };

  int64_t widest = std::max({qd, c.dense_hidden, c.shared_experts * c.expert_hidden, H});
  float *dres, *dmain, *dhs, *dgate;
  bf16 *dres_b, *dqkv, *dout_b, *dwork, *dz = nullptr, *dlogits;
  GROVE_RETURN_IF_ERROR(im.dres.Reserve(R * H, &dres));
  GROVE_RETURN_IF_ERROR(im.dres_b.Reserve(R * H, &dres_b));
  GROVE_RETURN_IF_ERROR(im.dmain.Reserve(R * H, &dmain));
  GROVE_RETURN_IF_ERROR(im.dqkv.Reserve(R * qkvd, &dqkv));  // [dq | dk | dv] rows, as the forward's qkv
  GROVE_RETURN_IF_ERROR(im.dout_b.Reserve(R * widest, &dout_b));
  GROVE_RETURN_IF_ERROR(im.dwork.Reserve(2 * R * widest, &dwork));
  GROVE_RETURN_IF_ERROR(im.dhs.Reserve(S * H, &dhs));
  const int64_t chunk = std::min<int64_t>(S, LmHeadChunk(V));
  float* logits = nullptr;
  // The fused head with kept logits writes dz over them: no chunk buffer.
  const bool fused_head = im.fused_lm_head;
  if (!(fused_head && tp.logits_kept)) GROVE_RETURN_IF_ERROR(im.dz.Reserve(chunk * V, &dz));
  if (!tp.logits_kept && !fused_head) GROVE_RETURN_IF_ERROR(im.logits.Reserve(chunk * V, &logits));
  GROVE_RETURN_IF_ERROR(im.norm_ws.Reserve(kernels::RmsNormBackwardWorkspaceBytes(R, int(H))));
  kernels::AttentionShape ash;
  ash.cu_seqlens = tp.cu_seqlens.as<int32_t>();
  ash.batch = B;
  ash.max_seqlen = tp.max_seqlen;
  ash.total_tokens = R;
  ash.num_heads = int(c.heads);
  ash.num_kv_heads = int(c.kv_heads);
  ash.head_dim = int(hd);
  ash.q_row_stride = ash.kv_row_stride = qkvd;
  if (im.rope_table.bytes() > 0) {  // fused_rope: RopeBackward in dq's and dk's stores
    ash.rope_table = im.rope_table.as<float2>();
    ash.rope_positions = tp.pos.as<int32_t>();
  }
  GROVE_RETURN_IF_ERROR(im.attn_ws.Reserve(kernels::AttentionBackwardWorkspaceBytes(ash)));
  const double attn_bwd_flops = 5.0 * tp.len_sq * double(hd) * double(c.heads);  // FLOPs as in Score

  // The first Backward after ZeroGrad writes the weights' gradients (beta 0)
  // instead of adding to them (see Impl::overwrite_pending).
  const bool overwrite = im.overwrite_pending;
  const float bw = overwrite ? 0.f : 1.f;
  // The experts' dW kernels sum the squares of what they write in the
  // Backward that overwrites (Impl::dw_squares). Not in one that adds: the
  // persistent kernel would then have to load-add instead of handing its
  // adds to L2 (red.global.add), a price paid by every micro-batch after the
  // first against one 2 ms pass saved; the norm reads everything then, as
  // before.
  im.ForgetSquares();
  const bool want_squares = overwrite;
  bool all_squares = true;
  int64_t square_slot = 0;
  // dres (+)= the RMSNorm input gradient of d (fp32 [R,H]); dres_b = bf16 of
  // the new dres, which is what the block below reads; the norm weight's
  // gradient added into G (written, when overwriting). accumulate=false
  // starts the residual gradient.
  auto norm_backward = [&](const float* d, const bf16* x, const std::string& wname, const float* rstd,
                           bool accumulate) -> Status {
    kernels::RmsNormBackwardResidualArgs a;
    a.dy = d;
    a.x = x;
    a.weight = Pf(wname);
    a.rstd = rstd;
    a.dres = dres;
    a.dres_bf16 = dres_b;
    a.grad_w = Gf(wname);
    a.workspace = im.norm_ws.as<void>();
    a.tokens = R;
    a.hidden = int(H);
    a.accumulate_residual = accumulate;
    a.accumulate_weight_grad = !overwrite;
    GROVE_RETURN_IF_ERROR(kernels::RmsNormBackwardResidual(a, st));
    im.Lap("rmsnorm bwd (+residual add, bf16 copy)");
    GPU_LAUNCHED("norm backward");
    return Status::OK();
  };

  // Expert dW work in flight on the side streams (see Impl::side).
  bool dw_pending = false;
  auto join_dw = [&]() -> Status {
    if (!dw_pending) return Status::OK();
    for (cudaEvent_t e : im.side_done) GPU_OK(cudaStreamWaitEvent(st, e, 0));
    dw_pending = false;
    im.Lap("wait for expert dW (side streams)");
    return Status::OK();
  };

  // LM head and final norm.
  if (overwrite && S == 0) GPU_OK(cudaMemsetAsync(Gf("lm_head"), 0, V * H * sizeof(float), st));
  // The fused head with kept u: dz over all scored rows in place, then one
  // dX and one dW GEMM over all of them (no per-chunk read-modify-write of
  // the fp32 lm_head gradient, 256 MB a chunk at gpu-ref). Otherwise chunk
  // by chunk, recomputing u (fused; the same GEMM on the same inputs, so
  // the same u and statistics, written over the forward's with equal bits)
  // or the fp32 logits.
  const int64_t step = fused_head && tp.logits_kept ? std::max<int64_t>(S, 1) : chunk;
  for (int64_t r0 = 0; r0 < S; r0 += step) {
    const int64_t n = std::min<int64_t>(step, S - r0);
    const bf16* hs = tp.hs.as<bf16>() + r0 * H;
    const bf16* dz_rows = dz;
    if (fused_head) {
      const int blocks = kernels::LogitBlocks(int(V));
      float2* stats = tp.logit_stats.as<float2>() + r0 * blocks;
      bf16* u = tp.logits_kept ? tp.logits.as<bf16>() + r0 * V : dz;
      if (!tp.logits_kept)
        GROVE_RETURN_IF_ERROR(im.FusedLmHead(hs, Wb("lm_head"), tp.lm_offsets.as<int32_t>() + 2 * (r0 / chunk),
                                             int(n), int(V), int(H), u, stats, nullptr, nullptr));
      GROVE_RETURN_IF_ERROR(kernels::TokenLogProbBackwardFromShifted(u, stats, tp.sc_target.as<int32_t>() + r0,
                                                                     tp.lse.as<float>() + r0, dg + r0, u, int(n),
                                                                     int(V), st));
      dz_rows = u;
    } else {
      const float* chunk_logits = logits;
      if (tp.logits_kept) {
        chunk_logits = tp.logits.as<float>() + r0 * V;
      } else {
        GROVE_RETURN_IF_ERROR(
            Gemm(cb, false, true, n, V, H, hs, H, Wb("lm_head"), H, logits, true, V, 0, "lm_head"));
      }
      GROVE_RETURN_IF_ERROR(kernels::TokenLogProbBackward(chunk_logits, tp.sc_target.as<int32_t>() + r0,
                                                          tp.lse.as<float>() + r0, dg + r0, dz, int(n), int(V), st));
    }
    GROVE_RETURN_IF_ERROR(
        Gemm(cb, false, false, n, H, V, dz_rows, V, Wb("lm_head"), H, dhs + r0 * H, true, H, 0, "lm_head dx"));
    GROVE_RETURN_IF_ERROR(Gemm(cb, true, false, V, H, n, dz_rows, V, hs, H, Gf("lm_head"), true, H,
                               r0 == 0 ? bw : 1.f, "lm_head dW"));
  }
  im.Lap(tp.logits_kept ? "lm head + log-prob bwd (dX, dW)" : "lm head + log-prob bwd (recompute, dX, dW)",
         (tp.logits_kept ? 4.0 : 6.0) * S * V * H);
  GPU_OK(cudaMemsetAsync(dmain, 0, size_t(R) * H * sizeof(float), st));
  gpu::ScatterRows(dhs, tp.sc_row.as<int32_t>(), dmain, S, int(H), st);
  im.Lap("bwd casts, memsets");
  // The final norm starts the residual gradient (overwrites dres, dres_b).
  GROVE_RETURN_IF_ERROR(
      norm_backward(dmain, tp.resid[c.layers].as<bf16>(), "norm", tp.rstd_final.as<float>(), false));

  for (int64_t l = c.layers - 1; l >= 0; --l) {
    LayerTape& lt = tp.layers[l];
    const bf16* h2 = lt.h2.as<bf16>();
    // Feed-forward block: d(output) = dres, in bf16 in dres_b (written by
    // the norm backward above it).
    const bool moe = c.is_moe_layer(l);
    const int64_t Fd = moe ? c.shared_experts * c.expert_hidden : c.dense_hidden;
    // w1n names [W1; W3] (w3 follows w1, checked at Create).
    const std::string w1n = moe ? "moe.shared.w1" : "mlp.w1", w2n = moe ? "moe.shared.w2" : "mlp.w2";
    if (Fd > 0) {  // the first GEMM into dmain overwrites it
      bf16 *dfh = dout_b, *dfab = dwork;  // dfab [R, 2 Fd] = [da | db]
      const bool fused_swiglu = im.DenseSwiGluFused(Fd, H);
      if (fused_swiglu) {
        // dX through w2 ([H, Fd], read as B [k = H][n = Fd]) with the
        // SwiGLU backward in the epilogue: [da | db] straight from dh's fp32.
        kernels::GroupedGemmArgs dx =
            OneExpertGemm(dres_b, Wb(name(l, w2n.c_str())), dfab, tp.row_offsets.as<int32_t>(), R, Fd, H);
        dx.w_layout = kernels::GemmWeightLayout::kMnMajor;
        dx.swiglu_bwd_ab = lt.fab.as<bf16>();
        GROVE_RETURN_IF_ERROR(kernels::GroupedGemm(dx, kernels::GroupedGemmImpl::kAuto, st));
        im.Lap("dense GEMM dX + swiglu bwd", 2.0 * R * Fd * H);
      } else {
        GROVE_RETURN_IF_ERROR(Gemm(cb, false, false, R, Fd, H, dres_b, H, Wb(name(l, w2n.c_str())), Fd, dfh, false,
                                   Fd, 0, "w2 dx"));
        im.Lap("dense GEMM dX", 2.0 * R * Fd * H);
      }
      GROVE_RETURN_IF_ERROR(Gemm(cb, true, false, H, Fd, R, dres_b, H, lt.fh.as<bf16>(), Fd, Gf(name(l, w2n.c_str())),
                                 true, Fd, bw, "w2 dW"));
      im.Lap("dense GEMM dW", 2.0 * R * Fd * H);
      if (!fused_swiglu) {
        GROVE_RETURN_IF_ERROR(kernels::SwiGluBackwardPacked(dfh, lt.fab.as<bf16>(), dfab, R, int(Fd), st));
        im.Lap("swiglu bwd");
      }
      // Through w1 and w3 at once: [da | db] [W1; W3] (k = 2 Fd), and their
      // gradients as one [2 Fd, H] block (adjacent in the layout).
      GROVE_RETURN_IF_ERROR(Gemm(cb, false, false, R, H, 2 * Fd, dfab, 2 * Fd, Wb(name(l, w1n.c_str())), H, dmain,
                                 true, H, 0, "w1|w3 dx"));
      im.Lap("dense GEMM dX", 4.0 * R * Fd * H);
      GROVE_RETURN_IF_ERROR(Gemm(cb, true, false, 2 * Fd, H, R, dfab, 2 * Fd, h2, H, Gf(name(l, w1n.c_str())), true,
                                 H, bw, "w1|w3 dW"));
      im.Lap("dense GEMM dW", 4.0 * R * Fd * H);
    } else {
      GPU_OK(cudaMemsetAsync(dmain, 0, size_t(R) * H * sizeof(float), st));
      im.Lap("bwd casts, memsets");
    }
    if (moe) {
      const int64_t mi = c.moe_index(l), F = c.expert_hidden, Pn = int64_t(R) * K;
      const int32_t* pos_g = lt.pos.as<int32_t>();
      const int32_t* offsets = tp.offsets.as<int32_t>() + mi * (E + 1);
      bf16 *dey, *deh, *deab, *xe, *dxe, *ehg;
      GROVE_RETURN_IF_ERROR(im.dey.Reserve(Pn * H, &dey));
      const bool fuse_swiglu_bwd = im.fused_swiglu_bwd && im.hopper;
      deh = nullptr;  // only the unfused SwiGLU backward stores dh
      if (!fuse_swiglu_bwd) GROVE_RETURN_IF_ERROR(im.deh.Reserve(Pn * F, &deh));
      GROVE_RETURN_IF_ERROR(im.expert_h.Reserve(Pn * F, &ehg));
      // [da | db] per row, as the forward's [a | b]: the dX through w1 and
      // w3 is then one grouped GEMM (k = 2F) and their weight gradients one
      // [2F, H] block per expert.
      GROVE_RETURN_IF_ERROR(im.deab.Reserve(2 * Pn * F, &deab));
      GROVE_RETURN_IF_ERROR(im.dxe.Reserve(Pn * H, &dxe));
      if (lt.xe_kept) xe = lt.xe.as<bf16>();
      else GROVE_RETURN_IF_ERROR(im.xe.Reserve(Pn * H, &xe));
      GROVE_RETURN_IF_ERROR(im.dgate.Reserve(Pn, &dgate));
      GROVE_RETURN_IF_ERROR(im.dlogits.Reserve(R * E, &dlogits));
      GROVE_RETURN_IF_ERROR(join_dw());  // dey, deab, ehg and xe are rewritten below
      // The combine's backward without the gate: each expert row gets its
      // token's dY as it is (the gate is applied in SwiGluBackwardGated, and
      // the gate's gradient comes from there too, so y is not read).
      GROVE_RETURN_IF_ERROR(
          kernels::MoePermute(dres_b, lt.pos.as<int32_t>(), lt.src.as<int32_t>(), dey, int(Pn), int(K), int(H), st));
      im.Lap("moe combine bwd");
      kernels::GroupedGemmArgs ga;
      ga.expert_offsets = offsets;
      ga.total_rows = int(Pn);
      ga.num_experts = int(E);
      ga.out_type = kernels::GemmOutType::kBF16;
      // dX = dY W reads each expert's W [out, in] where it lies in the mirror
      // as the MN-major B [k = out, n = in] (no transposed copy), experts
      // 3 F H elements apart as in the forward: w2 [H, F] every 3H rows of
      // F; w1|w3 [2F, H] every 3F rows of H.
      const std::string e0 = name(l, "moe.experts.0.");
      const int64_t expert_stride = 3 * F * H;
      ga.w_layout = kernels::GemmWeightLayout::kMnMajor;
      ga.a = dey; ga.w = Wb(e0 + "w2"); ga.n = int(F); ga.k = int(H);
      ga.w_expert_rows = int(expert_stride / F);
      if (fuse_swiglu_bwd) {
        // The gated SwiGLU backward in this GEMM's epilogue: dh never in
        // memory; the gate's gradient from per-block partial sums.
        const int parts = kernels::SwiGluGatePartials(int(F));
        float* partial;
        GROVE_RETURN_IF_ERROR(im.dgate_partial.Reserve(Pn * parts, &partial));
        kernels::GroupedGemmArgs gated = ga;
        gated.c = deab;
        gated.swiglu_bwd_ab = lt.eab.as<bf16>();
        gated.swiglu_bwd_slot_of_row = lt.src.as<int32_t>();
        gated.swiglu_bwd_slot_gates = lt.gates.as<float>();
        gated.swiglu_bwd_h_gated = ehg;
        gated.swiglu_bwd_dgate_partial = partial;
        GROVE_RETURN_IF_ERROR(kernels::GroupedGemm(gated, kernels::GroupedGemmImpl::kAuto, st));
        GROVE_RETURN_IF_ERROR(
            kernels::SwiGluGateGradFromPartials(partial, parts, lt.src.as<int32_t>(), dgate, Pn, st));
        im.Lap("grouped GEMM dX + swiglu bwd", 2.0 * Pn * F * H);
      } else {
        ga.c = deh;  // dh before the gate
        GROVE_RETURN_IF_ERROR(kernels::GroupedGemm(ga, kernels::GroupedGemmImpl::kAuto, st));
        im.Lap("grouped GEMM dX", 2.0 * Pn * F * H);
        GROVE_RETURN_IF_ERROR(kernels::SwiGluBackwardGated(deh, lt.eab.as<bf16>(), lt.src.as<int32_t>(),
                                                           lt.gates.as<float>(), deab, ehg, dgate, Pn, int(F), st));
        im.Lap("swiglu bwd");
      }
      // The expert inputs' gradients through w1 and w3 together (summed in
      // fp32 inside the GEMM, k = 2F), stored bf16 (one rounding, 2^-9
      // relative): half the bytes of fp32 through the store and the scatter.
      ga.a = deab; ga.w = Wb(e0 + "w1"); ga.c = dxe; ga.n = int(H); ga.k = int(2 * F);
      ga.w_expert_rows = int(expert_stride / H);
      GROVE_RETURN_IF_ERROR(kernels::GroupedGemm(ga, kernels::GroupedGemmImpl::kAuto, st));
      im.Lap("grouped GEMM dX", 4.0 * Pn * F * H);
      float* dlogits_f = nullptr;
      GROVE_RETURN_IF_ERROR(im.dlogits_f.Reserve(R * E, &dlogits_f));
      kernels::RouterBackwardArgs rb;
      rb.scores = lt.scores.as<float>();
      rb.ids = tp.ids.as<uint16_t>() + mi * R * K;
      rb.dgates = dgate;
      rb.dlogits = dlogits_f;
      rb.tokens = R;
      rb.experts = int(E);
      rb.top_k = int(K);
      rb.sigmoid = c.score_func == ScoreFunc::kSigmoid;
      rb.norm_topk = c.norm_topk;
      rb.route_scale = float(c.route_scale);
      if (c.balance_alpha > 0) {
        rb.balance_alpha = float(c.balance_alpha);
        rb.seq_offsets = tp.cu_seqlens.as<int32_t>();
        rb.sequences = B;
        rb.workspace_bytes = kernels::RouterBackwardWorkspaceBytes(B, R, int(E));
        GROVE_RETURN_IF_ERROR(im.router_ws.Reserve(rb.workspace_bytes));
        rb.workspace = im.router_ws.as<void>();
      }
      GROVE_RETURN_IF_ERROR(kernels::RouterBackward(rb, st));
      gpu::CastToBf16(dlogits_f, dlogits, R * E, st);  // what the router's dX and dW read
      GPU_LAUNCHED("router backward");
      im.Lap("router bwd (kernel, cast)");
      // The block input's gradient from the experts (their rows through
      // w1|w3) and from the router (dlogits W_router) added into dmain in
      // one pass (kernels/moe_input_grad.h); where its shape rules do not
      // hold, the rows' scatter here and a cuBLAS GEMM for the router's part
      // below.
      const bool fused_input_grad = im.fused_input_grad && E % 8 == 0 && E <= 256 && K <= 16;
      if (fused_input_grad) {
        kernels::MoeInputGradArgs ig;
        ig.da = dxe;
        ig.row_of_slot = pos_g;
        ig.dlogits = dlogits;
        ig.w_router = Wb(name(l, "moe.router"));
        ig.dx = dmain;
        ig.tokens = R;
        ig.top_k = int(K);
        ig.experts = int(E);
        ig.h = int(H);
        GROVE_RETURN_IF_ERROR(kernels::MoeInputGrad(ig, st));
      } else {
        gpu::MoeScatterBackward(dxe, pos_g, dmain, R, int(K), int(H), st);
      }
      // Expert weight gradients: the grouped kernel below, or two cuBLAS
      // calls per expert (w2; w1 and w3 as one [2F, H] block): fp32 straight
      // into the layout-ordered gradient (beta = 1, or 0 after ZeroGrad),
      // optionally spread round-robin over the side streams (disjoint
      // outputs; the inputs are complete at the fork, and the join precedes
      // the next writer of dey/deab/xe, the next layer's backward).
      GPU_LAUNCHED("moe backward");
      if (!lt.xe_kept) {
        GROVE_RETURN_IF_ERROR(
            kernels::MoePermute(h2, lt.pos.as<int32_t>(), lt.src.as<int32_t>(), xe, int(Pn), int(K), int(H), st));
      }
      im.Lap("moe scatter + router dX bwd (+ re-permute if xe not kept)");
      // The grouped kernel needs each weight kind's gradients at one stride
      // between experts (true of ParamLayout: an expert's tensors are
      // adjacent); -1 when not, and then the cuBLAS loop runs.
      auto expert_grad_stride = [&](const char* w) -> int64_t {
        const std::string base = name(l, "moe.experts.");
        const float* g0 = Gf(base + "0." + w);
        const int64_t stride = E > 1 ? Gf(base + "1." + w) - g0 : 0;
        if (E > 1 && stride <= 0) return -1;
        for (int64_t e = 2; e < E; ++e)
          if (Gf(base + std::to_string(e) + "." + w) - g0 != e * stride) return -1;
        return stride;
      };
      const int64_t stride_w1 = im.grouped_dw ? expert_grad_stride("w1") : -1;
      const bool grouped_dw = stride_w1 >= 0 && expert_grad_stride("w2") == stride_w1 &&
                              expert_grad_stride("w3") == stride_w1;
      if (im.grouped_dw && !grouped_dw) {
        LOG_FIRST_N(WARNING, 1) << "GROVE_EXPERT_DW=grouped: experts' gradients not at one stride; cuBLAS loop";
      }
      if (grouped_dw) {
        // One launch per weight kind over all experts, on the main stream,
        // accumulating (or, after ZeroGrad, overwriting: an empty expert's G
        // then becomes 0) like the cuBLAS calls.
        kernels::GroupedWeightGradArgs wg;
        wg.expert_offsets = offsets;
        wg.total_rows = int(Pn);
        wg.num_experts = int(E);
        wg.g_expert_stride = stride_w1;
        wg.accumulate = !overwrite;
        // Each launch's squares in the next slots of dw_squares (allocated
        // at Create for every MoE layer's two launches; together the
        // launches write every expert weight gradient, which Create left
        // out of squares_unread).
        auto with_squares = [&](kernels::GroupedWeightGradArgs& a) {
          if (!want_squares) return;
          const int64_t slots = kernels::GroupedWeightGradSquareSlots(a);
          if (square_slot + slots > im.dw_square_slots) {
            all_squares = false;
            return;
          }
          a.sum_sq = im.dw_squares.as<double>() + square_slot;
          square_slot += slots;
        };
        wg.dy = dey; wg.x = ehg; wg.n = int(H); wg.k = int(F); wg.g = Gf(e0 + "w2");
        with_squares(wg);
        GROVE_RETURN_IF_ERROR(kernels::GroupedWeightGrad(wg, st, im.dw_impl));
        // w1 and w3 as one [2F, H] gradient per expert (w3's follows w1's).
        wg.dy = deab; wg.x = xe; wg.n = int(2 * F); wg.k = int(H);
        wg.g = Gf(e0 + "w1");
        wg.sum_sq = nullptr;
        with_squares(wg);
        GROVE_RETURN_IF_ERROR(kernels::GroupedWeightGrad(wg, st, im.dw_impl));
        im.Lap("expert dW", 6.0 * Pn * F * H);
      } else {
        all_squares = false;
      }
      const int ns = grouped_dw ? 0 : int(im.side.size());
      if (ns > 0) {
        GPU_OK(cudaEventRecord(im.fork, st));
        for (cudaStream_t s : im.side) GPU_OK(cudaStreamWaitEvent(s, im.fork, 0));
      }
      int64_t off = 0;
      int call = 0;
      // The side streams' handles run cublasGemmEx (the tuned GEMM is on st).
      auto handle = [&]() { return ns > 0 ? GemmRunner{im.side_cublas[call++ % ns], nullptr} : cb; };
      for (int64_t e = 0; e < E && !grouped_dw; ++e) {
        const int64_t n = tp.h_counts[mi * E + e];
        const std::string x = name(l, "moe.experts.") + std::to_string(e) + ".";
        if (n == 0 && overwrite) {
          for (const char* w : {"w1", "w2", "w3"})
            GPU_OK(cudaMemsetAsync(Gf(x + w), 0, F * H * sizeof(float), ns > 0 ? im.side[0] : st));
        }
        if (n > 0) {
          GROVE_RETURN_IF_ERROR(Gemm(handle(), true, false, H, F, n, dey + off * H, H, ehg + off * F, F,
                                     Gf(x + "w2"), true, F, bw, "expert w2 dW"));
          // w1 and w3 together: [2F, H] (adjacent in the layout) from [da | db].
          GROVE_RETURN_IF_ERROR(Gemm(handle(), true, false, 2 * F, H, n, deab + off * 2 * F, 2 * F, xe + off * H, H,
                                     Gf(x + "w1"), true, H, bw, "expert w1|w3 dW"));
        }
        off += n;
      }
      for (int i = 0; i < ns; ++i) GPU_OK(cudaEventRecord(im.side_done[i], im.side[i]));
      dw_pending = ns > 0;
      if (ns == 0 && !grouped_dw) im.Lap("expert dW", 6.0 * Pn * F * H);
      if (!fused_input_grad) {
        GROVE_RETURN_IF_ERROR(Gemm(cb, false, false, R, H, E, dlogits, E, Wb(name(l, "moe.router")), H, dmain, true,
                                   H, 1, "router dx"));
      }
      GROVE_RETURN_IF_ERROR(
          Gemm(cb, true, false, E, H, R, dlogits, E, h2, H, Gf(name(l, "moe.router")), true, H, bw, "router dW"));
      im.Lap(fused_input_grad ? "router bwd (dW GEMM)" : "router bwd (dX, dW GEMMs)",
             (fused_input_grad ? 2.0 : 4.0) * R * E * H);
    }
    GROVE_RETURN_IF_ERROR(
        norm_backward(dmain, lt.x_mid.as<bf16>(), name(l, "ffn_norm"), lt.rstd2.as<float>(), true));

    // Attention block: d(output) = dres again (the residual passes through),
    // dres_b its bf16 from the FFN norm's backward just above.
    const bf16 *qkv = lt.qkv.as<bf16>(), *o = lt.o.as<bf16>(), *h1 = lt.h1.as<bf16>();
    GROVE_RETURN_IF_ERROR(
        Gemm(cb, false, false, R, qd, H, dres_b, H, Wb(name(l, "attn.wo")), qd, dout_b, false, qd, 0, "wo dx"));
    im.Lap("dense GEMM dX", 2.0 * R * qd * H);
    GROVE_RETURN_IF_ERROR(
        Gemm(cb, true, false, H, qd, R, dres_b, H, o, qd, Gf(name(l, "attn.wo")), true, qd, bw, "wo dW"));
    im.Lap("dense GEMM dW", 2.0 * R * qd * H);
    GROVE_RETURN_IF_ERROR(kernels::AttentionBackward(ash, qkv, qkv + qd, qkv + qd + kd, o, dout_b,
                                                     lt.lse.as<float>(), dqkv, dqkv + qd, dqkv + qd + kd,
                                                     im.attn_ws.as<void>(), st));
    im.Lap("attention bwd", attn_bwd_flops);
    if (ash.rope_table == nullptr) {  // else rotated back as the attention backward stored dq and dk
      GROVE_RETURN_IF_ERROR(kernels::RopeBackward(dqkv, tp.pos.as<int32_t>(), R, int(c.heads + c.kv_heads),
                                                  int(hd), c.rope_base, st, qkvd));
      im.Lap("rope");
    }
    // Through [Wq; Wk; Wv] at once (k = qd + 2 kd; the first write into
    // dmain after the norm backward read it), and the three weights'
    // gradients as one [qd + 2 kd, H] block.
    GROVE_RETURN_IF_ERROR(
        Gemm(cb, false, false, R, H, qkvd, dqkv, qkvd, Wb(name(l, "attn.wq")), H, dmain, true, H, 0, "wq|wk|wv dx"));
    im.Lap("dense GEMM dX", 2.0 * R * H * qkvd);
    GROVE_RETURN_IF_ERROR(
        Gemm(cb, true, false, qkvd, H, R, dqkv, qkvd, h1, H, Gf(name(l, "attn.wq")), true, H, bw, "wq|wk|wv dW"));
    im.Lap("dense GEMM dW", 2.0 * R * H * qkvd);
    GROVE_RETURN_IF_ERROR(
        norm_backward(dmain, tp.resid[l].as<bf16>(), name(l, "attn_norm"), lt.rstd1.as<float>(), true));
  }
  // dres_b: the embedding output's gradient, from layer 0's attention norm;
  // added into the embedding's gradient, which ZeroGrad zeroed.
  const size_t embed_bytes = kernels::EmbeddingBackwardWorkspaceBytes(R, int(V));
  GROVE_RETURN_IF_ERROR(im.embed_ws.Reserve(embed_bytes));
  GROVE_RETURN_IF_ERROR(kernels::EmbeddingBackward(tp.tokens.as<int32_t>(), dres_b, Gf("embed"), im.embed_ws.as<void>(),
                                                   embed_bytes, R, int(V), int(H), st));
  im.Lap("embedding bwd");
  GROVE_RETURN_IF_ERROR(join_dw());
  im.overwrite_pending = false;
  im.squares_valid = want_squares && all_squares && square_slot == im.dw_square_slots;
  return Synchronize();
}

}  // namespace grove::model
