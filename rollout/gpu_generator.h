// GpuGenerator: the rollout engine on one CUDA GPU. Same results contract as
// model::Transformer<float>::Generate (stop tokens, max_new_tokens capped by
// max_seq_len - prompt length, per-token log-probs at temperature 1 over the
// full vocabulary, routes: prompt rows then one row per completion token
// except the last, [moe_layers][top_k] uint16 per row), computed with
// weight-only quantized linears (kernels/quant_linear.h), the fused MoE
// decode (kernels/moe_decode.h), a paged KV cache (kernels/paged_kv.h) and
// GPU sampling (kernels/sampling.h).
//
// Numerics: residual stream fp32; every matmul input (normed activations,
// attention output, SwiGLU hidden) and the KV cache bf16; fp32 accumulation
// and softmax. Attention and router weights bf16; norms, router bias and the
// embedding table fp32 (exact); every other 2-D weight (dense and expert
// SwiGLU, shared experts, lm_head) in the format the FormatChooser gives
// (nullopt: bf16). The w1 and w3 of one MLP (dense layer, shared experts,
// routed expert) must get the same format -- one unit of the precision plan
// (precision_plan.h) -- since the engine stacks them into one weight.
//
// Engine: continuous batching. Sequences wait in a queue; each engine step
// admits waiting sequences while a slot (max_batch) and KV pages for their
// whole budget (prompt + capped max_new_tokens) are free, prefills their
// prompts in one batched forward (rows of all of them), then decodes one
// token for every running sequence; finished sequences free their slot and
// pages at once. KV pages are sized from the free GPU memory after the
// weights (kv_memory_fraction of it). The decode forward runs as a CUDA
// graph per batch-size bucket (1, 2, 4, ..., max_batch; rows padded), captured
// on first use; sampling runs after the graph. A failed capture falls back to
// eager launches (stats().graphs_used stays false).
//
// Sampled tokens (temperature > 0) are drawn with Philox keyed by (seed,
// prompt index, token index): repeatable, independent of batch composition,
// but not the CPU engine's mt19937 stream (same distribution, other draws).
//
// Host header, no CUDA. Not thread-safe; one GPU per object.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "base/result.h"
#include "kernels/decode_step.h"
#include "model/config.h"
#include "model/transformer.h"
#include "rollout/precision_format.h"

namespace grove::rollout {

// The parts of a decode step that profile_decode times separately.
enum class DecodePhase : int {
  kInputs,         // embedding lookup (and the step's input uploads before it)
  kNorms,          // attention, ffn and final RMSNorm
  kQkvLinear,      // fused q/k/v projection
  kRopeAppend,     // RoPE + KV-cache append
  kAttention,      // paged attention
  kWo,             // attention output projection (+ residual)
  kDenseFfn,       // dense SwiGLU layers
  kRouter,         // router linear + top-k (+ the routes copy)
  kSharedExperts,  // shared-expert SwiGLU
  kMoeRouteIndex,  // MoeDecodeForward: grouping slots by expert
  kMoeUp,          // MoeDecodeForward: W1|W3 + SwiGLU
  kMoeDown,        // MoeDecodeForward: W2
  kMoeCombine,     // MoeDecodeForward: gated sum into the residual
  kLmHead,         // final gather + lm_head
  kSampling,       // sampling + result copies to the host
  kHost,           // host bookkeeping: step wall time outside the GPU span
  kCount
};
inline constexpr int kDecodePhases = static_cast<int>(DecodePhase::kCount);
const char* DecodePhaseName(DecodePhase phase);

// Where GpuGeneratorOptions::fold_shared_experts runs the shared experts
// inside MoeDecodeForward (as extra experts E..E+S-1, gate 1 for every
// token) instead of as their own SwiGLU linears.
enum class SharedExpertFold : int {
  kNever,     // every forward runs them as their own linears
  kBatchOne,  // one-row forwards fold them (the batch-1 decode step, and a
              // lone one-token prompt's prefill); every other forward does not
  kAlways,    // every forward folds them, prefill included
};
const char* SharedExpertFoldName(SharedExpertFold fold);

struct GpuGeneratorOptions {
  int device = 0;
  int max_batch = 128;
  int page_tokens = 16;
  double kv_memory_fraction = 0.6;  // of free memory after weights
  bool cuda_graphs = true;
  // Profiling: decode steps run eagerly (no graph) with a cudaEvent before
  // each op, summed per DecodePhase into Stats::decode_phase_seconds. The
  // events serialize nothing, but eager launches are slower than a graph at
  // small batch, and a phase's time includes any launch gap the GPU waits
  // through before its first kernel. Results are unchanged.
  bool profile_decode = false;
  // Decode-step paths, measured on an H100 (docs/rollout.md, decode_bench
  // --variants): one_launch_moe_index, router_writes_routes and
  // split_kv_attention are on by default (each faster at every batch
  // measured); fold_shared_experts is kBatchOne by default (H100, medians
  // of 5 repeats against the other defaults: 1.086x bf16 / 1.082x int4 at
  // batch 1, 0.995x at batch 8 = the same graph; folding every forward
  // loses at batch >= 8: 0.97-0.98x). Where a path changes results it is
  // only fp32 summation order:
  // Shared experts run inside MoeDecodeForward as extra experts E..E+S-1,
  // routed for every token with gate 1 (their w1/w3 are row slices of the
  // stacked weight, w2 column blocks copied at LoadWeights in the quantized
  // form, so the same quantized values). Saves the two shared-expert linears
  // and the SwiGLU launch per MoE layer; changes only fp32 summation order
  // (the W2 dot split into expert_hidden pieces, summed in the combine), so a
  // folded forward is not bit-equal to an unfolded one. kBatchOne folds only
  // where the fold won (one-row forwards): larger forwards are the kNever
  // forward bit for bit, one-row forwards the kAlways one. Memory: kBatchOne
  // and kAlways both keep the unfolded shared weights (the folded w1/w3 are
  // views of them) plus a W2 block copy per MoE layer, capacity for bf16
  // (gpu-ref: 2 MiB per layer, 30 MiB); kAlways also sizes the MoE workspace
  // for max_rows * (top_k + shared) slots, kBatchOne for max_rows * top_k.
  SharedExpertFold fold_shared_experts = SharedExpertFold::kBatchOne;
  // MoeDecodeArgs::one_launch_index: the MoE's slot grouping in one launch
  // for steps of up to 256 slots (rows * (top_k + folded shared)); the same
  // index, so the same bits.
  bool one_launch_moe_index = true;
  // The router kernel writes each MoE layer's ids into the routes record
  // itself (RouterArgs::ids_copy) instead of a cudaMemcpy2D per layer (a
  // copy node in the graph); the same bytes.
  bool router_writes_routes = true;
  // Rows per warp of the m = 1 CUDA-core GEMV in every QuantLinear of a
  // batch-1 step: 0 = QuantLinear's default, else 1, 2 or 4
  // (kernels/quant_linear_internal.h's kCudaCoreRows*: the same bits).
  int gemv_rows_per_warp = 0;
  // MoeDecodeArgs::mma_min_slots_per_expert: MoE forwards whose slots
  // average at least this many per routed expert run the tensor-core pair.
  int moe_mma_min_slots_per_expert = 0;
  // MoeDecodeArgs::mma_tiles_per_block of every MoE forward.
  int moe_mma_tiles_per_block = 2;
  // The same for MoE layers whose routed experts are all int8 or int4 (0:
  // moe_mma_tiles_per_block). Fixed by the layer's formats, never by the
  // batch or the shared-expert fold, so a row's bits do not depend on its
  // batch. 4: narrow blocks carry 4 tiles' bytes through their chain of
  // round trips. H100, gpu-ref, decode_bench --variants, medians of 2, ms
  // per step against 2 at batch 1 / 8 / 16 / 32 / 128: int4 0.98x / 1.05x /
  // 1.06x / 1.09x / 1.04x, int8 0.96x / 1.01x / 1.02x / 1.07x / 1.02x, the
  // half-int4 mix 0.97x / 1.03x / 1.03x / 1.05x / 1.03x, a measured 5.0 b/w
  // plan 0.97x / 1.03x / 1.03x / 1.07x / 1.04x: rollout batches gain, the
  // one-row tail of a batch loses 2-4%.
  int moe_mma_tiles_per_block_narrow = 4;
  // MoeDecodeArgs::mma_paired_up_max_tokens of every MoE forward (>= 0).
  int moe_mma_paired_up_max_tokens = 32;
  // Forwards without fuse_rmsnorm's one-row path (every forward of more
  // than one row) fold the RMSNorm after each MoE layer -- the next layer's
  // attention norm, or the final norm -- into the MoE's combine
  // (MoeDecodeArgs::normed: a block per row, RmsNormRows's arithmetic), one
  // launch fewer per MoE layer. The same bits. On: H100, gpu-ref,
  // decode_bench --variants, medians of 3, ms per step against off at batch
  // 8 / 16 / 32 / 128: bf16 1.01x / 1.00x / 1.02x / 1.03x, int4 1.02x /
  // 1.02x / 1.03x / 1.03x.
  bool fuse_combine_norm = true;
  // MoeDecodeArgs::mma_prefetch_rows of every MoE forward (int8 / int4
  // experts' rows into L2 before their blocks stage activations; the same
  // bits). On: H100, gpu-ref, decode_bench --variants, medians of 3, ms per
  // step against off at batch 1 / 8 / 16 / 32 / 128: int4 1.02x / 1.03x /
  // 1.03x / 1.03x / 1.01x, the half-int4 mix 1.02x / 1.00x / 1.02x / 1.02x /
  // 1.01x, int8 1.01x / 1.02x / 1.02x / 1.00x / 0.98x; bf16 unchanged.
  bool moe_prefetch_rows = true;
  // MoE layers whose shared experts are not folded (forwards of more than
  // one row under kBatchOne) run them on a second stream beside the router,
  // its top-k and the routed experts, joining before the MoE's combine (a
  // fork and a join per MoE layer, in the graph too): they need only the
  // normed row, and the routing chain is latency-bound. The same kernels in
  // the same order on x, so the same bits. Its own cuBLAS handle and
  // QuantLinear workspace (+32 MiB with cublas_min_rows). On: H100, gpu-ref,
  // decode_bench --variants, medians of 2, against off: bf16 batch 8 / 16 /
  // 32 / 128 1.08-1.10x / 1.10x / 1.07-1.08x / 1.08x, int4 1.08-1.12x /
  // 1.09x / 1.10-1.11x / 1.08x; batch 1 (folded) unchanged. Unfolded at
  // batch 1 it matched the fold (bf16 1.02x, int4 1.00x), which stays.
  bool shared_experts_stream = true;
  // Linears (not the routed experts) in calls of at least this many rows
  // (large decode batches, prefill) run as cublasGemmEx (bf16 in, fp32 sums
  // and out) instead of QuantLinear's 16-token chunks; 0: never. An int4
  // linear then reads its values rounded to bf16 (a copy made at
  // LoadWeights, kernels::DequantizeToBf16: n * k * 2 bytes per int4 linear,
  // the lm_head's 64 MiB on gpu-ref); int8 linears stay on QuantLinear
  // (their exact q * scale sums: int8's step is too fine to round over).
  // fp32 summation order differs from QuantLinear's, so a row's sums depend
  // on whether its call crossed the bound (route near-ties can then flip
  // with the batch). H100, gpu-ref, decode_bench --variants, medians of 2,
  // against 0: bf16 batch 32 / 64 / 128 / 256 1.02x / 1.04x / 1.07x /
  // 1.14x, int4 1.01x / 1.06x / 1.11x / 1.16x; 64 as the bound lost 2% at
  // batch 32. The first call of each new cuBLAS kernel loads it (tens of ms,
  // once per process).
  int cublas_min_rows = 32;
  // Decode steps attend with kernels::PagedAttentionSplit (flash-decoding:
  // the keys split into chunks of 32-64 positions, one block each, so batch 1
  // fills more than kv_heads SMs); prefill keeps PagedAttention. Changes
  // only fp32 summation order in attention.
  bool split_kv_attention = true;
  // With split_kv_attention: the split pass's chunks run the tiled kernel
  // (kernels::PagedAttentionSplit: a chunk's K and V copied into shared
  // memory at once, a thread per key for q.k); off, the warp walk it had
  // before (kernels::PagedAttentionSplitWalk). H100, gpu-ref, 2048-token
  // prompts: 1.3-1.4x the decode step at batch 128 (docs/kernels.md "The
  // tiled chunk kernel"). Changes only fp32 summation order.
  bool split_kv_tiled = true;
  // With split_kv_attention: prefill forwards attend through the split pass
  // too (kernels::PagedAttentionSplitAt, the tiled kernel at 64-key chunks,
  // bounded by the forward's longest prompt, its rows in groups whose
  // partials fit the workspace) instead of PagedAttention's warp walk over
  // every key of every row. A row's arithmetic does not depend on its group
  // or the bound; against the walk only fp32 summation order changes.
  bool split_kv_prefill = true;
  // With split_kv_attention: decode steps whose rows are all at most this
  // long (positions + 1) bound the split by it instead of max_seq_len, so
  // PagedAttentionSplit takes its short chunks at every batch
  // (kernels::kPagedSplitShortContext; a graph per bucket and context
  // class). 0: always max_seq_len. Changes only fp32 summation order.
  int split_kv_short_context = kernels::kPagedSplitShortContext;
  // Programmatic dependent launch for the decode step (sm_90; issue #9):
  // every kernel of the step is launched with cudaLaunchAttribute-
  // ProgrammaticStreamSerialization (kernels/programmatic_launch.h), so its
  // CTAs are scheduled while the kernel ahead still runs; each calls
  // griddepcontrol.wait before it reads what that kernel wrote, and the
  // linears prefetch their weight rows into L2 before the wait. The same
  // arithmetic, so the same bits. On: with fuse_rmsnorm, 1.19-1.21x per
  // batch-1 step and 1.09-1.11x at batch 8 on gpu-ref (H200, decode_bench
  // --variants); either alone 0.97-1.05x.
  bool programmatic_launch = true;
  // Batch-1 decode steps fuse each RMSNorm into the linear that follows it
  // (kernels::QuantLinearRmsNormed: the QKV, the dense W1|W3 or the router,
  // whose kernel also writes the normed row for the shared experts and the
  // MoE, and the lm_head): 3-4 launches fewer per layer. The same bits
  // (the norm's rstd and products are the standalone kernel's). Prefill and
  // larger batches keep the separate norm. On (see programmatic_launch).
  bool fuse_rmsnorm = true;
  // With fuse_rmsnorm (InvalidArgument without it): the batch-1 router
  // linear also routes (top-k, gates, the routes record) in its last block
  // to finish (kernels::RouterTail), one launch fewer per MoE layer. The same
  // bits (RouterTopK's per-token code). Off: measured 0.98x at batch 1 and
  // 1.00x at 8 on top of the defaults (H200, gpu-ref).
  bool fuse_router_topk = false;
  // Decode steps with split_kv_attention (ignored without it) skip the RoPE
  // + KV-append launch: the split-KV pass ropes its query heads and appends
  // each row's k, v itself (kernels::PagedFusedAppend), one launch fewer per
  // layer at every batch. The same bits (RopePair, the append's rounding).
  // On: 1.03-1.04x at batch 1 and 1.03x at batch 8 over the other defaults
  // (H100, gpu-ref, bf16 and int4, decode_bench --variants; docs/kernels.md,
  // which also has the folds tried beside it and removed).
  bool fuse_append_attention = true;
  // Batch-1 decode steps run as one persistent kernel
  // (kernels::DecodeStepOneRow: every layer's stages meet at grid barriers
  // instead of ~10 launches a layer) when the step would otherwise take the
  // fused paths above: fuse_rmsnorm, split_kv_attention with
  // fuse_append_attention, and the shared experts folded (or none). The same
  // bits as those launches with split_kv_tiled off (the warp walk's
  // attention) and the MoE's CUDA-core pair at one row
  // (moe_mma_min_slots_per_expert above top_k + shared experts;
  // gpu_generator_test checks tokens, log-probs and routes); with the default
  // tensor-core pair only fp32 summation order differs. Off: slower so far,
  // 1.30 against 0.85 ms per step on gpu-ref in bf16 (H100; decode_bench
  // --step_stages splits its time by stage and docs/kernels.md says where it
  // goes).
  bool persistent_decode = false;
  // With persistent_decode: each persistent step records when its stages
  // end (kernels::DecodeStepArgs::stage_clock) and Stats sums them per
  // stage (a device-to-host copy and sync per step: profiling only).
  bool persistent_stage_clock = false;
};

class GpuGenerator {
 public:
  // Number of usable CUDA devices (0 without a driver or GPU).
  static int DeviceCount();

  // Allocates weights (capacity for bf16 of every weight, so a later
  // LoadWeights in any format reuses the same buffers), activations and the
  // KV pages. InvalidArgument names the unsupported part of the config.
  static Result<std::unique_ptr<GpuGenerator>> Create(const model::ModelConfig& config,
                                                      const GpuGeneratorOptions& options);
  ~GpuGenerator();

  // fp32 params in ParamLayout order (host). choose(tensor) gives each 2-D
  // weight's format (nullopt = bf16); attention, router, norms, embed stay
  // bf16/fp32 whatever it says. Quantizes on the GPU (kernels::QuantizeWeight).
  // Returns the seconds it took (upload included).
  Result<double> LoadWeights(std::span<const float> params, const FormatChooser& choose);
  // The same from fp32 params already on this generator's device (layout
  // order, layout().total() floats, 16-byte aligned; e.g. an NCCL receive
  // buffer): quantized where they are, no host round trip. They must be
  // complete when this is called (synchronize the stream that wrote them) and
  // stay unchanged until it returns (it synchronizes).
  Result<double> LoadWeightsFromDevice(const float* params, const FormatChooser& choose);

  // As model::Transformer<float>::Generate (same validation).
  // FailedPrecondition before the first LoadWeights.
  Result<std::vector<model::Completion<float>>> Generate(const std::vector<std::vector<int32_t>>& prompts,
                                                         const model::SamplingOptions& options);

  struct Stats {
    int64_t kv_pages_total = 0, kv_pages_peak = 0;
    int64_t decode_steps = 0, prefill_tokens = 0, generated_tokens = 0;
    int64_t persistent_decode_steps = 0;  // decode steps run as kernels::DecodeStepOneRow
    double decode_seconds = 0, prefill_seconds = 0;
    bool graphs_used = false;
    // With profile_decode: seconds per DecodePhase over all decode steps
    // (kHost: each step's wall time minus its first-to-last event span).
    std::array<double, kDecodePhases> decode_phase_seconds{};
    // With persistent_stage_clock: seconds per kernels::DecodeStage.
    std::array<double, static_cast<int>(kernels::DecodeStage::kCount)> persistent_stage_seconds{};
  };
  // Cumulative over Generate calls (kv_pages_total: the pool's size).
  const Stats& stats() const;

  struct Impl;

 private:
  explicit GpuGenerator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace grove::rollout
