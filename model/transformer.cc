#include "model/transformer.h"

#include <glog/logging.h>

#include <algorithm>
#include <span>
#include <utility>
#include <cmath>
#include <numeric>
#include <cstring>
#include <string>
#include <thread>

#include "base/parallel_for.h"
#include "model/layers.h"
#include "model/moe.h"
#include "model/sampling.h"

namespace grove::model {
namespace {

// A run of n new tokens of one sequence at positions p0..p0+n-1, stored in
// packed rows row0..row0+n-1. cache >= 0: keys/values go to that KV cache and
// attention sees its earlier rows; cache < 0: p0 == 0, attention over the
// packed rows themselves (training / scoring).
struct Segment {
  int64_t row0 = 0, n = 0, p0 = 0, cache = -1;
};

template <typename T>
struct KvCache {
  std::vector<std::vector<T>> k, v;  // per layer, [max_seq_len, kv_heads*head_dim]
};

template <typename T>
struct LayerTape {
  std::vector<T> x_in, rstd1, h1, q, k, v, o, x_mid, rstd2, h2;
  std::vector<std::vector<T>> probs;  // per segment [heads, n, n]
  std::vector<T> fa, fb, fh;          // dense SwiGLU
  MoeSaved<T> moe;
};

// Buffers reused across calls: a training step allocates (and page-faults)
// nothing once the shapes have been seen.
template <typename T>
struct Workspace {
  std::vector<T> x, h, rstd, q, k, v, o, f, fa, fb, fh;
  std::vector<T> dx, dh, dq, dk, dv, dO, sw;
  std::vector<T> hs, dhs, z, h_final, dh_final;
  std::vector<uint16_t> routes, replay;
  std::vector<uint16_t> layer_replay;
  std::vector<T> grads;  // shards > 0 accumulate their gradient here
  MoeSaved<T> moe;
  std::vector<T> scratch;
};

template <typename T>
struct Tape {
  int64_t rows = 0;
  std::vector<int32_t> tokens;
  std::vector<Segment> segs;
  std::vector<LayerTape<T>> layers;
  std::vector<T> x_final, rstd_final, h_final;
  // Scored positions: packed row, target token, request, index in its logprobs.
  std::vector<int64_t> sc_row, sc_req, sc_idx;
  std::vector<int32_t> sc_target;
  std::vector<T> sc_probs;  // [scored, vocab] softmax
  std::vector<size_t> sizes;  // logprobs per request
};

}  // namespace

template <typename T>
struct Transformer<T>::Impl {
  std::vector<T> rope_cos, rope_sin;
  std::vector<std::unique_ptr<Tape<T>>> tapes;   // one per shard, kept by the last Score(keep_for_backward)
  std::vector<size_t> kept_sizes;                 // log-probs per request of that Score
  std::vector<std::unique_ptr<Tape<T>>> spares;  // consumed tapes, reused for their buffers
  std::vector<Workspace<T>> ws;                   // one per shard

  void Prepare(int shards) {
    if (int(ws.size()) < shards) ws.resize(shards);
  }
  void Release(std::unique_ptr<Tape<T>> t) {
    if (t) spares.push_back(std::move(t));
  }
  std::unique_ptr<Tape<T>> TakeTape() {
    std::unique_ptr<Tape<T>> t;
    if (spares.empty()) {
      t = std::make_unique<Tape<T>>();
    } else {
      t = std::move(spares.back());
      spares.pop_back();
    }
    t->rows = 0;
    t->tokens.clear(); t->segs.clear(); t->sc_row.clear(); t->sc_req.clear(); t->sc_idx.clear();
    t->sc_target.clear(); t->sizes.clear();
    return t;
  }
};

namespace {

template <typename T>
struct Ctx {
  const ModelConfig& c;
  const ParamLayout& layout;
  T* params;
  T* grads;
  const T* cos;
  const T* sin;
  const T* P(const std::string& n) const { return params + layout.Offset(n); }
  T* G(const std::string& n) const { return grads + layout.Offset(n); }
  std::string L(int64_t l, const char* s) const { return "layers." + std::to_string(l) + "." + s; }

  MoeShape Shape() const {
    return MoeShape{c.hidden, c.experts, c.top_k, c.expert_hidden, c.shared_experts * c.expert_hidden,
                    c.score_func == ScoreFunc::kSigmoid, c.norm_topk, c.route_scale};
  }
  MoeWeights<T> MoeW(int64_t l) const {
    MoeWeights<T> w;
    w.router = P(L(l, "moe.router"));
    w.bias = P(L(l, "moe.router_bias"));
    for (int64_t e = 0; e < c.experts; ++e) {
      std::string x = L(l, "moe.experts.") + std::to_string(e) + ".";
      w.w1.push_back(P(x + "w1")); w.w3.push_back(P(x + "w3")); w.w2.push_back(P(x + "w2"));
    }
    if (c.shared_experts > 0) {
      w.s_w1 = P(L(l, "moe.shared.w1")); w.s_w3 = P(L(l, "moe.shared.w3")); w.s_w2 = P(L(l, "moe.shared.w2"));
    }
    return w;
  }
  MoeGrads<T> MoeG(int64_t l) const {
    MoeGrads<T> g;
    g.router = G(L(l, "moe.router"));
    for (int64_t e = 0; e < c.experts; ++e) {
      std::string x = L(l, "moe.experts.") + std::to_string(e) + ".";
      g.w1.push_back(G(x + "w1")); g.w3.push_back(G(x + "w3")); g.w2.push_back(G(x + "w2"));
    }
    if (c.shared_experts > 0) {
      g.s_w1 = G(L(l, "moe.shared.w1")); g.s_w3 = G(L(l, "moe.shared.w3")); g.s_w2 = G(L(l, "moe.shared.w2"));
    }
    return g;
  }
};

// The layer stack. Writes the final-normed hidden states [R, H] to h_final.
// routes (optional): [R][moe layers][k]. replay (optional): same layout.
template <typename T>
double RunLayers(const Ctx<T>& cx, const std::vector<int32_t>& tokens, const std::vector<Segment>& segs,
                 const uint16_t* replay, Tape<T>* tape, std::vector<KvCache<T>>* caches, uint16_t* routes,
                 std::vector<std::vector<int64_t>>* load, std::vector<T>* h_final, Workspace<T>* ws) {
  std::vector<T>* scratch = &ws->scratch;
  const ModelConfig& c = cx.c;
  const int64_t R = int64_t(tokens.size()), H = c.hidden, hd = c.head_dim, qd = c.heads * hd,
                kd = c.kv_heads * hd, half = hd / 2, K = c.top_k, M = c.moe_layers();
  std::vector<T>&x = ws->x, &h = ws->h, &rstd = ws->rstd, &q = ws->q, &k = ws->k, &v = ws->v, &o = ws->o,
                &f = ws->f;
  x.resize(R * H); h.resize(R * H); rstd.resize(R); q.resize(R * qd); k.resize(R * kd); v.resize(R * kd);
  o.resize(R * qd); f.resize(R * H);
  const T* embed = cx.P("embed");
  for (int64_t r = 0; r < R; ++r) std::copy(embed + tokens[r] * H, embed + (tokens[r] + 1) * H, x.data() + r * H);
  std::vector<int64_t> seq_start;
  for (const Segment& s : segs) seq_start.push_back(s.row0);
  seq_start.push_back(R);
  std::vector<uint16_t>& layer_replay = ws->layer_replay;
  double balance = 0;
  if (tape) tape->layers.resize(c.layers);
  for (int64_t l = 0; l < c.layers; ++l) {
    LayerTape<T>* lt = tape ? &tape->layers[l] : nullptr;
    if (lt) lt->x_in = x;
    layers::RmsNormForward(x.data(), cx.P(cx.L(l, "attn_norm")), h.data(), rstd.data(), R, H, c.norm_eps);
    if (lt) { lt->rstd1 = rstd; lt->h1 = h; }
    layers::LinearForward(h.data(), cx.P(cx.L(l, "attn.wq")), q.data(), R, H, qd);
    layers::LinearForward(h.data(), cx.P(cx.L(l, "attn.wk")), k.data(), R, H, kd);
    layers::LinearForward(h.data(), cx.P(cx.L(l, "attn.wv")), v.data(), R, H, kd);
    for (const Segment& s : segs)
      for (int64_t i = 0; i < s.n; ++i) {
        const int64_t r = s.row0 + i, pos = s.p0 + i;
        layers::RopeRow(q.data() + r * qd, c.heads, hd, cx.cos + pos * half, cx.sin + pos * half, false);
        layers::RopeRow(k.data() + r * kd, c.kv_heads, hd, cx.cos + pos * half, cx.sin + pos * half, false);
      }
    if (lt) { lt->q = q; lt->k = k; lt->v = v; lt->probs.resize(segs.size()); }
    for (size_t si = 0; si < segs.size(); ++si) {
      const Segment& s = segs[si];
      const T *kb = k.data() + s.row0 * kd, *vb = v.data() + s.row0 * kd;
      if (s.cache >= 0) {
        KvCache<T>& kc = (*caches)[s.cache];
        std::copy(k.data() + s.row0 * kd, k.data() + (s.row0 + s.n) * kd, kc.k[l].data() + s.p0 * kd);
        std::copy(v.data() + s.row0 * kd, v.data() + (s.row0 + s.n) * kd, kc.v[l].data() + s.p0 * kd);
        kb = kc.k[l].data();
        vb = kc.v[l].data();
      }
      T* probs = nullptr;
      if (lt) { lt->probs[si].resize(c.heads * s.n * s.n); probs = lt->probs[si].data(); }
      layers::AttentionForward(q.data() + s.row0 * qd, kb, vb, o.data() + s.row0 * qd, probs, s.n, s.p0, c.heads,
                               c.kv_heads, hd, scratch);
    }
    if (lt) lt->o = o;
    layers::LinearForward(o.data(), cx.P(cx.L(l, "attn.wo")), x.data(), R, qd, H, T(1));  // x += o Wo^T
    if (lt) lt->x_mid = x;
    layers::RmsNormForward(x.data(), cx.P(cx.L(l, "ffn_norm")), h.data(), rstd.data(), R, H, c.norm_eps);
    if (lt) { lt->rstd2 = rstd; lt->h2 = h; }
    if (!c.is_moe_layer(l)) {
      const int64_t F = c.dense_hidden;
      std::vector<T>&a = lt ? lt->fa : ws->fa, &b = lt ? lt->fb : ws->fb, &hh = lt ? lt->fh : ws->fh;
      a.resize(R * F); b.resize(R * F); hh.resize(R * F);
      layers::SwiGluForward(h.data(), cx.P(cx.L(l, "mlp.w1")), cx.P(cx.L(l, "mlp.w3")), cx.P(cx.L(l, "mlp.w2")),
                            a.data(), b.data(), hh.data(), f.data(), R, H, F);
    } else {
      const int64_t mi = c.moe_index(l);
      const uint16_t* rep = nullptr;
      if (replay) {
        layer_replay.resize(R * K);
        for (int64_t r = 0; r < R; ++r)
          std::copy(replay + (r * M + mi) * K, replay + (r * M + mi + 1) * K, layer_replay.data() + r * K);
        rep = layer_replay.data();
      }
      MoeSaved<T>* saved = lt ? &lt->moe : &ws->moe;
      balance += MoeForward(cx.Shape(), cx.MoeW(l), h.data(), R, seq_start, rep, caches ? 0.0 : c.balance_alpha,
                            f.data(), saved, load ? (*load)[mi].data() : nullptr);
      if (routes)
        for (int64_t r = 0; r < R; ++r)
          std::copy(saved->ids.data() + r * K, saved->ids.data() + (r + 1) * K, routes + (r * M + mi) * K);
    }
    for (int64_t i = 0; i < R * H; ++i) x[i] += f[i];
  }
  h_final->resize(R * H);
  layers::RmsNormForward(x.data(), cx.P("norm"), h_final->data(), rstd.data(), R, H, c.norm_eps);
  if (tape) { tape->x_final = x; tape->rstd_final = rstd; tape->h_final = *h_final; }
  return balance;
}

template <typename T>
void BackwardLayers(const Ctx<T>& cx, Tape<T>& tp, std::vector<T>& dh_final, Workspace<T>* ws) {
  std::vector<T>* scratch = &ws->scratch;
  const ModelConfig& c = cx.c;
  const int64_t R = tp.rows, H = c.hidden, hd = c.head_dim, qd = c.heads * hd, kd = c.kv_heads * hd,
                half = hd / 2;
  std::vector<T>&dx = ws->dx, &dh = ws->dh, &dq = ws->dq, &dk = ws->dk, &dv = ws->dv, &dO = ws->dO;
  dx.assign(R * H, T(0)); dh.resize(R * H); dq.resize(R * qd); dk.resize(R * kd); dv.resize(R * kd);
  dO.resize(R * qd);
  layers::RmsNormBackward(tp.x_final.data(), cx.P("norm"), tp.rstd_final.data(), dh_final.data(), dx.data(),
                          cx.G("norm"), R, H);
  std::vector<T>& sw = ws->sw;
  for (int64_t l = c.layers - 1; l >= 0; --l) {
    LayerTape<T>& lt = tp.layers[l];
    std::fill(dh.begin(), dh.end(), T(0));
    if (!c.is_moe_layer(l)) {
      layers::SwiGluBackward(lt.h2.data(), cx.P(cx.L(l, "mlp.w1")), cx.P(cx.L(l, "mlp.w3")),
                             cx.P(cx.L(l, "mlp.w2")), lt.fa.data(), lt.fb.data(), lt.fh.data(), dx.data(),
                             dh.data(), cx.G(cx.L(l, "mlp.w1")), cx.G(cx.L(l, "mlp.w3")), cx.G(cx.L(l, "mlp.w2")),
                             R, H, c.dense_hidden, &sw);
    } else {
      MoeBackward(cx.Shape(), cx.MoeW(l), cx.MoeG(l), lt.h2.data(), dx.data(), c.balance_alpha, lt.moe, dh.data());
    }
    layers::RmsNormBackward(lt.x_mid.data(), cx.P(cx.L(l, "ffn_norm")), lt.rstd2.data(), dh.data(), dx.data(),
                            cx.G(cx.L(l, "ffn_norm")), R, H);
    // x_mid = x_in + o Wo^T
    std::fill(dO.begin(), dO.end(), T(0));
    layers::LinearBackward(lt.o.data(), cx.P(cx.L(l, "attn.wo")), dx.data(), dO.data(), cx.G(cx.L(l, "attn.wo")),
                           R, qd, H);
    std::fill(dk.begin(), dk.end(), T(0));
    std::fill(dv.begin(), dv.end(), T(0));
    for (size_t si = 0; si < tp.segs.size(); ++si) {
      const Segment& s = tp.segs[si];
      layers::AttentionBackward(lt.q.data() + s.row0 * qd, lt.k.data() + s.row0 * kd, lt.v.data() + s.row0 * kd,
                                lt.probs[si].data(), dO.data() + s.row0 * qd, dq.data() + s.row0 * qd,
                                dk.data() + s.row0 * kd, dv.data() + s.row0 * kd, s.n, c.heads, c.kv_heads, hd,
                                scratch);
      for (int64_t i = 0; i < s.n; ++i) {
        const int64_t r = s.row0 + i;
        layers::RopeRow(dq.data() + r * qd, c.heads, hd, cx.cos + i * half, cx.sin + i * half, true);
        layers::RopeRow(dk.data() + r * kd, c.kv_heads, hd, cx.cos + i * half, cx.sin + i * half, true);
      }
    }
    std::fill(dh.begin(), dh.end(), T(0));
    layers::LinearBackward(lt.h1.data(), cx.P(cx.L(l, "attn.wq")), dq.data(), dh.data(), cx.G(cx.L(l, "attn.wq")),
                           R, H, qd);
    layers::LinearBackward(lt.h1.data(), cx.P(cx.L(l, "attn.wk")), dk.data(), dh.data(), cx.G(cx.L(l, "attn.wk")),
                           R, H, kd);
    layers::LinearBackward(lt.h1.data(), cx.P(cx.L(l, "attn.wv")), dv.data(), dh.data(), cx.G(cx.L(l, "attn.wv")),
                           R, H, kd);
    layers::RmsNormBackward(lt.x_in.data(), cx.P(cx.L(l, "attn_norm")), lt.rstd1.data(), dh.data(), dx.data(),
                            cx.G(cx.L(l, "attn_norm")), R, H);
  }
  T* de = cx.G("embed");
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < H; ++j) de[tp.tokens[r] * H + j] += dx[r * H + j];
}

// splitmix64's finaliser: decorrelates the chunk seeds of the chunked init.
uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Box-Muller over a 64-bit Mersenne Twister: the same numbers on every platform.
class Normal {
 public:
  explicit Normal(uint64_t seed) : rng_(seed) {}
  double Next() {
    if (have_) { have_ = false; return spare_; }
    double u1 = UniformOpen(rng_), u2 = UniformOpen(rng_);
    double r = std::sqrt(-2.0 * std::log(u1)), a = 2.0 * M_PI * u2;
    spare_ = r * std::sin(a);
    have_ = true;
    return r * std::cos(a);
  }

 private:
  std::mt19937_64 rng_;
  bool have_ = false;
  double spare_ = 0;
};

}  // namespace

template <typename T>
Transformer<T>::Transformer(const ModelConfig& config)
    : config_(config), layout_(config), impl_(std::make_unique<Impl>()) {
  impl_->Prepare(1);
  threads_ = std::max(1, int(std::thread::hardware_concurrency()));
}

template <typename T>
Transformer<T>::~Transformer() = default;

template <typename T>
Result<std::unique_ptr<Transformer<T>>> Transformer<T>::Create(const ModelConfig& config, uint64_t seed,
                                                               bool random_init) {
  GROVE_RETURN_IF_ERROR(config.Validate());
  std::unique_ptr<Transformer<T>> m(new Transformer<T>(config));
  m->params_.assign(m->layout_.total(), T(0));
  layers::RopeTables(config.max_seq_len, config.head_dim, config.rope_base, &m->impl_->rope_cos,
                     &m->impl_->rope_sin);
  if (!random_init) return m;
  // Up to kChunkedInitMinParams the weights come from one Normal stream in
  // layout order (what every small model and its measured runs were made
  // with). Above, one stream of that many values takes a minute (the 1.7B
  // reference model), so each chunk of kInitChunk values of a tensor has its
  // own stream, seeded from (seed, tensor, chunk), and the chunks are filled
  // in parallel: the same weights for the same seed on any machine and any
  // number of threads.
  const bool chunked = m->layout_.total() > kChunkedInitMinParams;
  Normal normal(seed);
  const double out_std = config.init_std / std::sqrt(2.0 * double(config.layers));
  struct Chunk {
    T* p;
    int64_t n;
    double sd;
    uint64_t seed;
  };
  std::vector<Chunk> chunks;
  int64_t tensor_index = 0;
  for (const TensorInfo& t : m->layout_.tensors()) {
    T* p = m->params_.data() + t.offset;
    const std::string& n = t.name;
    auto ends = [&](const char* s) { return n.size() >= strlen(s) && n.compare(n.size() - strlen(s), strlen(s), s) == 0; };
    ++tensor_index;
    if (ends("norm")) {
      std::fill(p, p + t.numel, T(1));
    } else if (ends("router_bias")) {
      // zeros
    } else {
      const double sd = (ends("wo") || ends("w2")) ? out_std : config.init_std;
      if (!chunked) {
        for (int64_t i = 0; i < t.numel; ++i) p[i] = T(sd * normal.Next());
        continue;
      }
      for (int64_t at = 0, c = 0; at < t.numel; at += kInitChunk, ++c) {
        uint64_t mix = seed ^ (uint64_t(tensor_index) << 40) ^ uint64_t(c);
        chunks.push_back({p + at, std::min<int64_t>(kInitChunk, t.numel - at), sd, SplitMix64(mix)});
      }
    }
  }
  if (!chunks.empty()) {
    ParallelFor(int64_t(chunks.size()), int(std::thread::hardware_concurrency()), [&](int64_t i) {
      Normal chunk_normal(chunks[i].seed);
      for (int64_t j = 0; j < chunks[i].n; ++j) chunks[i].p[j] = T(chunks[i].sd * chunk_normal.Next());
    });
  }
  return m;
}

template <typename T>
std::span<T> Transformer<T>::grads() {
  if (grads_.empty()) grads_.assign(layout_.total(), T(0));
  return grads_;
}

template <typename T>
void Transformer<T>::ZeroGrad() {
  if (grads_.empty()) grads_.assign(layout_.total(), T(0));
  std::fill(grads_.begin(), grads_.end(), T(0));
}

// Runs fn(0..n-1) on n threads (the caller runs 0). With more than one
// shard, each matrix product runs single-threaded inside its shard: on small
// matrices (K = hidden) OpenBLAS's own threads barely scale, while shards of
// whole sequences are independent and do.
template <typename F>
void ForShards(int n, F&& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  const int blas_threads = openblas_get_num_threads();
  openblas_set_num_threads(1);
  std::vector<std::thread> threads;
  for (int s = 1; s < n; ++s) threads.emplace_back([&fn, s] { fn(s); });
  fn(0);
  for (auto& t : threads) t.join();
  openblas_set_num_threads(blas_threads);
}

template <typename T>
void Transformer<T>::set_threads(int threads) {
  threads_ = std::max(1, threads);
}

Status ValidateGenerateRequests(const ModelConfig& c, const std::vector<std::vector<int32_t>>& prompts,
                                const SamplingOptions& opt) {
  const int64_t V = c.vocab_size;
  GROVE_RETURN_IF_ERROR(ValidateSampling(opt));
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string where = "prompt " + std::to_string(i) + ": ";
    if (prompts[i].empty()) return Status::InvalidArgument(where + "empty");
    if (int64_t(prompts[i].size()) >= c.max_seq_len)
      return Status::InvalidArgument(where + std::to_string(prompts[i].size()) +
                                     " tokens leave no room under max_seq_len " + std::to_string(c.max_seq_len));
    for (int32_t t : prompts[i])
      if (t < 0 || t >= V) return Status::InvalidArgument(where + "token " + std::to_string(t) + " outside vocabulary");
  }
  for (int32_t t : opt.stop_tokens)
    if (t < 0 || t >= V) return Status::InvalidArgument("stop token " + std::to_string(t) + " outside vocabulary");
  return Status::OK();
}

namespace {

// (min, max) of v ({0, 0} when empty), in eight independent lanes: a single
// running min/max is a dependency chain the compiler does not vectorize at
// -O2 (GCC 12: 4x slower on the replay ids).
template <typename T>
std::pair<T, T> RangeOf(std::span<const T> v) {
  if (v.empty()) return {T{}, T{}};
  constexpr size_t kLanes = 8;
  T lo[kLanes], hi[kLanes];
  std::fill_n(lo, kLanes, v[0]);
  std::fill_n(hi, kLanes, v[0]);
  size_t i = 0;
  for (; i + kLanes <= v.size(); i += kLanes)
    for (size_t k = 0; k < kLanes; ++k) {
      lo[k] = v[i + k] < lo[k] ? v[i + k] : lo[k];
      hi[k] = v[i + k] > hi[k] ? v[i + k] : hi[k];
    }
  T mn = *std::min_element(lo, lo + kLanes), mx = *std::max_element(hi, hi + kLanes);
  for (; i < v.size(); ++i) {
    mn = std::min(mn, v[i]);
    mx = std::max(mx, v[i]);
  }
  return {mn, mx};
}

std::string RequestWhere(size_t i) { return "score request " + std::to_string(i) + ": "; }

// Request i's lengths: token count, score_from, replayed-id count.
Status CheckRequestShape(const ModelConfig& c, const ScoreRequest& r, size_t i, bool any_replay) {
  const int64_t L = int64_t(r.tokens.size()), row_len = c.moe_layers() * c.top_k;
  if (L < 2) return Status::InvalidArgument(RequestWhere(i) + "needs at least 2 tokens");
  if (L > c.max_seq_len)
    return Status::InvalidArgument(RequestWhere(i) + std::to_string(L) + " tokens > max_seq_len " +
                                   std::to_string(c.max_seq_len));
  if (r.score_from < 1 || r.score_from > L)
    return Status::InvalidArgument(RequestWhere(i) + "score_from " + std::to_string(r.score_from) + " not in [1, " +
                                   std::to_string(L) + "]");
  if (!r.replay_routes.empty()) {
    if (int64_t(r.replay_routes.size()) < (L - 1) * row_len ||
        int64_t(r.replay_routes.size()) % std::max<int64_t>(row_len, 1) != 0)
      return Status::InvalidArgument(RequestWhere(i) + "replay_routes has " + std::to_string(r.replay_routes.size()) +
                                     " ids, need a multiple of " + std::to_string(row_len) + " covering " +
                                     std::to_string(L - 1) + " positions");
  } else if (any_replay) {
    return Status::InvalidArgument(RequestWhere(i) + "replay_routes missing while other requests of the batch replay");
  }
  return Status::OK();
}

// Request i's values (its shape checked): token ids in the vocabulary,
// the replayed ids of its L - 1 positions below the expert count.
// Branch-free range scans first (a GPU step validates ~3M replayed ids per
// batch), the element named only when one is out of range.
Status CheckRequestValues(const ModelConfig& c, const ScoreRequest& r, size_t i) {
  const int64_t L = int64_t(r.tokens.size()), V = c.vocab_size, row_len = c.moe_layers() * c.top_k;
  const auto [lo, hi] = RangeOf<int32_t>(r.tokens);
  if (lo < 0 || hi >= V)
    for (int64_t t = 0; t < L; ++t)
      if (r.tokens[t] < 0 || r.tokens[t] >= V)
        return Status::InvalidArgument(RequestWhere(i) + "token " + std::to_string(r.tokens[t]) + " at " +
                                       std::to_string(t) + " outside vocabulary of " + std::to_string(V));
  if (r.replay_routes.empty()) return Status::OK();
  const uint16_t top = RangeOf<uint16_t>({r.replay_routes.data(), size_t((L - 1) * row_len)}).second;
  for (int64_t j = 0; top >= c.experts && j < (L - 1) * row_len; ++j)
    if (r.replay_routes[j] >= c.experts)
      return Status::InvalidArgument(RequestWhere(i) + "replayed expert id " + std::to_string(r.replay_routes[j]) +
                                     " >= experts " + std::to_string(c.experts));
  return Status::OK();
}

bool AnyReplay(const std::vector<ScoreRequest>& batch) {
  for (const ScoreRequest& r : batch)
    if (!r.replay_routes.empty()) return true;
  return false;
}

}  // namespace

Status ValidateScoreShapes(const ModelConfig& c, const std::vector<ScoreRequest>& batch) {
  if (batch.empty()) return Status::InvalidArgument("Score: empty batch");
  const bool any_replay = AnyReplay(batch);
  for (size_t i = 0; i < batch.size(); ++i) GROVE_RETURN_IF_ERROR(CheckRequestShape(c, batch[i], i, any_replay));
  return Status::OK();
}

Status ValidateScoreRequests(const ModelConfig& c, const std::vector<ScoreRequest>& batch) {
  if (batch.empty()) return Status::InvalidArgument("Score: empty batch");
  const bool any_replay = AnyReplay(batch);
  auto check = [&](size_t i) -> Status {
    GROVE_RETURN_IF_ERROR(CheckRequestShape(c, batch[i], i, any_replay));
    return CheckRequestValues(c, batch[i], i);
  };
  // Requests on up to 8 threads (a GPU step's batch holds ~6 MB of replayed
  // ids: ~1 ms on one core, the GPU idle meanwhile); the first bad request
  // in batch order is the one reported.
  std::vector<Status> status(batch.size());
  ParallelFor(int64_t(batch.size()), batch.size() < 4 ? 1 : 8, [&](int64_t i) { status[i] = check(size_t(i)); });
  for (const Status& s : status) GROVE_RETURN_IF_ERROR(s);
  return Status::OK();
}

template <typename T>
Result<ScoreResult<T>> Transformer<T>::Score(const std::vector<ScoreRequest>& batch, bool keep_for_backward) {
  const ModelConfig& c = config_;
  const int64_t M = c.moe_layers(), K = c.top_k, V = c.vocab_size, H = c.hidden;
  GROVE_RETURN_IF_ERROR(ValidateScoreRequests(c, batch));
  bool any_replay = false;
  int64_t total_rows = 0;
  for (const ScoreRequest& r : batch) {
    any_replay |= !r.replay_routes.empty();
    total_rows += int64_t(r.tokens.size()) - 1;
  }
  // Contiguous shards of requests with about equal token counts.
  const int shards = int(std::min<size_t>(size_t(threads_), batch.size()));
  std::vector<size_t> first(shards + 1, batch.size());
  first[0] = 0;
  {
    int64_t acc = 0;
    int sh = 1;
    for (size_t i = 0; i < batch.size() && sh < shards; ++i) {
      acc += int64_t(batch[i].tokens.size()) - 1;
      if (acc * shards >= total_rows * sh && batch.size() - (i + 1) >= size_t(shards - sh)) first[sh++] = i + 1;
    }
    for (; sh < shards; ++sh) first[sh] = batch.size() - size_t(shards - sh);
  }
  impl_->Prepare(shards);
  ScoreResult<T> out;
  out.logprobs.resize(batch.size());
  out.routes.resize(batch.size());
  std::vector<std::vector<std::vector<int64_t>>> loads(shards, std::vector<std::vector<int64_t>>(M, std::vector<int64_t>(c.experts, 0)));
  std::vector<double> balance(shards, 0.0);
  std::vector<std::unique_ptr<Tape<T>>> tapes(shards);
  for (int sh = 0; sh < shards; ++sh) tapes[sh] = impl_->TakeTape();
  ForShards(shards, [&](int sh) {
    Tape<T>* tape = tapes[sh].get();
    Workspace<T>& ws = impl_->ws[sh];
    std::vector<uint16_t>& replay = ws.replay;
    replay.clear();
    for (size_t i = first[sh]; i < first[sh + 1]; ++i) {
      const ScoreRequest& r = batch[i];
      const int64_t L = int64_t(r.tokens.size());
      Segment s;
      s.row0 = tape->rows;
      s.n = L - 1;
      tape->segs.push_back(s);
      tape->tokens.insert(tape->tokens.end(), r.tokens.begin(), r.tokens.end() - 1);
      if (any_replay) replay.insert(replay.end(), r.replay_routes.begin(), r.replay_routes.begin() + (L - 1) * M * K);
      for (int64_t t = r.score_from; t < L; ++t) {
        tape->sc_row.push_back(s.row0 + t - 1);
        tape->sc_req.push_back(int64_t(i));
        tape->sc_idx.push_back(t - r.score_from);
        tape->sc_target.push_back(r.tokens[t]);
      }
      tape->sizes.push_back(size_t(L - r.score_from));
      tape->rows += s.n;
    }
    std::vector<uint16_t>& routes = ws.routes;
    routes.resize(tape->rows * M * K);
    Ctx<T> cx{c, layout_, params_.data(), nullptr, impl_->rope_cos.data(), impl_->rope_sin.data()};
    std::vector<T>& hf = ws.h_final;
    balance[sh] = RunLayers<T>(cx, tape->tokens, tape->segs, any_replay ? replay.data() : nullptr,
                               keep_for_backward ? tape : nullptr, nullptr, routes.data(), &loads[sh], &hf, &ws);
    // LM head on the scored rows only.
    const int64_t S = int64_t(tape->sc_row.size());
    std::vector<T>& hs = ws.hs;
    std::vector<T>& z = keep_for_backward ? tape->sc_probs : ws.z;
    hs.resize(S * H);
    z.resize(S * V);
    for (int64_t i = 0; i < S; ++i)
      std::copy(hf.data() + tape->sc_row[i] * H, hf.data() + (tape->sc_row[i] + 1) * H, hs.data() + i * H);
    layers::LinearForward(hs.data(), params_.data() + layout_.Offset("lm_head"), z.data(), S, H, V);
    for (size_t i = first[sh]; i < first[sh + 1]; ++i) out.logprobs[i].resize(tape->sizes[i - first[sh]]);
    for (int64_t i = 0; i < S; ++i) {
      T* zi = z.data() + i * V;
      const T lse = layers::LogSumExp(zi, V);
      out.logprobs[tape->sc_req[i]][tape->sc_idx[i]] = zi[tape->sc_target[i]] - lse;
      for (int64_t j = 0; j < V; ++j) zi[j] = std::exp(zi[j] - lse);
    }
    for (size_t i = first[sh]; i < first[sh + 1]; ++i) {
      const Segment& s = tape->segs[i - first[sh]];
      out.routes[i].assign(routes.begin() + s.row0 * M * K, routes.begin() + (s.row0 + s.n) * M * K);
    }
  });
  out.expert_load.assign(M, std::vector<int64_t>(c.experts, 0));
  for (int sh = 0; sh < shards; ++sh) {
    out.balance_loss += balance[sh];
    for (int64_t mi = 0; mi < M; ++mi)
      for (int64_t e = 0; e < c.experts; ++e) out.expert_load[mi][e] += loads[sh][mi][e];
  }
  if (keep_for_backward) {  // replaces the tapes of an earlier kept Score
    for (auto& t : impl_->tapes) impl_->Release(std::move(t));
    impl_->tapes = std::move(tapes);
    impl_->kept_sizes.clear();
    for (const ScoreRequest& r : batch) impl_->kept_sizes.push_back(r.tokens.size() - size_t(r.score_from));
  } else {
    for (auto& t : tapes) impl_->Release(std::move(t));
  }
  return out;
}

template <typename T>
Status Transformer<T>::Backward(const std::vector<std::vector<T>>& dlogprobs) {
  if (impl_->tapes.empty())
    return Status::FailedPrecondition("Backward needs a Score(keep_for_backward=true) before it");
  const std::vector<size_t>& sizes = impl_->kept_sizes;
  if (dlogprobs.size() != sizes.size())
    return Status::InvalidArgument("Backward: " + std::to_string(dlogprobs.size()) + " gradient rows for " +
                                   std::to_string(sizes.size()) + " scored requests");
  for (size_t i = 0; i < dlogprobs.size(); ++i)
    if (dlogprobs[i].size() != sizes[i])
      return Status::InvalidArgument("Backward: request " + std::to_string(i) + " has " +
                                     std::to_string(dlogprobs[i].size()) + " gradients for " +
                                     std::to_string(sizes[i]) + " log-probs");
  std::vector<std::unique_ptr<Tape<T>>> tapes = std::move(impl_->tapes);
  impl_->tapes.clear();
  const int shards = int(tapes.size());
  const int64_t V = config_.vocab_size, H = config_.hidden, N = layout_.total();
  grads();  // allocates on first use
  // Shard 0 accumulates into grads(); the others into their own zeroed
  // buffers, summed into grads() afterwards.
  ForShards(shards, [&](int sh) {
    Tape<T>& tape = *tapes[sh];
    Workspace<T>& ws = impl_->ws[sh];
    T* grads = grads_.data();
    if (sh > 0) {
      ws.grads.assign(N, T(0));
      grads = ws.grads.data();
    }
    const int64_t S = int64_t(tape.sc_row.size());
    std::vector<T>& dz = tape.sc_probs;  // d logp / dz = onehot(target) - softmax(z)
    for (int64_t i = 0; i < S; ++i) {
      const T g = dlogprobs[tape.sc_req[i]][tape.sc_idx[i]];
      T* zi = dz.data() + i * V;
      for (int64_t j = 0; j < V; ++j) zi[j] = -g * zi[j];
      zi[tape.sc_target[i]] += g;
    }
    std::vector<T>&hs = ws.hs, &dhs = ws.dhs;
    hs.resize(S * H);
    dhs.assign(S * H, T(0));
    for (int64_t i = 0; i < S; ++i)
      std::copy(tape.h_final.data() + tape.sc_row[i] * H, tape.h_final.data() + (tape.sc_row[i] + 1) * H,
                hs.data() + i * H);
    const int64_t lm = layout_.Offset("lm_head");
    layers::LinearBackward(hs.data(), params_.data() + lm, dz.data(), dhs.data(), grads + lm, S, H, V);
    std::vector<T>& dh = ws.dh_final;
    dh.assign(tape.rows * H, T(0));
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < H; ++j) dh[tape.sc_row[i] * H + j] += dhs[i * H + j];
    Ctx<T> cx{config_, layout_, params_.data(), grads, impl_->rope_cos.data(), impl_->rope_sin.data()};
    BackwardLayers(cx, tape, dh, &ws);
  });
  if (shards > 1) {
    ForShards(shards, [&](int part) {
      const int64_t lo = N * part / shards, hi = N * (part + 1) / shards;
      for (int sh = 1; sh < shards; ++sh) {
        const T* g = impl_->ws[sh].grads.data();
        for (int64_t i = lo; i < hi; ++i) grads_[i] += g[i];
      }
    });
  }
  for (auto& t : tapes) impl_->Release(std::move(t));
  return Status::OK();
}

template <typename T>
Result<FfnInputs<T>> Transformer<T>::KeptFfnInputs(int64_t layer) const {
  if (impl_->tapes.empty())
    return Status::FailedPrecondition("KeptFfnInputs needs a Score(keep_for_backward=true) not yet consumed by Backward");
  if (layer < 0 || layer >= config_.layers)
    return Status::InvalidArgument("KeptFfnInputs: layer " + std::to_string(layer) + " not in [0, " +
                                   std::to_string(config_.layers) + ")");
  const int64_t H = config_.hidden, K = config_.top_k;
  const bool moe = config_.is_moe_layer(layer);
  FfnInputs<T> in;
  // Shards hold contiguous runs of requests in order, so concatenating them
  // gives batch order.
  for (const auto& tape : impl_->tapes) {
    const LayerTape<T>& lt = tape->layers[layer];
    in.x.insert(in.x.end(), lt.h2.begin(), lt.h2.begin() + tape->rows * H);
    if (moe) {
      in.experts.insert(in.experts.end(), lt.moe.ids.begin(), lt.moe.ids.begin() + tape->rows * K);
      in.gates.insert(in.gates.end(), lt.moe.gates.begin(), lt.moe.gates.begin() + tape->rows * K);
    }
    in.rows += tape->rows;
  }
  return in;
}

template <typename T>
Status Transformer<T>::UpdateRouterBias(const std::vector<std::vector<int64_t>>& load) {
  const ModelConfig& c = config_;
  if (int64_t(load.size()) != c.moe_layers())
    return Status::InvalidArgument("UpdateRouterBias: " + std::to_string(load.size()) + " layers of load for " +
                                   std::to_string(c.moe_layers()) + " MoE layers");
  for (int64_t mi = 0; mi < c.moe_layers(); ++mi) {
    if (int64_t(load[mi].size()) != c.experts)
      return Status::InvalidArgument("UpdateRouterBias: layer " + std::to_string(mi) + " has " +
                                     std::to_string(load[mi].size()) + " loads for " + std::to_string(c.experts) +
                                     " experts");
    T* b = params_.data() + layout_.Offset("layers." + std::to_string(c.dense_layers + mi) + ".moe.router_bias");
    UpdateBias(b, load[mi].data(), c.experts, c.bias_gamma);
  }
  return Status::OK();
}

template <typename T>
Result<std::vector<T>> Transformer<T>::FullLogits(const std::vector<int32_t>& tokens) {
  const int64_t L = int64_t(tokens.size()), V = config_.vocab_size, H = config_.hidden;
  if (L < 1 || L > config_.max_seq_len) return Status::InvalidArgument("FullLogits: bad length");
  for (int32_t t : tokens)
    if (t < 0 || t >= V) return Status::InvalidArgument("FullLogits: token outside vocabulary");
  Ctx<T> cx{config_, layout_, params_.data(), grads_.data(), impl_->rope_cos.data(), impl_->rope_sin.data()};
  std::vector<T> hf, z(L * V);
  RunLayers<T>(cx, tokens, {Segment{0, L, 0, -1}}, nullptr, nullptr, nullptr, nullptr, nullptr, &hf, &impl_->ws[0]);
  layers::LinearForward(hf.data(), params_.data() + layout_.Offset("lm_head"), z.data(), L, H, V);
  return z;
}

template <typename T>
Result<std::vector<T>> Transformer<T>::CachedLogits(const std::vector<int32_t>& tokens, int64_t split) {
  const int64_t L = int64_t(tokens.size()), V = config_.vocab_size, H = config_.hidden;
  if (L < 1 || L > config_.max_seq_len || split < 1 || split > L)
    return Status::InvalidArgument("CachedLogits: bad length or split");
  for (int32_t t : tokens)
    if (t < 0 || t >= V) return Status::InvalidArgument("CachedLogits: token outside vocabulary");
  Ctx<T> cx{config_, layout_, params_.data(), grads_.data(), impl_->rope_cos.data(), impl_->rope_sin.data()};
  const int64_t kd = config_.kv_heads * config_.head_dim;
  std::vector<KvCache<T>> caches(1);
  caches[0].k.assign(config_.layers, std::vector<T>(config_.max_seq_len * kd));
  caches[0].v = caches[0].k;
  std::vector<T> hf, z(L * V);
  std::vector<int32_t> first(tokens.begin(), tokens.begin() + split);
  RunLayers<T>(cx, first, {Segment{0, split, 0, 0}}, nullptr, nullptr, &caches, nullptr, nullptr, &hf, &impl_->ws[0]);
  layers::LinearForward(hf.data(), params_.data() + layout_.Offset("lm_head"), z.data(), split, H, V);
  for (int64_t p = split; p < L; ++p) {
    RunLayers<T>(cx, {tokens[p]}, {Segment{0, 1, p, 0}}, nullptr, nullptr, &caches, nullptr, nullptr, &hf,
              &impl_->ws[0]);
    layers::LinearForward(hf.data(), params_.data() + layout_.Offset("lm_head"), z.data() + p * V, 1, H, V);
  }
  return z;
}

template <typename T>
Result<std::vector<Completion<T>>> Transformer<T>::Generate(const std::vector<std::vector<int32_t>>& prompts,
                                                             const SamplingOptions& opt) {
  const ModelConfig& c = config_;
  const int64_t V = c.vocab_size, H = c.hidden, M = c.moe_layers(), K = c.top_k, kd = c.kv_heads * c.head_dim;
  GROVE_RETURN_IF_ERROR(ValidateGenerateRequests(c, prompts, opt));
  const size_t B = prompts.size();
  std::vector<Completion<T>> out(B);
  if (B == 0) return out;
  Ctx<T> cx{c, layout_, params_.data(), grads_.data(), impl_->rope_cos.data(), impl_->rope_sin.data()};
  std::vector<KvCache<T>> caches(B);
  for (size_t i = 0; i < B; ++i) {
    // Room for the prompt and every token that may still be fed back.
    const int64_t cap = std::min<int64_t>(c.max_seq_len, int64_t(prompts[i].size()) + opt.max_new_tokens);
    caches[i].k.assign(c.layers, std::vector<T>(cap * kd));
    caches[i].v = caches[i].k;
  }
  std::vector<Sampler> samplers;
  for (size_t i = 0; i < B; ++i) samplers.emplace_back(opt, i);
  std::vector<int64_t> len(B);
  // Prefill every prompt in one packed forward.
  std::vector<int32_t> toks;
  std::vector<Segment> segs;
  for (size_t i = 0; i < B; ++i) {
    segs.push_back(Segment{int64_t(toks.size()), int64_t(prompts[i].size()), 0, int64_t(i)});
    toks.insert(toks.end(), prompts[i].begin(), prompts[i].end());
    len[i] = int64_t(prompts[i].size());
  }
  std::vector<size_t> active(B);
  std::iota(active.begin(), active.end(), 0);
  std::vector<T> hf, last_h, z;
  std::vector<double> logits_f;
  std::vector<uint16_t> routes;
  while (!active.empty()) {
    routes.assign(toks.size() * M * K, 0);
    RunLayers<T>(cx, toks, segs, nullptr, nullptr, &caches, routes.data(), nullptr, &hf, &impl_->ws[0]);
    last_h.resize(active.size() * H);
    for (size_t a = 0; a < active.size(); ++a) {
      const Segment& s = segs[a];
      const int64_t r = s.row0 + s.n - 1;
      std::copy(hf.data() + r * H, hf.data() + (r + 1) * H, last_h.data() + a * H);
      const size_t i = active[a];
      out[i].routes.insert(out[i].routes.end(), routes.begin() + s.row0 * M * K,
                           routes.begin() + (s.row0 + s.n) * M * K);
    }
    if (opt.max_new_tokens == 0) break;
    z.resize(active.size() * V);
    layers::LinearForward(last_h.data(), params_.data() + layout_.Offset("lm_head"), z.data(), int64_t(active.size()),
                          H, V);
    std::vector<size_t> still;
    toks.clear();
    segs.clear();
    for (size_t a = 0; a < active.size(); ++a) {
      const size_t i = active[a];
      const T* zi = z.data() + a * V;
      logits_f.assign(zi, zi + V);
      const int32_t tok = samplers[i].Sample(logits_f);
      out[i].tokens.push_back(tok);
      out[i].logprobs.push_back(zi[tok] - layers::LogSumExp(zi, V));
      ++len[i];
      const bool stop = std::find(opt.stop_tokens.begin(), opt.stop_tokens.end(), tok) != opt.stop_tokens.end();
      if (stop) { out[i].finish = FinishReason::kStop; continue; }
      if (int64_t(out[i].tokens.size()) >= opt.max_new_tokens || len[i] >= c.max_seq_len) {
        out[i].finish = FinishReason::kLength;
        continue;
      }
      segs.push_back(Segment{int64_t(toks.size()), 1, len[i] - 1, int64_t(i)});
      toks.push_back(tok);
      still.push_back(i);
    }
    active = std::move(still);
  }
  return out;
}

template class Transformer<float>;
template class Transformer<double>;

}  // namespace grove::model
