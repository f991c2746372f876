// Transformer: the DeepSeek-style MoE decoder, exact fp32 on the CPU.
//
// Architecture per layer: x += Wo Attn(RoPE(Wq n1(x)), RoPE(Wk n1(x)), Wv n1(x));
// x += FFN(n2(x)), with RMSNorm n1/n2, causal grouped-query attention, and FFN
// a dense SwiGLU (first `dense_layers` layers) or the MoE block of moe.h.
// Logits = lm_head(norm(x)). RoPE rotates pairs (i, i + head_dim/2) by
// pos * rope_base^(-2i/head_dim), pos counted from 0 at the sequence start.
//
// Parameters: one flat buffer, layout and names in param_layout.h; the
// gradient buffer has the same layout.
//
// Routes: for every INPUT position of a sequence, top_k expert ids per MoE
// layer, flattened [position][moe layer][k] (uint16, as on the wire). A
// sequence of L tokens has L-1 input positions when scored (the last token is
// only a target) and all positions in generation's prompt prefill.
//
// Not thread-safe: one caller at a time (the model uses threads inside).
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "base/result.h"
#include "model/config.h"
#include "model/param_layout.h"

namespace grove::model {

// One sequence to score: log p(tokens[t] | tokens[0..t-1]) for t in
// [score_from, tokens.size()). score_from >= 1 (typically the prompt length).
struct ScoreRequest {
  std::vector<int32_t> tokens;
  int64_t score_from = 1;
  // Routing replay: when non-empty, routes for at least tokens.size()-1
  // input positions (extra rows ignored); the forward uses these experts
  // instead of its own top-k (gates still from the current scores).
  // From a rollout: the group's prompt routes followed by the sample's
  // routes (prompt.size() + completion.size() - 1 rows: exactly L-1).
  // Within one batch either every request replays or none does.
  std::vector<uint16_t> replay_routes;
};

// The checks Score() makes on a batch (InvalidArgument naming the request):
// shared by every implementation of Score (CPU and GPU).
Status ValidateScoreRequests(const ModelConfig& config, const std::vector<ScoreRequest>& batch);
// Its first half alone, the lengths (token counts, score_from, replayed-id
// counts; a few comparisons a request), for a Score that checks the values
// -- token ids in the vocabulary, replayed ids below the expert count -- as
// it copies them and calls ValidateScoreRequests for the message when one
// is out of range (the GPU's).
Status ValidateScoreShapes(const ModelConfig& config, const std::vector<ScoreRequest>& batch);

template <typename T>
struct ScoreResult {
  std::vector<std::vector<T>> logprobs;          // per request, tokens.size() - score_from values
  std::vector<std::vector<uint16_t>> routes;     // per request, [tokens.size()-1][moe_layers][top_k]
  std::vector<std::vector<int64_t>> expert_load;  // [moe layer][expert]: tokens routed in this forward
  double balance_loss = 0;                        // alpha * sum over sequences and MoE layers (0 if alpha==0)
};

struct SamplingOptions {
  double temperature = 1.0;  // 0: greedy (argmax)
  double top_p = 1.0;        // nucleus mass kept, in (0, 1]
  int64_t top_k = 0;         // 0: no top-k cut
  uint64_t seed = 0;         // same seed, prompts and weights -> same tokens
  std::vector<int32_t> stop_tokens;  // generation of a sequence ends after emitting one of these
  int64_t max_new_tokens = 64;       // also capped by max_seq_len - prompt length
};

// The checks Generate() makes on prompts and options (InvalidArgument naming
// the prompt): shared by every implementation of Generate (CPU and GPU).
Status ValidateGenerateRequests(const ModelConfig& config, const std::vector<std::vector<int32_t>>& prompts,
                                const SamplingOptions& options);

enum class FinishReason { kStop, kLength };

template <typename T>
struct Completion {
  std::vector<int32_t> tokens;   // completion tokens, the stop token included when hit
  // log softmax(logits)[token] at temperature 1 over the full vocabulary,
  // whatever temperature/top-p/top-k sampled it: equals (to fp32 rounding)
  // Score() of prompt+completion, so GRPO's ratios start at 1.
  std::vector<T> logprobs;
  // Prompt rows then one row per completion token except the last (which is
  // never fed back): prompt.size() + tokens.size() - 1 rows (prompt.size()
  // if empty); exactly the rows Score() uses for replay.
  std::vector<uint16_t> routes;
  FinishReason finish = FinishReason::kLength;
};

// One layer's feed-forward input as the last Score(keep_for_backward) saw
// it, for measuring what a change of that layer's FFN weights does (the
// rollout precision plan). Rows in batch order: request 0's tokens.size()-1
// input positions, then request 1's, ... (the rows of ScoreResult::routes).
template <typename T>
struct FfnInputs {
  int64_t rows = 0;
  std::vector<T> x;               // [rows, hidden]: the ffn_norm output, the FFN's input
  std::vector<uint16_t> experts;  // MoE layers: [rows, top_k] routed experts; empty for dense layers
  std::vector<T> gates;           // MoE layers: [rows, top_k] the gates weighting those experts
};

template <typename T>
class Transformer {
 public:
  // Random init: weights ~ N(0, init_std) (output projections wo/w2 scaled by
  // 1/sqrt(2*layers)), norms 1, router bias 0. Same seed -> same weights.
  // Models of more than kChunkedInitMinParams parameters draw them in
  // parallel chunks (transformer.cc says how; still the same weights for the
  // same seed everywhere). random_init=false leaves every parameter 0 (for
  // loading a checkpoint).
  static constexpr int64_t kChunkedInitMinParams = int64_t(1) << 26;
  static constexpr int64_t kInitChunk = int64_t(1) << 20;
  static Result<std::unique_ptr<Transformer>> Create(const ModelConfig& config, uint64_t seed,
                                                     bool random_init = true);
  ~Transformer();

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  std::span<T> params() { return params_; }
  std::span<const T> params() const { return params_; }
  // The gradient buffer, allocated (zeroed) on first use so that a model
  // that only generates holds no gradient memory.
  std::span<T> grads();
  void ZeroGrad();

  // Score() and Backward() split a batch into up to `threads` shards of whole
  // sequences run in parallel (matrix products single-threaded inside a
  // shard); 1 runs one shard with OpenBLAS's own threading. Default: the
  // hardware's thread count. Results do not depend on it beyond fp32
  // rounding (different matrix shapes); for one setting they are repeatable.
  // While shards run, OpenBLAS is set to 1 thread process-wide (restored
  // after): other threads' BLAS calls at that moment run single-threaded.
  void set_threads(int threads);
  int threads() const { return threads_; }

  // Log-probs of the requested targets (InvalidArgument, naming the request,
  // for an empty batch, a bad token, length or score_from, or bad replay
  // routes). keep_for_backward: keep activations for one Backward() call
  // (replacing any kept before; a Score without it leaves them alone).
  Result<ScoreResult<T>> Score(const std::vector<ScoreRequest>& batch, bool keep_for_backward);
  // Accumulates d(objective)/d(params) into grads(), where dlogprobs[i][j] is
  // d(objective)/d(logprobs[i][j]) of the last kept Score(), plus, when
  // balance_alpha > 0, the gradient of balance_loss (objective = yours +
  // balance_loss). Supervised loss -sum logprob: pass all -1.
  Status Backward(const std::vector<std::vector<T>>& dlogprobs);

  // The FFN input of `layer` (0-based over all layers) kept by the last
  // Score(keep_for_backward=true); FailedPrecondition when none is kept (or
  // Backward() consumed it), InvalidArgument for a bad layer.
  Result<FfnInputs<T>> KeptFfnInputs(int64_t layer) const;

  // Aux-loss-free balancing: bias_i += bias_gamma * sign(mean load - load_i)
  // per MoE layer, from loads (ScoreResult::expert_load, summed as you like).
  Status UpdateRouterBias(const std::vector<std::vector<int64_t>>& expert_load);

  // Batched sampling with a KV cache.
  Result<std::vector<Completion<T>>> Generate(const std::vector<std::vector<int32_t>>& prompts,
                                              const SamplingOptions& options);
  // Full-vocabulary logits of every input position of one sequence via the
  // KV-cache path (prefill of tokens[0..split), then one token at a time),
  // [tokens.size(), vocab]. For tests of cache == full forward.
  Result<std::vector<T>> CachedLogits(const std::vector<int32_t>& tokens, int64_t split);
  // Same logits from one full forward.
  Result<std::vector<T>> FullLogits(const std::vector<int32_t>& tokens);

  struct Impl;

 private:
  Transformer(const ModelConfig& config);
  ModelConfig config_;
  ParamLayout layout_;
  std::vector<T> params_, grads_;
  std::unique_ptr<Impl> impl_;
  int threads_ = 1;
};

using Model = Transformer<float>;

}  // namespace grove::model
