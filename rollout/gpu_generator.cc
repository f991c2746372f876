#include "rollout/gpu_generator.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <glog/logging.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <initializer_list>
#include <map>
#include <string>

#include "kernels/decode_step.h"
#include "kernels/moe_decode.h"
#include "kernels/paged_kv.h"
#include "kernels/paged_kv_internal.h"
#include "kernels/programmatic_launch.h"
#include "kernels/quant_linear.h"
#include "kernels/quant_linear_internal.h"
#include "kernels/router.h"
#include "kernels/sampling.h"
#include "model/layers.h"
#include "model/param_layout.h"
#include "model/sampling.h"
#include "rollout/gpu_generator_kernels.h"
#include "rollout/kv_page_table.h"

namespace grove::rollout {
namespace {

using bf16 = __nv_bfloat16;
using kernels::Accumulate;
using kernels::QuantFormat;
using kernels::QuantWeight;
using Clock = std::chrono::steady_clock;

// split_kv_prefill: the split pass's chunk length for prefill rows, and the
// rows a launch must hold at the longest prompt (the workspace's floor).
constexpr int kPrefillSplitChunkTokens = 64;
constexpr int64_t kPrefillSplitRows = 256;

double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

Status Cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string("GpuGenerator: ") + what + ": " + cudaGetErrorString(err));
}
#define GEN_CUDA(expr) GROVE_RETURN_IF_ERROR(Cuda((expr), #expr))

QuantFormat ToQuant(PrecisionFormat f) {
  switch (f) {
    case PrecisionFormat::kInt8: return QuantFormat::kInt8;
    case PrecisionFormat::kInt4: return QuantFormat::kInt4;
    case PrecisionFormat::kBF16: break;
  }
  return QuantFormat::kBF16;
}

// One 2-D weight on the device: fixed buffers sized for its largest format
// (bf16 data, int4's scale count), so reloading in another format never
// moves it.
struct WeightSlot {
  std::string name;        // the ParamLayout tensor (fused: "layers.L.attn.wq+wk+wv")
  int64_t offset = 0, n = 0, k = 0;
  bool choosable = false;  // the FormatChooser decides its format
  // The layout tensors stacked row-wise in this slot (adjacent in the
  // layout): the chooser is asked for each and must give them one format.
  std::vector<const model::TensorInfo*> parts;
  void* data = nullptr;
  float* scales = nullptr;
  QuantWeight qw;
  // A linear's int4 weight rounded to bf16 (kernels::DequantizeToBf16)
  // for the cuBLAS path of large calls (GpuGeneratorOptions::
  // cublas_min_rows); allocated at the first LoadWeights that quantizes it,
  // rewritten by every LoadWeights. Null: none (QuantLinear runs them all).
  bf16* dequant = nullptr;
};

struct LayerWeights {
  int qkv = -1, wo = -1;
  int w13 = -1, w2 = -1;                         // dense SwiGLU (w1 and w3 stacked)
  int router = -1, s_w13 = -1, s_w2 = -1;        // shared experts (w1 and w3 stacked)
  std::vector<int> e_w1, e_w3, e_w2;            // routed experts
  QuantWeight *d_w1 = nullptr, *d_w3 = nullptr, *d_w2 = nullptr;  // device arrays [experts]
  std::vector<QuantWeight> h_w1, h_w3, h_w2;                    // their host copies
  QuantFormat experts_widest = QuantFormat::kBF16;  // MoeDecodeArgs::widest_format
  // The widest format of the routed experts alone (not the folded shared
  // ones): picks moe_mma_tiles_per_block_narrow, the same whether or not a
  // forward folds the shared experts in.
  QuantFormat routed_widest = QuantFormat::kBF16;
  float *attn_norm = nullptr, *ffn_norm = nullptr, *router_bias = nullptr;
  // fold_shared_experts: the shared W2's column blocks (one per shared
  // expert, [hidden, expert_hidden] each), copied from s_w2 in its format.
  uint8_t* s_w2_blocks = nullptr;
  float* s_w2_block_scales = nullptr;  // int4 only (int8 rows keep s_w2's scale)
};

// Rows [r0, r0 + n) of a row-major quantized weight (every format is
// row-major with per-row or per-row-group scales): a view, no copy.
QuantWeight RowSlice(const QuantWeight& w, int64_t r0, int64_t n) {
  QuantWeight s = w;
  s.n = int32_t(n);
  s.data = static_cast<const uint8_t*>(w.data) + kernels::QuantDataBytes(w.format, r0, w.k);
  s.scales = w.scales ? w.scales + kernels::QuantScaleCount(w.format, r0, w.k) : nullptr;
  return s;
}

struct Seq {
  int idx = 0;       // prompt index
  int slot = 0;      // in the KvPageTable
  int64_t len = 0;   // tokens in the sequence (prompt + generated)
  int32_t pending = 0;  // last token, fed at position len - 1 by the next decode
};

// Events on the stream in launch order, each opening an interval of one
// DecodePhase that the next event closes (profile_decode).
class PhaseTimer {
 public:
  ~PhaseTimer() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  // Records the next event; the interval it opens counts toward `phase`
  // (DecodePhase::kCount: closes the last interval, opens none).
  Status Mark(DecodePhase phase, cudaStream_t stream) {
    cudaEvent_t* e = nullptr;
    GROVE_RETURN_IF_ERROR(Reserve(phase, &e));
    return Cuda(cudaEventRecord(*e, stream), "cudaEventRecord (profile)");
  }
  // Reserves consecutive events for a callee to record in order
  // (MoeDecodeArgs::stage_events); phases[i] is the interval event i opens.
  // The pointer (to contiguous events) is valid until the next Mark or Take.
  Result<const cudaEvent_t*> Take(std::initializer_list<DecodePhase> phases) {
    const size_t first = used_;
    for (DecodePhase p : phases) {
      cudaEvent_t* e = nullptr;
      GROVE_RETURN_IF_ERROR(Reserve(p, &e));
    }
    return events_.data() + first;
  }
  // After the stream is synchronized: adds each interval to its phase and
  // returns the first-to-last span in seconds; then starts over.
  Result<double> Collect(std::array<double, kDecodePhases>* seconds) {
    double span = 0;
    for (size_t i = 0; i + 1 < used_; ++i) {
      float ms = 0;
      GROVE_RETURN_IF_ERROR(Cuda(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]), "cudaEventElapsedTime"));
      if (phase_[i] != DecodePhase::kCount) (*seconds)[int(phase_[i])] += ms * 1e-3;
      span += ms * 1e-3;
    }
    used_ = 0;
    return span;
  }
  // Forgets recorded events (a step that failed part-way).
  void Clear() { used_ = 0; }

 private:
  Status Reserve(DecodePhase phase, cudaEvent_t** e) {
    if (used_ == events_.size()) {
      cudaEvent_t ev = nullptr;
      GROVE_RETURN_IF_ERROR(Cuda(cudaEventCreate(&ev), "cudaEventCreate (profile)"));
      events_.push_back(ev);
      phase_.push_back(DecodePhase::kCount);
    }
    phase_[used_] = phase;
    *e = &events_[used_++];
    return Status::OK();
  }
  std::vector<cudaEvent_t> events_;
  std::vector<DecodePhase> phase_;
  size_t used_ = 0;
};

}  // namespace

const char* DecodePhaseName(DecodePhase phase) {
  switch (phase) {
    case DecodePhase::kInputs: return "inputs + embed";
    case DecodePhase::kNorms: return "rmsnorm";
    case DecodePhase::kQkvLinear: return "qkv linear";
    case DecodePhase::kRopeAppend: return "rope + kv append";
    case DecodePhase::kAttention: return "attention";
    case DecodePhase::kWo: return "wo linear";
    case DecodePhase::kDenseFfn: return "dense ffn";
    case DecodePhase::kRouter: return "router linear + topk";
    case DecodePhase::kSharedExperts: return "shared experts";
    case DecodePhase::kMoeRouteIndex: return "moe route index";
    case DecodePhase::kMoeUp: return "moe up";
    case DecodePhase::kMoeDown: return "moe down";
    case DecodePhase::kMoeCombine: return "moe combine";
    case DecodePhase::kLmHead: return "lm head";
    case DecodePhase::kSampling: return "sampling + copies";
    case DecodePhase::kHost: return "host bookkeeping";
    case DecodePhase::kCount: break;
  }
  return "?";
}

const char* SharedExpertFoldName(SharedExpertFold fold) {
  switch (fold) {
    case SharedExpertFold::kNever: return "never";
    case SharedExpertFold::kBatchOne: return "batch one";
    case SharedExpertFold::kAlways: return "always";
  }
  return "?";
}

struct GpuGenerator::Impl {
  model::ModelConfig c;
  model::ParamLayout layout;
  GpuGeneratorOptions opt;
  cudaStream_t stream = nullptr;
  int64_t H = 0, qd = 0, kd = 0, V = 0, E = 0, K = 0, M = 0, F_max = 0;
  // Shared experts that folded forwards run as MoE experts E..E+S-1 (0:
  // none folds); KS = K + S.
  int64_t S = 0, KS = 0;
  int fold_rows = 0;  // rows of fold_ids / fold_gates: the most a folded forward has
  int max_rows = 0;  // rows of one forward (prefill chunk bound)
  std::vector<void*> device_allocs;
  std::vector<void*> host_allocs;

  // Weights.
  float* embed = nullptr;
  float* final_norm = nullptr;
  float *rope_cos = nullptr, *rope_sin = nullptr;
  std::vector<WeightSlot> slots;
  std::vector<LayerWeights> lw;
  int lm_head = -1;
  float* staging = nullptr;
  int64_t staging_floats = 0;
  bool loaded = false;

  // Activations (max_rows rows) and per-step inputs/outputs.
  float* x = nullptr;
  bf16* h = nullptr;
  float* qkv = nullptr;
  bf16* q = nullptr;
  bf16* attn = nullptr;
  float* fa = nullptr;  // [rows, 2F]: x W1^T | x W3^T
  bf16* fh = nullptr;
  float *rlogits = nullptr, *rscores = nullptr, *gates = nullptr;
  uint16_t *ids = nullptr, *routes = nullptr;  // ids, gates: [rows, K] (unfolded forwards)
  // Folded forwards' routing: [fold_rows, KS], columns K.. constant (ids E +
  // s, gate 1, written once at Build), so unfolded forwards, whose router
  // writes K-wide rows, keep their own buffers.
  uint16_t* fold_ids = nullptr;
  float* fold_gates = nullptr;
  unsigned* route_counter = nullptr;  // fuse_router_topk: the fused router's last-block counter
  bf16* h_last = nullptr;
  float* logits = nullptr;  // [max_batch, V]
  int32_t *d_tokens = nullptr, *d_slot = nullptr, *d_pos = nullptr, *d_last = nullptr, *d_step = nullptr;
  int64_t* d_seq = nullptr;
  int32_t* d_out_tok = nullptr;
  float* d_out_lp = nullptr;
  void* ql_ws = nullptr;
  size_t ql_ws_bytes = 0;
  void* moe_ws = nullptr;
  size_t moe_ws_bytes = 0;
  // persistent_decode: the layer table (device) and the kernel's workspace.
  kernels::DecodeStepLayer* step_layers = nullptr;
  uint64_t* step_clock = nullptr;  // persistent_stage_clock: [2 * kDecodeStepMaxMarks]
  std::vector<uint64_t> h_step_clock;
  void* step_ws = nullptr;
  size_t step_ws_bytes = 0;
  void* attn_ws = nullptr;  // split_kv_attention: PagedAttentionSplit's partials for max_batch rows
  size_t attn_ws_bytes = 0;
  int prefill_bound = 0;  // split_kv_prefill: the longest prompt of the prefill forward being run
  // Pinned host mirrors.
  int32_t *h_tokens = nullptr, *h_slot = nullptr, *h_pos = nullptr, *h_lastrow = nullptr, *h_step = nullptr;
  int64_t* h_seq = nullptr;
  int32_t* h_out_tok = nullptr;
  float* h_out_lp = nullptr;
  uint16_t* h_routes = nullptr;

  // KV cache.
  bf16* kv_pool = nullptr;
  int num_pages = 0, max_pages_per_seq = 0;
  int32_t* d_page_table = nullptr;  // mirrors a Generate call's KvPageTable::table()

  // Decode graphs by (bucket, context class): key = 2 * bucket +
  // short_context; valid for the weight formats in graph_formats.
  std::map<int, cudaGraphExec_t> graphs;
  // Whether every row of the next decode forward is at most
  // opt.split_kv_short_context long (pos + 1): its split-KV is then bounded
  // by that instead of max_seq_len, so PagedAttentionSplit takes short chunks.
  bool short_context = false;
  std::vector<QuantFormat> graph_formats;
  bool graphs_failed = false;

  Stats stats;
  // profile_decode: `timing` is set for the span of one decode step.
  PhaseTimer timer;
  bool timing = false;
  Status Mark(DecodePhase phase) { return timing ? timer.Mark(phase, stream) : Status::OK(); }

  // cuBLAS for the bf16 linears of large calls (cublas_min_rows), on
  // `stream`, with its own workspace so that graph capture allocates nothing.
  cublasHandle_t cublas = nullptr;

  // shared_experts_stream: the second lane the shared experts run on,
  // beside the router and the routed experts (its own cuBLAS handle and
  // QuantLinear workspace: two linears run at once), and the events that
  // fork it from and join it back into `stream`.
  cudaStream_t side_stream = nullptr;
  cublasHandle_t side_cublas = nullptr;
  void* side_ql_ws = nullptr;
  cudaEvent_t fork_event = nullptr, join_event = nullptr;
  // Where a linear runs: `stream` with its handle and workspace, or the side lane.
  struct Lane {
    cudaStream_t stream;
    cublasHandle_t cublas;
    void* ql_ws;
  };
  Lane MainLane() const { return {stream, cublas, ql_ws}; }
  Lane SideLane() const { return {side_stream, side_cublas, side_ql_ws}; }
  // Whether a forward of `rows` rows runs its MoE layers' shared experts on
  // the side lane (not folded, not profiled: the phase timer marks one
  // stream). The lane exists only for models with shared experts.
  bool SharedOnSide(int rows) const { return side_stream != nullptr && !Folds(rows) && !timing; }

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    if (side_stream) cudaStreamSynchronize(side_stream);
    if (cublas) cublasDestroy(cublas);
    if (side_cublas) cublasDestroy(side_cublas);
    if (fork_event) cudaEventDestroy(fork_event);
    if (join_event) cudaEventDestroy(join_event);
    for (auto& [b, g] : graphs) cudaGraphExecDestroy(g);
    for (void* p : device_allocs) cudaFree(p);
    for (void* p : host_allocs) cudaFreeHost(p);
    if (stream) cudaStreamDestroy(stream);
    if (side_stream) cudaStreamDestroy(side_stream);
  }

  template <typename T>
  Status Alloc(T** p, int64_t count) {
    void* v = nullptr;
    const size_t bytes = std::max<size_t>(16, size_t(count) * sizeof(T));
    const cudaError_t err = cudaMalloc(&v, bytes);
    if (err != cudaSuccess)
      return Status::ResourceExhausted("GpuGenerator: cudaMalloc of " + std::to_string(bytes) +
                                       " bytes: " + cudaGetErrorString(err));
    device_allocs.push_back(v);
    *p = static_cast<T*>(v);
    return Status::OK();
  }
  template <typename T>
  Status AllocHost(T** p, int64_t count) {
    void* v = nullptr;
    GEN_CUDA(cudaMallocHost(&v, std::max<size_t>(16, size_t(count) * sizeof(T))));
    host_allocs.push_back(v);
    *p = static_cast<T*>(v);
    return Status::OK();
  }

  int AddSlot(const std::string& name, int64_t offset, int64_t n, int64_t k, bool choosable) {
    WeightSlot s;
    s.name = name;
    s.offset = offset;
    s.n = n;
    s.k = k;
    s.choosable = choosable;
    slots.push_back(s);
    return int(slots.size()) - 1;
  }
  int AddTensor(const std::string& name, bool choosable) {
    const model::TensorInfo* t = layout.Find(name);
    const int i = AddSlot(name, t->offset, t->shape[0], t->shape[1], choosable);
    slots[i].parts = {t};
    return i;
  }
  // Tensors adjacent in the layout, same columns, stacked into one slot
  // (one QuantLinear for all: row-wise formats quantize the stack exactly as
  // each part alone).
  Result<int> AddStack(const std::vector<std::string>& names, const std::string& name, bool choosable) {
    std::vector<const model::TensorInfo*> parts;
    int64_t n = 0;
    for (const std::string& nm : names) {
      const model::TensorInfo* t = layout.Find(nm);
      if (!parts.empty() && (t->offset != parts[0]->offset + n * parts[0]->shape[1] || t->shape[1] != parts[0]->shape[1]))
        return Status::Internal("GpuGenerator: " + nm + " does not follow " + names[0] + " in the layout");
      parts.push_back(t);
      n += t->shape[0];
    }
    const int i = AddSlot(name, parts[0]->offset, n, parts[0]->shape[1], choosable);
    slots[i].parts = parts;
    return i;
  }

  Status Build();
  // Whether a forward of `rows` rows runs the shared experts folded into
  // the MoE (opt.fold_shared_experts; kBatchOne: only one-row forwards, the
  // batch size where the fold was measured to win).
  bool Folds(int rows) const {
    return S > 0 && (opt.fold_shared_experts == SharedExpertFold::kAlways || rows == 1);
  }
  Status AppendFoldedSharedExperts(LayerWeights& w);
  Result<double> Load(const float* params, bool on_device, const FormatChooser& choose);
  Status Linear(const bf16* x_in, int64_t ldx, int rows, int slot, float* y, int64_t ldy, Accumulate mode,
                const Lane* on = nullptr) {
    const Lane lane = on ? *on : MainLane();
    const kernels::QuantWeight& w = slots[slot].qw;
    // bf16 weights as they are, int4 through their bf16 copy (a copy left
    // from an earlier int4 version of an int8 slot is never read).
    const void* bf16_w = w.format == QuantFormat::kBF16   ? w.data
                         : w.format == QuantFormat::kInt4 ? slots[slot].dequant
                                                          : nullptr;
    if (bf16_w != nullptr && lane.cublas != nullptr && opt.cublas_min_rows > 0 && rows >= opt.cublas_min_rows) {
      // Row-major y [rows, n] = x [rows, k] W^T, W row-major [n, k]: in
      // cuBLAS's column-major terms y^T = W^T' x^T with W read transposed.
      const float alpha = 1.f, beta = mode == Accumulate::kAdd ? 1.f : 0.f;
      const cublasStatus_t st =
          cublasGemmEx(lane.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(w.n), rows, int(w.k), &alpha, bf16_w, CUDA_R_16BF,
                       int(w.k), x_in, CUDA_R_16BF, int(ldx), &beta, y, CUDA_R_32F, int(ldy), CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT);
      if (st != CUBLAS_STATUS_SUCCESS)
        return Status::Internal("GpuGenerator: cublasGemmEx failed (" + std::to_string(int(st)) + ")");
      return Status::OK();
    }
    if (rows == 1 && opt.gemv_rows_per_warp != 0) {
      using kernels::detail::QuantLinearPath;
      const QuantLinearPath path = opt.gemv_rows_per_warp == 1   ? QuantLinearPath::kCudaCoreRows1
                                   : opt.gemv_rows_per_warp == 4 ? QuantLinearPath::kCudaCoreRows4
                                                                 : QuantLinearPath::kCudaCore;
      return kernels::detail::QuantLinearOnPath(path, x_in, ldx, rows, slots[slot].qw, y, ldy, mode, lane.stream);
    }
    return kernels::QuantLinear(x_in, ldx, rows, slots[slot].qw, y, ldy, mode, lane.ql_ws, ql_ws_bytes, lane.stream);
  }
  // y (+)= RMSNorm(x row 0, norm_weight) W^T for one row (fuse_rmsnorm);
  // the normed row also goes to `normed` unless null.
  Status LinearNormed(const float* norm_weight, bf16* normed, int slot, float* y, Accumulate mode,
                      const kernels::RouterTail* route = nullptr) {
    kernels::RmsNormedRow in;
    in.x = x;
    in.weight = norm_weight;
    in.eps = float(c.norm_eps);
    in.normed = normed;
    return kernels::QuantLinearRmsNormed(in, slots[slot].qw, y, mode, stream, route);
  }
  // x += SwiGLU(h) with width F; w13 = [W1; W3] stacked. fused_norm: one
  // row, h = RMSNorm(x, fused_norm) computed inside the W1|W3 linear.
  // on: the lane (default `stream`); a fused norm runs on `stream` only.
  Status Ffn(int rows, int w13, int w2, int64_t F, const float* fused_norm = nullptr, const Lane* on = nullptr) {
    if (fused_norm)
      GROVE_RETURN_IF_ERROR(LinearNormed(fused_norm, nullptr, w13, fa, Accumulate::kOverwrite));
    else
      GROVE_RETURN_IF_ERROR(Linear(h, H, rows, w13, fa, 2 * F, Accumulate::kOverwrite, on));
    GROVE_RETURN_IF_ERROR(gpu::SwiGluRows(fa, rows, int(F), fh, on ? on->stream : stream));
    return Linear(fh, F, rows, w2, x, H, Accumulate::kAdd, on);
  }
  // Layer l's view of the KV pool (pointers null before Build allocates it).
  kernels::PagedKvCache KvCache(int64_t l) const;
  Status Forward(int rows, int n_logits, bool gather_last);
  // Whether a forward runs as kernels::DecodeStepOneRow (persistent_decode).
  bool Persistent(int rows, bool gather_last) const {
    return opt.persistent_decode && rows == 1 && !gather_last && opt.fuse_rmsnorm && opt.split_kv_attention &&
           opt.fuse_append_attention && (M == 0 || c.shared_experts == 0 || Folds(1)) && !timing;
  }
  kernels::DecodeStepArgs StepArgs() const;
  // persistent_stage_clock: the last step's stage ends into stats.
  Status AddStageClock() {
    GEN_CUDA(cudaMemcpy(h_step_clock.data(), step_clock, h_step_clock.size() * sizeof(uint64_t),
                        cudaMemcpyDeviceToHost));
    for (int i = 1; i < kernels::kDecodeStepMaxMarks; ++i) {
      const uint64_t stage = h_step_clock[2 * i], t = h_step_clock[2 * i + 1], t0 = h_step_clock[2 * i - 1];
      if (stage == 0 || stage >= uint64_t(kernels::DecodeStage::kCount) || t < t0) break;
      stats.persistent_stage_seconds[stage] += double(t - t0) * 1e-9;
    }
    GEN_CUDA(cudaMemset(step_clock, 0, h_step_clock.size() * sizeof(uint64_t)));
    return Status::OK();
  }
  Status UploadStepLayers();
  Status RunDecode(int bucket);
  // Whether decode steps may take the short context class at all.
  bool ShortContexts() const {
    return opt.split_kv_short_context > 0 && opt.split_kv_short_context < c.max_seq_len;
  }
  // The split-KV bound of the next decode forward.
  int AttnMaxPos() const { return short_context ? opt.split_kv_short_context : int(c.max_seq_len); }
  Status Sample(int n, const model::SamplingOptions& o);
  std::vector<QuantFormat> Formats() const {
    std::vector<QuantFormat> f;
    for (const WeightSlot& s : slots) f.push_back(s.qw.format);
    return f;
  }
  void DropGraphs() {
    for (auto& [b, g] : graphs) cudaGraphExecDestroy(g);
    graphs.clear();
  }
};

Status GpuGenerator::Impl::Build() {
  const int64_t L = c.layers, hd = c.head_dim;
  H = c.hidden;
  qd = c.heads * hd;
  kd = c.kv_heads * hd;
  V = c.vocab_size;
  E = c.experts;
  K = c.top_k;
  M = c.moe_layers();
  S = opt.fold_shared_experts != SharedExpertFold::kNever && M > 0 ? c.shared_experts : 0;
  KS = K + S;
  const int64_t Fs = c.shared_experts * c.expert_hidden;
  F_max = std::max<int64_t>({8, c.dense_layers > 0 ? c.dense_hidden : 0, Fs});
  max_rows = int(std::max<int64_t>({c.max_seq_len, 2048, opt.max_batch}));
  fold_rows = S == 0 ? 0 : opt.fold_shared_experts == SharedExpertFold::kAlways ? max_rows : 1;

  // Weight slots, in layout order.
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    LayerWeights w;
    GROVE_ASSIGN_OR_RETURN(w.qkv, AddStack({p + "attn.wq", p + "attn.wk", p + "attn.wv"}, p + "attn.wq+wk+wv", false));
    w.wo = AddTensor(p + "attn.wo", false);
    if (!c.is_moe_layer(l)) {
      GROVE_ASSIGN_OR_RETURN(w.w13, AddStack({p + "mlp.w1", p + "mlp.w3"}, p + "mlp.w1+w3", true));
      w.w2 = AddTensor(p + "mlp.w2", true);
    } else {
      w.router = AddTensor(p + "moe.router", false);
      for (int64_t e = 0; e < E; ++e) {
        const std::string x = p + "moe.experts." + std::to_string(e) + ".";
        w.e_w1.push_back(AddTensor(x + "w1", true));
        w.e_w3.push_back(AddTensor(x + "w3", true));
        w.e_w2.push_back(AddTensor(x + "w2", true));
      }
      if (c.shared_experts > 0) {
        GROVE_ASSIGN_OR_RETURN(w.s_w13,
                               AddStack({p + "moe.shared.w1", p + "moe.shared.w3"}, p + "moe.shared.w1+w3", true));
        w.s_w2 = AddTensor(p + "moe.shared.w2", true);
      }
    }
    lw.push_back(std::move(w));
  }
  lm_head = AddTensor("lm_head", true);

  // Shape rules of QuantLinear (k multiple of 128, n multiple of 8).
  for (const WeightSlot& s : slots)
    if (s.k % 128 != 0 || s.n % 8 != 0)
      return Status::InvalidArgument("GpuGenerator: weight " + s.name + " is [" + std::to_string(s.n) + ", " +
                                     std::to_string(s.k) +
                                     "]; the quantized linear needs rows a multiple of 8 and columns of 128");

  // One arena for every slot at its largest size.
  auto align = [](size_t b) { return (b + 255) / 256 * 256; };
  size_t arena = 0;
  int64_t biggest = 0;
  for (const WeightSlot& s : slots) {
    arena += align(kernels::QuantDataBytes(QuantFormat::kBF16, s.n, s.k));
    arena += align(sizeof(float) * std::max(kernels::QuantScaleCount(QuantFormat::kInt8, s.n, s.k),
                                            kernels::QuantScaleCount(QuantFormat::kInt4, s.n, s.k)));
    biggest = std::max(biggest, s.n * s.k);
  }
  char* base = nullptr;
  GROVE_RETURN_IF_ERROR(Alloc(&base, int64_t(arena)));
  for (WeightSlot& s : slots) {
    s.data = base;
    base += align(kernels::QuantDataBytes(QuantFormat::kBF16, s.n, s.k));
    s.scales = reinterpret_cast<float*>(base);
    base += align(sizeof(float) * std::max(kernels::QuantScaleCount(QuantFormat::kInt8, s.n, s.k),
                                           kernels::QuantScaleCount(QuantFormat::kInt4, s.n, s.k)));
  }
  staging_floats = std::max<int64_t>(biggest, std::min<int64_t>(layout.total(), int64_t(1) << 25));
  GROVE_RETURN_IF_ERROR(Alloc(&staging, staging_floats));

  // fp32 tensors.
  GROVE_RETURN_IF_ERROR(Alloc(&embed, V * H));
  GROVE_RETURN_IF_ERROR(Alloc(&final_norm, H));
  // Per MoE layer, what folding adds to the unfolded weights (which stay).
  const size_t fold_block_bytes = S == 0 ? 0
                                         : kernels::QuantDataBytes(QuantFormat::kBF16, H, Fs) +
                                               sizeof(float) * kernels::QuantScaleCount(QuantFormat::kInt4, H, Fs);
  for (int64_t l = 0; l < L; ++l) {
    LayerWeights& w = lw[l];
    GROVE_RETURN_IF_ERROR(Alloc(&w.attn_norm, H));
    GROVE_RETURN_IF_ERROR(Alloc(&w.ffn_norm, H));
    if (c.is_moe_layer(l)) {
      GROVE_RETURN_IF_ERROR(Alloc(&w.router_bias, E));
      GROVE_RETURN_IF_ERROR(Alloc(&w.d_w1, E + S));
      GROVE_RETURN_IF_ERROR(Alloc(&w.d_w3, E + S));
      GROVE_RETURN_IF_ERROR(Alloc(&w.d_w2, E + S));
      if (S > 0) {
        GROVE_RETURN_IF_ERROR(Alloc(&w.s_w2_blocks, int64_t(kernels::QuantDataBytes(QuantFormat::kBF16, H, Fs))));
        GROVE_RETURN_IF_ERROR(Alloc(&w.s_w2_block_scales, kernels::QuantScaleCount(QuantFormat::kInt4, H, Fs)));
      }
    }
  }
  std::vector<float> cos_t, sin_t;
  model::layers::RopeTables<float>(c.max_seq_len, hd, c.rope_base, &cos_t, &sin_t);
  GROVE_RETURN_IF_ERROR(Alloc(&rope_cos, int64_t(cos_t.size())));
  GROVE_RETURN_IF_ERROR(Alloc(&rope_sin, int64_t(sin_t.size())));
  GEN_CUDA(cudaMemcpy(rope_cos, cos_t.data(), cos_t.size() * sizeof(float), cudaMemcpyHostToDevice));
  GEN_CUDA(cudaMemcpy(rope_sin, sin_t.data(), sin_t.size() * sizeof(float), cudaMemcpyHostToDevice));

  // Activations.
  const int64_t R = max_rows, Bm = opt.max_batch;
  GROVE_RETURN_IF_ERROR(Alloc(&x, R * H));
  GROVE_RETURN_IF_ERROR(Alloc(&h, R * H));
  GROVE_RETURN_IF_ERROR(Alloc(&qkv, R * (qd + 2 * kd)));
  GROVE_RETURN_IF_ERROR(Alloc(&q, R * qd));
  GROVE_RETURN_IF_ERROR(Alloc(&attn, R * qd));
  GROVE_RETURN_IF_ERROR(Alloc(&fa, R * 2 * F_max));
  GROVE_RETURN_IF_ERROR(Alloc(&fh, R * F_max));
  GROVE_RETURN_IF_ERROR(Alloc(&rlogits, R * std::max<int64_t>(E, 1)));
  GROVE_RETURN_IF_ERROR(Alloc(&rscores, R * std::max<int64_t>(E, 1)));
  GROVE_RETURN_IF_ERROR(Alloc(&gates, R * std::max<int64_t>(K, 1)));
  GROVE_RETURN_IF_ERROR(Alloc(&ids, R * std::max<int64_t>(K, 1)));
  if (S > 0) {
    // The folded shared experts' columns, written once (the router fills
    // only columns 0..K-1 of each row).
    const int64_t FR = fold_rows;
    GROVE_RETURN_IF_ERROR(Alloc(&fold_gates, FR * KS));
    GROVE_RETURN_IF_ERROR(Alloc(&fold_ids, FR * KS));
    std::vector<uint16_t> h_ids(size_t(FR * KS), 0);
    std::vector<float> h_gates(size_t(FR * KS), 0.f);
    for (int64_t r = 0; r < FR; ++r)
      for (int64_t s = 0; s < S; ++s) {
        h_ids[size_t(r * KS + K + s)] = uint16_t(E + s);
        h_gates[size_t(r * KS + K + s)] = 1.f;
      }
    GEN_CUDA(cudaMemcpy(fold_ids, h_ids.data(), h_ids.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
    GEN_CUDA(cudaMemcpy(fold_gates, h_gates.data(), h_gates.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  GROVE_RETURN_IF_ERROR(Alloc(&routes, R * std::max<int64_t>(M * K, 1)));
  GROVE_RETURN_IF_ERROR(Alloc(&route_counter, 1));
  // fuse_router_topk's counter starts at 0 (each launch leaves it 0); on the
  // engine's stream, so it is ordered before every kernel that counts.
  GEN_CUDA(cudaMemsetAsync(route_counter, 0, sizeof(unsigned), stream));
  GROVE_RETURN_IF_ERROR(Alloc(&h_last, Bm * H));
  GROVE_RETURN_IF_ERROR(Alloc(&logits, Bm * V));
  GROVE_RETURN_IF_ERROR(Alloc(&d_tokens, R));
  GROVE_RETURN_IF_ERROR(Alloc(&d_slot, R));
  GROVE_RETURN_IF_ERROR(Alloc(&d_pos, R));
  GROVE_RETURN_IF_ERROR(Alloc(&d_last, Bm));
  GROVE_RETURN_IF_ERROR(Alloc(&d_step, Bm));
  GROVE_RETURN_IF_ERROR(Alloc(&d_seq, Bm));
  GROVE_RETURN_IF_ERROR(Alloc(&d_out_tok, Bm));
  GROVE_RETURN_IF_ERROR(Alloc(&d_out_lp, Bm));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_tokens, R));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_slot, R));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_pos, R));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_lastrow, Bm));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_step, Bm));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_seq, Bm));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_out_tok, Bm));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_out_lp, Bm));
  GROVE_RETURN_IF_ERROR(AllocHost(&h_routes, R * std::max<int64_t>(M * K, 1)));

  // Workspaces: the largest any weight needs in any format at max_rows.
  for (const WeightSlot& s : slots)
    for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4})
      ql_ws_bytes = std::max(ql_ws_bytes, kernels::QuantLinearWorkspaceBytes(f, s.n, s.k, R));
  if (ql_ws_bytes > 0) GROVE_RETURN_IF_ERROR(Alloc(reinterpret_cast<char**>(&ql_ws), int64_t(ql_ws_bytes)));
  if (ql_ws_bytes > 0 && side_stream != nullptr)
    GROVE_RETURN_IF_ERROR(Alloc(reinterpret_cast<char**>(&side_ql_ws), int64_t(ql_ws_bytes)));
  if (M > 0) {
    // Each form at the most rows it runs with (kBatchOne: folded one row).
    if (fold_rows < R)
      moe_ws_bytes = kernels::MoeDecodeWorkspaceBytes(int(R), int(H), int(c.expert_hidden), int(E), int(K));
    if (S > 0)
      moe_ws_bytes = std::max(moe_ws_bytes, kernels::MoeDecodeWorkspaceBytes(fold_rows, int(H), int(c.expert_hidden),
                                                                             int(E + S), int(KS)));
    if (moe_ws_bytes > 0) GROVE_RETURN_IF_ERROR(Alloc(reinterpret_cast<char**>(&moe_ws), int64_t(moe_ws_bytes)));
  }

  // KV pages from what is left.
  max_pages_per_seq = int((c.max_seq_len + opt.page_tokens - 1) / opt.page_tokens);
  GROVE_RETURN_IF_ERROR(Alloc(&d_page_table, Bm * max_pages_per_seq));
  if (opt.split_kv_attention) {
    // Sized for both context classes of a decode step (short: more, shorter chunks).
    attn_ws_bytes = kernels::PagedAttentionSplitWorkspaceBytes(KvCache(0), int(Bm), int(c.heads), int(c.max_seq_len));
    if (ShortContexts())
      attn_ws_bytes = std::max(attn_ws_bytes, kernels::PagedAttentionSplitWorkspaceBytes(
                                                  KvCache(0), int(Bm), int(c.heads), opt.split_kv_short_context));
    if (opt.split_kv_prefill)  // and a prefill group of kPrefillSplitRows rows at the longest prompt
      attn_ws_bytes = std::max(attn_ws_bytes, kernels::PagedAttentionSplitWorkspaceBytesAt(
                                                  KvCache(0), int(std::min<int64_t>(R, kPrefillSplitRows)),
                                                  int(c.heads), int(c.max_seq_len), kPrefillSplitChunkTokens));
    GROVE_RETURN_IF_ERROR(Alloc(reinterpret_cast<char**>(&attn_ws), int64_t(attn_ws_bytes)));
  }
  if (opt.persistent_decode) {
    const Status fits = kernels::DecodeStepFits(StepArgs());
    if (!fits.ok()) {
      LOG(WARNING) << "GpuGenerator: persistent_decode off for this model: " << fits.ToString();
      opt.persistent_decode = false;
    }
  }
  if (opt.persistent_decode) {
    GROVE_RETURN_IF_ERROR(Alloc(&step_layers, L));
    if (opt.persistent_stage_clock) {
      GROVE_RETURN_IF_ERROR(Alloc(&step_clock, 2 * kernels::kDecodeStepMaxMarks));
      h_step_clock.resize(2 * kernels::kDecodeStepMaxMarks);
    }
    step_ws_bytes = kernels::DecodeStepWorkspaceBytes(StepArgs());
    GROVE_RETURN_IF_ERROR(Alloc(reinterpret_cast<char**>(&step_ws), int64_t(step_ws_bytes)));
    // Zeroed once: the kernel leaves its barrier counters at zero.
    GEN_CUDA(cudaMemsetAsync(step_ws, 0, step_ws_bytes, stream));
  }
  size_t free_bytes = 0, total_bytes = 0;
  GEN_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  const size_t page_elems = size_t(opt.page_tokens) * kd;  // one layer's k (or v) of one page
  const size_t page_bytes = 2 * size_t(L) * page_elems * sizeof(bf16);
  const size_t want = size_t(double(free_bytes) * opt.kv_memory_fraction) / page_bytes;
  num_pages = int(std::min<size_t>(want, size_t(Bm) * max_pages_per_seq));
  if (num_pages < 1)
    return Status::ResourceExhausted("GpuGenerator: no GPU memory left for a single KV page (" +
                                     std::to_string(free_bytes) + " bytes free)");
  GROVE_RETURN_IF_ERROR(Alloc(&kv_pool, int64_t(num_pages) * int64_t(page_elems) * 2 * L));
  stats.kv_pages_total = num_pages;
  LOG(INFO) << "GpuGenerator: " << slots.size() << " weights, " << (arena >> 20) << " MiB weight arena, "
            << num_pages << " KV pages of " << opt.page_tokens << " tokens (" << ((size_t(num_pages) * page_bytes) >> 20)
            << " MiB), MoE workspace " << (moe_ws_bytes >> 20) << " MiB, shared experts folded: "
            << SharedExpertFoldName(S > 0 ? opt.fold_shared_experts : SharedExpertFold::kNever)
            << (S > 0 ? " (W2 block copies " + std::to_string((fold_block_bytes * M) >> 20) + " MiB)" : std::string());
  return Status::OK();
}

// fold_shared_experts: shared expert s as MoE expert E + s. W1/W3 are row
// slices of the stacked [W1; W3] slot; W2's column block s is copied, in its
// quantized form, into s_w2_blocks (stream-ordered after s_w2's quantization),
// so every folded weight holds exactly the values of the unfolded path. An
// int8 block keeps its row's scale (the same pointer); an int4 block's group
// scales are the matching [hidden, eh / 128] column block.
Status GpuGenerator::Impl::AppendFoldedSharedExperts(LayerWeights& w) {
  if (S == 0) return Status::OK();
  const int64_t eh = c.expert_hidden, Fs = S * eh;
  const QuantWeight& up = slots[w.s_w13].qw;
  const QuantWeight& down = slots[w.s_w2].qw;
  const QuantFormat f = down.format;
  const size_t row_bytes = kernels::QuantDataBytes(f, 1, Fs), block_bytes = kernels::QuantDataBytes(f, 1, eh);
  const int64_t row_scales = kernels::QuantScaleCount(QuantFormat::kInt4, 1, Fs);
  const int64_t block_scales = kernels::QuantScaleCount(QuantFormat::kInt4, 1, eh);
  for (int64_t s = 0; s < S; ++s) {
    w.h_w1.push_back(RowSlice(up, s * eh, eh));
    w.h_w3.push_back(RowSlice(up, Fs + s * eh, eh));
    QuantWeight blk;
    blk.format = f;
    blk.n = int32_t(H);
    blk.k = int32_t(eh);
    uint8_t* dst = w.s_w2_blocks + size_t(s) * size_t(H) * block_bytes;
    GEN_CUDA(cudaMemcpy2DAsync(dst, block_bytes, static_cast<const uint8_t*>(down.data) + s * block_bytes, row_bytes,
                               block_bytes, size_t(H), cudaMemcpyDeviceToDevice, stream));
    blk.data = dst;
    if (f == QuantFormat::kInt8) {
      blk.scales = down.scales;
    } else if (f == QuantFormat::kInt4) {
      float* sdst = w.s_w2_block_scales + s * H * block_scales;
      GEN_CUDA(cudaMemcpy2DAsync(sdst, block_scales * sizeof(float), down.scales + s * block_scales,
                                 row_scales * sizeof(float), block_scales * sizeof(float), size_t(H),
                                 cudaMemcpyDeviceToDevice, stream));
      blk.scales = sdst;
    }
    w.h_w2.push_back(blk);
  }
  return Status::OK();
}

// The one-row step's arguments; the layer table is uploaded by
// UploadStepLayers after each LoadWeights (formats change there).
kernels::DecodeStepArgs GpuGenerator::Impl::StepArgs() const {
  kernels::DecodeStepArgs a;
  a.layers = step_layers;
  a.num_layers = int(c.layers);
  a.hidden = int(H);
  a.heads = int(c.heads);
  a.kv_heads = int(c.kv_heads);
  a.head_dim = int(c.head_dim);
  a.vocab = int(V);
  a.experts = M > 0 ? int(E) : 0;
  a.top_k = M > 0 ? int(K) : 0;
  a.shared_experts = M > 0 ? int(S) : 0;
  a.expert_hidden = int(c.expert_hidden);
  a.dense_hidden = c.dense_layers > 0 ? int(c.dense_hidden) : 0;
  a.norm_eps = float(c.norm_eps);
  a.sigmoid = c.score_func == model::ScoreFunc::kSigmoid;
  a.norm_topk = c.norm_topk;
  a.route_scale = float(c.route_scale);
  a.token = d_tokens;
  a.row = kernels::PagedRows{d_slot, d_pos, 1};
  a.max_pos = int(c.max_seq_len);
  a.embed = embed;
  a.rope_cos = rope_cos;
  a.rope_sin = rope_sin;
  a.final_norm = final_norm;
  if (lm_head >= 0) a.lm_head = slots[lm_head].qw;
  a.x = x;
  a.logits = logits;
  a.router_scores = rscores;
  a.ids = S > 0 ? fold_ids : ids;
  a.gates = S > 0 ? fold_gates : gates;
  a.workspace = step_ws;
  a.workspace_bytes = step_ws_bytes;
  a.stage_clock = step_clock;
  return a;
}

Status GpuGenerator::Impl::UploadStepLayers() {
  if (!step_layers) return Status::OK();
  std::vector<kernels::DecodeStepLayer> table(size_t(c.layers));
  for (int64_t l = 0; l < c.layers; ++l) {
    const LayerWeights& w = lw[l];
    kernels::DecodeStepLayer& t = table[size_t(l)];
    t.qkv = slots[w.qkv].qw;
    t.wo = slots[w.wo].qw;
    t.attn_norm = w.attn_norm;
    t.ffn_norm = w.ffn_norm;
    t.kv = KvCache(l);
    if (!c.is_moe_layer(l)) {
      t.moe = 0;
      t.w13 = slots[w.w13].qw;
      t.w2 = slots[w.w2].qw;
      continue;
    }
    t.moe = 1;
    t.router = slots[w.router].qw;
    t.router_bias = w.router_bias;
    t.expert_w1 = w.d_w1;
    t.expert_w3 = w.d_w3;
    t.expert_w2 = w.d_w2;
    t.routes = routes + c.moe_index(l) * K;
  }
  GEN_CUDA(cudaMemcpy(step_layers, table.data(), table.size() * sizeof(kernels::DecodeStepLayer),
                      cudaMemcpyHostToDevice));
  return Status::OK();
}

kernels::PagedKvCache GpuGenerator::Impl::KvCache(int64_t l) const {
  const size_t page_layer = size_t(num_pages) * opt.page_tokens * kd;
  kernels::PagedKvCache kv;
  kv.k = kv_pool ? kv_pool + (2 * l) * page_layer : nullptr;
  kv.v = kv_pool ? kv_pool + (2 * l + 1) * page_layer : nullptr;
  kv.page_table = d_page_table;
  kv.num_pages = num_pages;
  kv.page_tokens = opt.page_tokens;
  kv.max_pages_per_seq = max_pages_per_seq;
  kv.kv_heads = int(c.kv_heads);
  kv.head_dim = int(c.head_dim);
  return kv;
}

Status GpuGenerator::Impl::Forward(int rows, int n_logits, bool gather_last) {
  if (Persistent(rows, gather_last)) return kernels::DecodeStepOneRow(StepArgs(), stream);
  kernels::PagedRows pr{d_slot, d_pos, rows};
  // A one-row decode step may fuse each RMSNorm into the linear after it.
  const bool fuse_norm = opt.fuse_rmsnorm && rows == 1 && !gather_last;
  // This forward's routing rows: K router columns, then with the fold the
  // S constant shared-expert columns.
  const bool fold = Folds(rows);
  const int64_t route_width = fold ? KS : K;
  uint16_t* const route_ids = fold ? fold_ids : ids;
  float* const route_gates = fold ? fold_gates : gates;
  GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kInputs));
  GROVE_RETURN_IF_ERROR(gpu::EmbedRows(d_tokens, embed, x, rows, int(V), int(H), stream));
  // fuse_combine_norm: the MoE combine before has already written h = the
  // next RMSNorm of x (the next layer's attention norm, or the final norm).
  bool normed_ahead = false;
  // Decode steps (one row per sequence, at most max_batch rows) split the
  // keys through PagedAttentionSplit's policy; prefill rows
  // (split_kv_prefill) through the tiled kernel at 64-key chunks, bounded
  // by the longest prompt, as many rows a launch as the workspace holds at
  // that bound (at least kPrefillSplitRows: sized so at Build).
  const bool split = opt.split_kv_attention && !gather_last;
  const bool split_prefill = opt.split_kv_attention && opt.split_kv_prefill && gather_last && prefill_bound > 0;
  const int prefill_group =
      split_prefill ? int(std::max<size_t>(1, attn_ws_bytes / kernels::PagedAttentionSplitWorkspaceBytesAt(
                                                                 KvCache(0), 1, int(c.heads), prefill_bound,
                                                                 kPrefillSplitChunkTokens)))
                    : 0;
  for (int64_t l = 0; l < c.layers; ++l) {
    LayerWeights& w = lw[l];
    const kernels::PagedKvCache kv = KvCache(l);
    if (fuse_norm) {
      GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kQkvLinear));
      GROVE_RETURN_IF_ERROR(LinearNormed(w.attn_norm, nullptr, w.qkv, qkv, Accumulate::kOverwrite));
    } else {
      if (!normed_ahead) {
        GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kNorms));
        GROVE_RETURN_IF_ERROR(gpu::RmsNormRows(x, w.attn_norm, h, rows, int(H), float(c.norm_eps), stream));
      }
      normed_ahead = false;
      GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kQkvLinear));
      GROVE_RETURN_IF_ERROR(Linear(h, H, rows, w.qkv, qkv, qd + 2 * kd, Accumulate::kOverwrite));
    }
    // fuse_append_attention: the decode split pass ropes and appends itself.
    const kernels::PagedFusedAppend fused_append{qkv, qd + 2 * kd, rope_cos, rope_sin};
    const kernels::PagedFusedAppend* split_append = split && opt.fuse_append_attention ? &fused_append : nullptr;
    if (split_append == nullptr) {
      GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kRopeAppend));
      GROVE_RETURN_IF_ERROR(
          kernels::PagedKvAppend(kv, pr, int(c.heads), qkv, qd + 2 * kd, rope_cos, rope_sin, q, stream));
    }
    GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kAttention));
    if (split) {
      GROVE_RETURN_IF_ERROR((opt.split_kv_tiled ? kernels::PagedAttentionSplit : kernels::PagedAttentionSplitWalk)(
          kv, pr, int(c.heads), q, attn, 0.f, AttnMaxPos(), attn_ws, attn_ws_bytes, stream, split_append));
    } else if (split_prefill) {
      for (int r0 = 0; r0 < rows; r0 += prefill_group) {
        const kernels::PagedRows sub{d_slot + r0, d_pos + r0, std::min(prefill_group, rows - r0)};
        GROVE_RETURN_IF_ERROR(kernels::PagedAttentionSplitAt(
            kv, sub, int(c.heads), q + int64_t(r0) * qd, attn + int64_t(r0) * qd, 0.f, prefill_bound, attn_ws,
            attn_ws_bytes, stream, nullptr, kPrefillSplitChunkTokens, kernels::PagedChunkKernel::kTiled));
      }
    } else {
      GROVE_RETURN_IF_ERROR(kernels::PagedAttention(kv, pr, int(c.heads), q, attn, 0.f, stream));
    }
    GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kWo));
    GROVE_RETURN_IF_ERROR(Linear(attn, qd, rows, w.wo, x, H, Accumulate::kAdd));
    if (!fuse_norm) {
      GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kNorms));
      GROVE_RETURN_IF_ERROR(gpu::RmsNormRows(x, w.ffn_norm, h, rows, int(H), float(c.norm_eps), stream));
    }
    if (!c.is_moe_layer(l)) {
      GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kDenseFfn));
      GROVE_RETURN_IF_ERROR(Ffn(rows, w.w13, w.w2, c.dense_hidden, fuse_norm ? w.ffn_norm : nullptr));
      continue;
    }
    const int64_t mi = c.moe_index(l);
    // shared_experts_stream: the shared experts fork off once h (the normed
    // row) is written -- by the norm above, or with fuse_norm by the router's
    // kernel -- and join before the MoE's combine, the first kernel after
    // them that writes x (the shared W2 adds into x first, as in one lane).
    const bool shared_on_side = SharedOnSide(rows);
    auto fork_shared_experts = [&]() -> Status {
      GEN_CUDA(cudaEventRecord(fork_event, stream));
      GEN_CUDA(cudaStreamWaitEvent(side_stream, fork_event, 0));
      const Lane side = SideLane();
      GROVE_RETURN_IF_ERROR(Ffn(rows, w.s_w13, w.s_w2, c.shared_experts * c.expert_hidden, nullptr, &side));
      GEN_CUDA(cudaEventRecord(join_event, side_stream));
      return Status::OK();
    };
    if (shared_on_side && !fuse_norm) GROVE_RETURN_IF_ERROR(fork_shared_experts());
    GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kRouter));
    kernels::RouterArgs ra;
    ra.logits = rlogits;
    ra.bias = w.router_bias;
    ra.scores = rscores;
    ra.ids = route_ids;
    ra.gates = route_gates;
    ra.tokens = rows;
    ra.experts = int(E);
    ra.top_k = int(K);
    ra.sigmoid = c.score_func == model::ScoreFunc::kSigmoid;
    ra.norm_topk = c.norm_topk;
    ra.route_scale = float(c.route_scale);
    ra.out_stride = int(route_width);
    if (opt.router_writes_routes) {
      ra.ids_copy = routes + mi * K;
      ra.ids_copy_stride = int(M * K);
    }
    // Fused: the router's kernel writes h (the normed row) for the shared
    // experts and the MoE after it, and with fuse_router_topk also routes.
    if (fuse_norm && opt.fuse_router_topk) {
      const kernels::RouterTail tail{ra, route_counter};
      GROVE_RETURN_IF_ERROR(LinearNormed(w.ffn_norm, h, w.router, rlogits, Accumulate::kOverwrite, &tail));
    } else {
      if (fuse_norm)
        GROVE_RETURN_IF_ERROR(LinearNormed(w.ffn_norm, h, w.router, rlogits, Accumulate::kOverwrite));
      else
        GROVE_RETURN_IF_ERROR(Linear(h, H, rows, w.router, rlogits, E, Accumulate::kOverwrite));
      GROVE_RETURN_IF_ERROR(kernels::RouterTopK(ra, stream));
    }
    if (!opt.router_writes_routes)
      GEN_CUDA(cudaMemcpy2DAsync(routes + mi * K, M * K * sizeof(uint16_t), route_ids,
                                 route_width * sizeof(uint16_t), K * sizeof(uint16_t), rows, cudaMemcpyDeviceToDevice,
                                 stream));
    if (shared_on_side && fuse_norm) GROVE_RETURN_IF_ERROR(fork_shared_experts());
    GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kSharedExperts));
    if (c.shared_experts > 0 && !fold && !shared_on_side)
      GROVE_RETURN_IF_ERROR(Ffn(rows, w.s_w13, w.s_w2, c.shared_experts * c.expert_hidden));
    kernels::MoeDecodeArgs ma;
    ma.x = h;
    ma.ids = route_ids;
    ma.gates = route_gates;
    ma.w1 = w.d_w1;
    ma.w3 = w.d_w3;
    ma.w2 = w.d_w2;
    ma.out = x;
    ma.mode = Accumulate::kAdd;
    ma.m = rows;
    ma.hidden = int(H);
    ma.expert_hidden = int(c.expert_hidden);
    ma.experts = int(fold ? E + S : E);
    ma.top_k = int(route_width);
    ma.workspace = moe_ws;
    ma.workspace_bytes = moe_ws_bytes;
    ma.one_launch_index = opt.one_launch_moe_index;
    ma.widest_format = w.experts_widest;
    ma.mma_min_slots_per_expert = opt.moe_mma_min_slots_per_expert;
    ma.mma_tiles_per_block = w.routed_widest != QuantFormat::kBF16 && opt.moe_mma_tiles_per_block_narrow != 0
                                 ? opt.moe_mma_tiles_per_block_narrow
                                 : opt.moe_mma_tiles_per_block;
    ma.mma_paired_up_max_tokens = opt.moe_mma_paired_up_max_tokens;
    ma.combine_after = shared_on_side ? join_event : nullptr;
    ma.mma_prefetch_rows = opt.moe_prefetch_rows;
    if (!fuse_norm && opt.fuse_combine_norm) {
      // h (the MoE's input) is free once the down stage and the shared
      // experts are done, which the combine waits for.
      ma.norm_weight = l + 1 < c.layers ? lw[l + 1].attn_norm : final_norm;
      ma.normed = h;
      ma.norm_eps = float(c.norm_eps);
      normed_ahead = true;
    }
    if (timing) {
      GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kMoeRouteIndex));
      GROVE_ASSIGN_OR_RETURN(ma.stage_events,
                             timer.Take({DecodePhase::kMoeUp, DecodePhase::kMoeDown, DecodePhase::kMoeCombine}));
    }
    GROVE_RETURN_IF_ERROR(kernels::MoeDecodeForward(ma, stream));
  }
  if (fuse_norm) {
    GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kLmHead));
    return LinearNormed(final_norm, nullptr, lm_head, logits, Accumulate::kOverwrite);
  }
  if (!normed_ahead) {
    GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kNorms));
    GROVE_RETURN_IF_ERROR(gpu::RmsNormRows(x, final_norm, h, rows, int(H), float(c.norm_eps), stream));
  }
  GROVE_RETURN_IF_ERROR(Mark(DecodePhase::kLmHead));
  const bf16* src = h;
  if (gather_last) {
    GROVE_RETURN_IF_ERROR(gpu::GatherRows(h, d_last, h_last, n_logits, int(H), stream));
    src = h_last;
  }
  return Linear(src, H, n_logits, lm_head, logits, V, Accumulate::kOverwrite);
}

Status GpuGenerator::Impl::RunDecode(int bucket) {
  // The decode step's kernels, captured or eager, may start early (PDL);
  // sampling and the copies after it launch as before.
  const kernels::ScopedProgrammaticLaunch pdl(opt.programmatic_launch);
  if (opt.cuda_graphs && !opt.profile_decode && !graphs_failed) {
    const int key = 2 * bucket + (short_context ? 1 : 0);
    auto it = graphs.find(key);
    if (it == graphs.end()) {
      GEN_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
      const Status fwd = Forward(bucket, bucket, false);
      cudaGraph_t graph = nullptr;
      const cudaError_t end = cudaStreamEndCapture(stream, &graph);
      cudaGraphExec_t exec = nullptr;
      cudaError_t inst = cudaErrorUnknown;
      if (fwd.ok() && end == cudaSuccess && graph) inst = cudaGraphInstantiate(&exec, graph, 0);
      if (graph) cudaGraphDestroy(graph);
      if (!fwd.ok() || end != cudaSuccess || inst != cudaSuccess) {
        cudaGetLastError();  // clear the capture's error; eager from now on
        graphs_failed = true;
        LOG(WARNING) << "GpuGenerator: CUDA graph capture of the decode step failed ("
                     << (fwd.ok() ? cudaGetErrorString(end != cudaSuccess ? end : inst) : fwd.ToString())
                     << "); running it eagerly";
      } else {
        it = graphs.emplace(key, exec).first;
        graph_formats = Formats();
      }
    }
    if (it != graphs.end()) {
      GEN_CUDA(cudaGraphLaunch(it->second, stream));
      stats.graphs_used = true;
      return Status::OK();
    }
  }
  return Forward(bucket, bucket, false);
}

Status GpuGenerator::Impl::Sample(int n, const model::SamplingOptions& o) {
  kernels::SamplingParams sp;
  sp.temperature = float(o.temperature);
  sp.top_p = float(o.top_p);
  sp.top_k = int(std::min<int64_t>(o.top_k, V));
  sp.seed = o.seed;
  GROVE_RETURN_IF_ERROR(kernels::SampleTokens(logits, n, int(V), V, sp, d_seq, d_step, d_out_tok, d_out_lp, stream));
  GEN_CUDA(cudaMemcpyAsync(h_out_tok, d_out_tok, n * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  GEN_CUDA(cudaMemcpyAsync(h_out_lp, d_out_lp, n * sizeof(float), cudaMemcpyDeviceToHost, stream));
  return Status::OK();
}

int GpuGenerator::DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

GpuGenerator::GpuGenerator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuGenerator::~GpuGenerator() = default;

Result<std::unique_ptr<GpuGenerator>> GpuGenerator::Create(const model::ModelConfig& config,
                                                           const GpuGeneratorOptions& options) {
  GROVE_RETURN_IF_ERROR(config.Validate());
  if (config.head_dim != 32 && config.head_dim != 64 && config.head_dim != 128)
    return Status::InvalidArgument("GpuGenerator: head_dim must be 32, 64 or 128 (paged attention)");
  if (config.heads % config.kv_heads != 0 || config.heads / config.kv_heads > kernels::kPagedMaxGroup)
    return Status::InvalidArgument("GpuGenerator: at most " + std::to_string(kernels::kPagedMaxGroup) +
                                   " query heads per kv head");
  if (config.experts > kernels::kRouterMaxExperts || config.top_k > kernels::kRouterMaxTopK)
    return Status::InvalidArgument("GpuGenerator: experts <= 256 and top_k <= 16 (router kernel)");
  if (config.hidden % 8 != 0) return Status::InvalidArgument("GpuGenerator: hidden must be a multiple of 8");
  if (options.fold_shared_experts != SharedExpertFold::kNever && config.experts > 0 && config.shared_experts > 0 &&
      (config.top_k + config.shared_experts > 16 || config.experts + config.shared_experts > 256))
    return Status::InvalidArgument(
        "GpuGenerator: fold_shared_experts needs top_k + shared_experts <= 16 and experts + shared_experts <= 256 "
        "(MoeDecodeForward's limits)");
  if (!kernels::ValidMoeMmaTilesPerBlock(options.moe_mma_tiles_per_block))
    return Status::InvalidArgument("GpuGenerator: moe_mma_tiles_per_block must be 1, 2 or 4, got " +
                                   std::to_string(options.moe_mma_tiles_per_block));
  if (options.moe_mma_tiles_per_block_narrow != 0 &&
      !kernels::ValidMoeMmaTilesPerBlock(options.moe_mma_tiles_per_block_narrow))
    return Status::InvalidArgument("GpuGenerator: moe_mma_tiles_per_block_narrow must be 0, 1, 2 or 4, got " +
                                   std::to_string(options.moe_mma_tiles_per_block_narrow));
  if (options.moe_mma_paired_up_max_tokens < 0)
    return Status::InvalidArgument("GpuGenerator: moe_mma_paired_up_max_tokens must be >= 0, got " +
                                   std::to_string(options.moe_mma_paired_up_max_tokens));
  if (options.moe_mma_min_slots_per_expert < 0)
    return Status::InvalidArgument("GpuGenerator: moe_mma_min_slots_per_expert must be >= 0, got " +
                                   std::to_string(options.moe_mma_min_slots_per_expert));
  if (options.split_kv_short_context < 0)
    return Status::InvalidArgument("GpuGenerator: split_kv_short_context must be >= 0, got " +
                                   std::to_string(options.split_kv_short_context));
  if (options.fuse_router_topk && !options.fuse_rmsnorm)
    return Status::InvalidArgument("GpuGenerator: fuse_router_topk needs fuse_rmsnorm (it routes in the fused kernel)");
  if (options.gemv_rows_per_warp != 0 && options.gemv_rows_per_warp != 1 && options.gemv_rows_per_warp != 2 &&
      options.gemv_rows_per_warp != 4)
    return Status::InvalidArgument("GpuGenerator: gemv_rows_per_warp must be 0 (default), 1, 2 or 4");
  if (options.max_batch < 1 || options.page_tokens < 1 || !(options.kv_memory_fraction > 0.0) ||
      options.kv_memory_fraction > 1.0)
    return Status::InvalidArgument("GpuGenerator: max_batch and page_tokens >= 1, kv_memory_fraction in (0, 1]");
  int count = DeviceCount();
  if (options.device < 0 || options.device >= count)
    return Status::FailedPrecondition("GpuGenerator: no CUDA device " + std::to_string(options.device) + " (" +
                                      std::to_string(count) + " present)");
  GEN_CUDA(cudaSetDevice(options.device));
  auto impl = std::make_unique<Impl>();
  impl->c = config;
  impl->layout = model::ParamLayout(config);
  impl->opt = options;
  GEN_CUDA(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking));
  if (options.shared_experts_stream && config.experts > 0 && config.shared_experts > 0) {
    GEN_CUDA(cudaStreamCreateWithFlags(&impl->side_stream, cudaStreamNonBlocking));
    GEN_CUDA(cudaEventCreateWithFlags(&impl->fork_event, cudaEventDisableTiming));
    GEN_CUDA(cudaEventCreateWithFlags(&impl->join_event, cudaEventDisableTiming));
  }
  // A cuBLAS handle per lane, each with its own workspace so that graph
  // capture allocates nothing and the lanes' GEMMs never share scratch.
  auto make_cublas = [&](cudaStream_t s, cublasHandle_t* handle) -> Status {
    if (cublasCreate(handle) != CUBLAS_STATUS_SUCCESS) return Status::Internal("GpuGenerator: cublasCreate failed");
    constexpr int64_t kCublasWorkspaceBytes = int64_t{32} << 20;
    void* ws = nullptr;
    GROVE_RETURN_IF_ERROR(impl->Alloc(reinterpret_cast<char**>(&ws), kCublasWorkspaceBytes));
    if (cublasSetStream(*handle, s) != CUBLAS_STATUS_SUCCESS ||
        cublasSetWorkspace(*handle, ws, kCublasWorkspaceBytes) != CUBLAS_STATUS_SUCCESS)
      return Status::Internal("GpuGenerator: cuBLAS stream or workspace");
    return Status::OK();
  };
  if (options.cublas_min_rows > 0) {
    GROVE_RETURN_IF_ERROR(make_cublas(impl->stream, &impl->cublas));
    if (impl->side_stream != nullptr) GROVE_RETURN_IF_ERROR(make_cublas(impl->side_stream, &impl->side_cublas));
  }
  GROVE_RETURN_IF_ERROR(impl->Build());
  return std::unique_ptr<GpuGenerator>(new GpuGenerator(std::move(impl)));
}

Result<double> GpuGenerator::LoadWeights(std::span<const float> params, const FormatChooser& choose) {
  if (int64_t(params.size()) != impl_->layout.total())
    return Status::InvalidArgument("LoadWeights: " + std::to_string(params.size()) + " floats, the layout has " +
                                   std::to_string(impl_->layout.total()));
  return impl_->Load(params.data(), /*on_device=*/false, choose);
}

Result<double> GpuGenerator::LoadWeightsFromDevice(const float* params, const FormatChooser& choose) {
  if (!params) return Status::InvalidArgument("LoadWeightsFromDevice: null params");
  return impl_->Load(params, /*on_device=*/true, choose);
}

Result<double> GpuGenerator::Impl::Load(const float* params, bool on_device, const FormatChooser& choose) {
  Impl& g = *this;
  const auto t0 = Clock::now();
  const cudaMemcpyKind kind = on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice;
  GEN_CUDA(cudaSetDevice(g.opt.device));
  // Formats first, so a bad choice changes nothing.
  std::vector<QuantFormat> formats(g.slots.size(), QuantFormat::kBF16);
  for (size_t i = 0; i < g.slots.size(); ++i) {
    const WeightSlot& s = g.slots[i];
    if (!s.choosable || !choose) continue;
    for (size_t j = 0; j < s.parts.size(); ++j) {
      const model::TensorInfo& t = *s.parts[j];
      const actors::TensorSpec spec{t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)};
      const std::optional<PrecisionFormat> f = choose(spec);
      const QuantFormat q = f ? ToQuant(*f) : QuantFormat::kBF16;
      if (j > 0 && q != formats[i])
        return Status::InvalidArgument("LoadWeights: " + t.name + " must have the format of " + s.parts[0]->name +
                                       " (the engine runs them as one stacked weight)");
      formats[i] = q;
    }
  }
  auto put = [&](float* dst, const std::string& name) -> Status {
    const model::TensorInfo* t = g.layout.Find(name);
    return Cuda(cudaMemcpyAsync(dst, params + t->offset, t->numel * sizeof(float), kind,
                                g.stream),
                "upload");
  };
  GROVE_RETURN_IF_ERROR(put(g.embed, "embed"));
  GROVE_RETURN_IF_ERROR(put(g.final_norm, "norm"));
  for (int64_t l = 0; l < g.c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    GROVE_RETURN_IF_ERROR(put(g.lw[l].attn_norm, p + "attn_norm"));
    GROVE_RETURN_IF_ERROR(put(g.lw[l].ffn_norm, p + "ffn_norm"));
    if (g.c.is_moe_layer(l)) GROVE_RETURN_IF_ERROR(put(g.lw[l].router_bias, p + "moe.router_bias"));
  }
  // Quantized weights: contiguous runs of the layout through the staging
  // buffer (stream order keeps a run's quantization before the next upload).
  std::vector<size_t> order(g.slots.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return g.slots[a].offset < g.slots[b].offset; });
  for (size_t i = 0; i < order.size();) {
    const int64_t start = g.slots[order[i]].offset;
    int64_t end = start;
    size_t j = i;
    while (j < order.size()) {
      const WeightSlot& s = g.slots[order[j]];
      const int64_t e = s.offset + s.n * s.k;
      if (e - start > g.staging_floats) break;
      end = std::max(end, e);
      ++j;
    }
    if (j == i) return Status::Internal("LoadWeights: " + g.slots[order[i]].name + " exceeds the staging buffer");
    // On the device the weights are quantized where they are.
    const float* src = params + start;
    if (!on_device) {
      GEN_CUDA(cudaMemcpyAsync(g.staging, params + start, (end - start) * sizeof(float), cudaMemcpyHostToDevice,
                               g.stream));
      src = g.staging;
    }
    for (size_t t = i; t < j; ++t) {
      WeightSlot& s = g.slots[order[t]];
      const QuantFormat f = formats[order[t]];
      GROVE_RETURN_IF_ERROR(
          kernels::QuantizeWeight(src + (s.offset - start), s.n, s.k, f, s.data, s.scales, g.stream));
      s.qw.format = f;
      s.qw.n = int32_t(s.n);
      s.qw.k = int32_t(s.k);
      s.qw.data = s.data;
      s.qw.scales = f == QuantFormat::kBF16 ? nullptr : s.scales;
    }
    i = j;
  }
  // The int4 linears' bf16 roundings for cuBLAS (cublas_min_rows).
  if (g.cublas != nullptr) {
    std::vector<int> linears = {g.lm_head};
    for (const LayerWeights& w : g.lw)
      for (int slot : {w.qkv, w.wo, w.w13, w.w2, w.router, w.s_w13, w.s_w2}) linears.push_back(slot);
    for (int slot : linears) {
      if (slot < 0) continue;
      WeightSlot& s = g.slots[slot];
      // int4 only: its group scales cannot be applied after the GEMM, and
      // next to its quantization step the bf16 rounding of q * scale is
      // small (int8's step is 18x finer: int8 linears stay on QuantLinear,
      // whose sums of q * scale are exact, as the CPU's).
      if (s.qw.format != QuantFormat::kInt4) continue;
      if (s.dequant == nullptr && !g.Alloc(&s.dequant, s.n * s.k).ok()) {
        // No room (the KV pool took its share of free memory at Create):
        // this linear stays on QuantLinear at every size.
        cudaGetLastError();
        LOG(WARNING) << "GpuGenerator: no memory for the bf16 copy of " << s.name << " (" << s.n * s.k * 2
                     << " bytes); its large calls stay on QuantLinear";
        continue;
      }
      GROVE_RETURN_IF_ERROR(kernels::DequantizeToBf16(s.qw, s.dequant, g.stream));
    }
  }
  for (int64_t l = 0; l < g.c.layers; ++l) {
    LayerWeights& w = g.lw[l];
    if (!g.c.is_moe_layer(l)) continue;
    w.h_w1.clear();
    w.h_w3.clear();
    w.h_w2.clear();
    for (int64_t e = 0; e < g.E; ++e) {
      if (g.slots[w.e_w1[e]].qw.format != g.slots[w.e_w3[e]].qw.format)
        return Status::InvalidArgument("LoadWeights: " + g.slots[w.e_w1[e]].name + " and w3 must share a format");
      w.h_w1.push_back(g.slots[w.e_w1[e]].qw);
      w.h_w3.push_back(g.slots[w.e_w3[e]].qw);
      w.h_w2.push_back(g.slots[w.e_w2[e]].qw);
    }
    // kBF16 < kInt8 < kInt4: the widest format is the smallest value.
    w.routed_widest = QuantFormat::kInt4;
    for (const auto* v : {&w.h_w1, &w.h_w2})
      for (const QuantWeight& q : *v) w.routed_widest = std::min(w.routed_widest, q.format);
    GROVE_RETURN_IF_ERROR(g.AppendFoldedSharedExperts(w));
    w.experts_widest = QuantFormat::kInt4;
    for (const auto* v : {&w.h_w1, &w.h_w2})
      for (const QuantWeight& q : *v) w.experts_widest = std::min(w.experts_widest, q.format);
    const size_t count = size_t(g.E + g.S);
    GEN_CUDA(cudaMemcpyAsync(w.d_w1, w.h_w1.data(), count * sizeof(QuantWeight), cudaMemcpyHostToDevice, g.stream));
    GEN_CUDA(cudaMemcpyAsync(w.d_w3, w.h_w3.data(), count * sizeof(QuantWeight), cudaMemcpyHostToDevice, g.stream));
    GEN_CUDA(cudaMemcpyAsync(w.d_w2, w.h_w2.data(), count * sizeof(QuantWeight), cudaMemcpyHostToDevice, g.stream));
  }
  GEN_CUDA(cudaStreamSynchronize(g.stream));
  GROVE_RETURN_IF_ERROR(g.UploadStepLayers());
  // A captured decode graph holds the non-expert weights' QuantWeight by
  // value; buffers never move, so only a format change invalidates it.
  if (!g.graphs.empty() && g.Formats() != g.graph_formats) g.DropGraphs();
  g.loaded = true;
  return Since(t0);
}

Result<std::vector<model::Completion<float>>> GpuGenerator::Generate(const std::vector<std::vector<int32_t>>& prompts,
                                                                     const model::SamplingOptions& opt) {
  Impl& g = *impl_;
  const model::ModelConfig& c = g.c;
  const int64_t MK = g.M * g.K;
  GROVE_RETURN_IF_ERROR(model::ValidateGenerateRequests(c, prompts, opt));
  if (!g.loaded) return Status::FailedPrecondition("GpuGenerator: Generate before LoadWeights");
  GEN_CUDA(cudaSetDevice(g.opt.device));
  g.timing = false;  // set only inside a decode step
  const size_t B = prompts.size();
  std::vector<model::Completion<float>> out(B);
  if (B == 0) return out;

  KvPageTable kv(g.opt.max_batch, g.num_pages, g.opt.page_tokens, g.max_pages_per_seq);
  std::vector<int> pages_needed(B);
  for (size_t i = 0; i < B; ++i) {
    const int64_t L = int64_t(prompts[i].size());
    const int64_t cap = std::min<int64_t>(opt.max_new_tokens, c.max_seq_len - L);
    // Positions written: the prompt, then every generated token but the last.
    pages_needed[i] = kv.PagesFor(std::max<int64_t>(L, L + cap - 1));
    if (pages_needed[i] > g.num_pages)
      return Status::ResourceExhausted("prompt " + std::to_string(i) + " needs " + std::to_string(pages_needed[i]) +
                                       " KV pages, the pool has " + std::to_string(g.num_pages));
  }
  std::deque<int> waiting;
  for (size_t i = 0; i < B; ++i) waiting.push_back(int(i));
  std::vector<Seq> running;

  auto retire = [&](Seq& s) { kv.Release(s.slot); };
  // Records a sampled token; false when the sequence is finished.
  auto accept = [&](Seq& s, int32_t tok, float lp) {
    model::Completion<float>& o = out[s.idx];
    o.tokens.push_back(tok);
    o.logprobs.push_back(lp);
    ++s.len;
    ++g.stats.generated_tokens;
    if (std::find(opt.stop_tokens.begin(), opt.stop_tokens.end(), tok) != opt.stop_tokens.end()) {
      o.finish = model::FinishReason::kStop;
      return false;
    }
    if (int64_t(o.tokens.size()) >= opt.max_new_tokens || s.len >= c.max_seq_len) {
      o.finish = model::FinishReason::kLength;
      return false;
    }
    s.pending = tok;
    return true;
  };

  while (!waiting.empty() || !running.empty()) {
    // Admission.
    std::vector<Seq> admitted;
    int rows = 0;
    while (!waiting.empty()) {
      const int i = waiting.front();
      const int L = int(prompts[i].size());
      if (rows + L > g.max_rows) break;
      const std::optional<int> slot = kv.Admit(pages_needed[i]);
      if (!slot) break;
      waiting.pop_front();
      Seq s;
      s.idx = i;
      s.slot = *slot;
      s.len = L;
      for (int t = 0; t < L; ++t) {
        g.h_tokens[rows + t] = prompts[i][t];
        g.h_slot[rows + t] = s.slot;
        g.h_pos[rows + t] = t;
      }
      const int a = int(admitted.size());
      g.h_lastrow[a] = rows + L - 1;
      g.prefill_bound = a == 0 ? L : std::max(g.prefill_bound, L);
      g.h_seq[a] = i;
      g.h_step[a] = 0;
      rows += L;
      admitted.push_back(std::move(s));
    }
    g.stats.kv_pages_peak = std::max<int64_t>(g.stats.kv_pages_peak, kv.peak_pages());
    if (admitted.empty() && running.empty())
      return Status::Internal("GpuGenerator: nothing admitted with every slot and page free");

    if (!admitted.empty()) {
      const auto t0 = Clock::now();
      const int n = int(admitted.size());
      GEN_CUDA(cudaMemcpyAsync(g.d_page_table, kv.table().data(), kv.table().size() * sizeof(int32_t),
                               cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_tokens, g.h_tokens, rows * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_slot, g.h_slot, rows * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_pos, g.h_pos, rows * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_last, g.h_lastrow, n * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_seq, g.h_seq, n * sizeof(int64_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_step, g.h_step, n * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GROVE_RETURN_IF_ERROR(g.Forward(rows, n, /*gather_last=*/true));
      if (MK > 0)
        GEN_CUDA(cudaMemcpyAsync(g.h_routes, g.routes, size_t(rows) * MK * sizeof(uint16_t), cudaMemcpyDeviceToHost,
                                 g.stream));
      GROVE_RETURN_IF_ERROR(g.Sample(n, opt));
      GEN_CUDA(cudaStreamSynchronize(g.stream));
      int row0 = 0;
      for (int a = 0; a < n; ++a) {
        Seq& s = admitted[a];
        const int L = int(prompts[s.idx].size());
        out[s.idx].routes.assign(g.h_routes + int64_t(row0) * MK, g.h_routes + int64_t(row0 + L) * MK);
        row0 += L;
        if (opt.max_new_tokens == 0 || !accept(s, g.h_out_tok[a], g.h_out_lp[a])) {
          retire(s);
        } else {
          running.push_back(std::move(s));
        }
      }
      g.stats.prefill_tokens += rows;
      g.stats.prefill_seconds += Since(t0);
    }

    if (!running.empty()) {
      const auto t0 = Clock::now();
      const int n = int(running.size());
      int bucket = 1;
      while (bucket < n) bucket *= 2;
      bucket = std::min(bucket, g.opt.max_batch);
      int64_t longest = 0;  // the largest pos + 1 of the step's rows
      for (int a = 0; a < bucket; ++a) {
        const bool real = a < n;
        g.h_tokens[a] = real ? running[a].pending : 0;
        g.h_slot[a] = real ? running[a].slot : -1;
        g.h_pos[a] = real ? int32_t(running[a].len - 1) : 0;
        if (real) {
          g.h_seq[a] = running[a].idx;
          g.h_step[a] = int32_t(out[running[a].idx].tokens.size());
          longest = std::max<int64_t>(longest, running[a].len);
        }
      }
      g.short_context = g.ShortContexts() && longest <= g.opt.split_kv_short_context;
      // The device page table is current: only admissions change a live
      // slot's entries, and the prefill uploaded them.
      g.timing = g.opt.profile_decode;
      g.timer.Clear();
      GROVE_RETURN_IF_ERROR(g.Mark(DecodePhase::kInputs));
      GEN_CUDA(cudaMemcpyAsync(g.d_tokens, g.h_tokens, bucket * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_slot, g.h_slot, bucket * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_pos, g.h_pos, bucket * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_seq, g.h_seq, n * sizeof(int64_t), cudaMemcpyHostToDevice, g.stream));
      GEN_CUDA(cudaMemcpyAsync(g.d_step, g.h_step, n * sizeof(int32_t), cudaMemcpyHostToDevice, g.stream));
      GROVE_RETURN_IF_ERROR(g.RunDecode(bucket));
      const bool persistent = g.Persistent(bucket, false);
      if (persistent) ++g.stats.persistent_decode_steps;
      GROVE_RETURN_IF_ERROR(g.Mark(DecodePhase::kSampling));
      if (MK > 0)
        GEN_CUDA(cudaMemcpyAsync(g.h_routes, g.routes, size_t(n) * MK * sizeof(uint16_t), cudaMemcpyDeviceToHost,
                                 g.stream));
      GROVE_RETURN_IF_ERROR(g.Sample(n, opt));
      GROVE_RETURN_IF_ERROR(g.Mark(DecodePhase::kCount));
      g.timing = false;
      GEN_CUDA(cudaStreamSynchronize(g.stream));
      if (persistent && g.step_clock) GROVE_RETURN_IF_ERROR(g.AddStageClock());
      double gpu_span = 0;
      if (g.opt.profile_decode) {
        GROVE_ASSIGN_OR_RETURN(gpu_span, g.timer.Collect(&g.stats.decode_phase_seconds));
      }
      std::vector<Seq> still;
      for (int a = 0; a < n; ++a) {
        Seq& s = running[a];
        std::vector<uint16_t>& r = out[s.idx].routes;
        r.insert(r.end(), g.h_routes + int64_t(a) * MK, g.h_routes + int64_t(a + 1) * MK);
        if (accept(s, g.h_out_tok[a], g.h_out_lp[a]))
          still.push_back(std::move(s));
        else
          retire(s);
      }
      running = std::move(still);
      ++g.stats.decode_steps;
      const double wall = Since(t0);
      g.stats.decode_seconds += wall;
      if (g.opt.profile_decode)
        g.stats.decode_phase_seconds[int(DecodePhase::kHost)] += std::max(0.0, wall - gpu_span);
    }
  }
  return out;
}

const GpuGenerator::Stats& GpuGenerator::stats() const { return impl_->stats; }

}  // namespace grove::rollout
