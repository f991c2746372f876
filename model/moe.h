// The MoE feed-forward block (router + routed SwiGLU experts + shared
// experts), forward and backward, templated like layers.h. Internal to model/.
//
// Routing of token t: logits = x_t R^T; scores s = softmax(logits) or
// sigmoid(logits); the experts are the top_k of s + bias (ties: lower id), or
// the replayed ids when given; gate_i = s_i (norm_topk: s_i / sum of the
// selected s) * route_scale. The bias only steers selection: gradients flow
// through s at the chosen experts, never through the bias.
// Sequence-wise balance loss (DeepSeek-V3), per sequence of T tokens:
//   alpha * sum_i f_i P_i, f_i = E / (k T) * #tokens routed to i,
//   P_i = mean_t s_ti / sum_j s_tj; its gradient flows through P only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "model/layers.h"

namespace grove::model {

struct MoeShape {
  int64_t hidden, experts, top_k, expert_hidden, shared_hidden;  // shared_hidden = S * expert_hidden (0: none)
  bool sigmoid, norm_topk;
  double route_scale;
};

template <typename T>
struct MoeWeights {
  const T* router;               // [E, H]
  const T* bias;                 // [E]
  std::vector<const T*> w1, w3, w2;  // per expert
  const T *s_w1 = nullptr, *s_w3 = nullptr, *s_w2 = nullptr;
};
template <typename T>
struct MoeGrads {
  T* router;
  std::vector<T*> w1, w3, w2;
  T *s_w1 = nullptr, *s_w3 = nullptr, *s_w2 = nullptr;
};

// What forward keeps for backward.
template <typename T>
struct MoeSaved {
  int64_t n = 0;
  std::vector<T> scores;           // [n, E]
  std::vector<uint16_t> ids;       // [n, k]
  std::vector<T> gates;            // [n, k]
  std::vector<std::vector<int64_t>> rows;   // per expert: token rows routed to it
  std::vector<std::vector<int64_t>> slots;  // per expert: the k-slot of that row
  std::vector<std::vector<T>> a, b, h, y;   // per expert, [rows, F] / [rows, H]
  std::vector<T> sa, sb, sh;       // shared experts [n, S*F]
  std::vector<int64_t> seq_start;  // sequence boundaries (for the balance loss), size seqs+1
  // Scratch reused across calls (no allocation once shapes were seen).
  std::vector<T> xg, dyg, dxg, dgate, dlogits, scratch;
};

// x: [n, H] -> out [n, H] (overwritten). replay: [n, k] ids or null.
// load (size E): += tokens routed per expert. Returns the balance loss
// (alpha * sum over sequences) when alpha > 0.
template <typename T>
double MoeForward(const MoeShape& s, const MoeWeights<T>& w, const T* x, int64_t n,
                  const std::vector<int64_t>& seq_start, const uint16_t* replay, double alpha, T* out,
                  MoeSaved<T>* saved, int64_t* load) {
  const int64_t H = s.hidden, E = s.experts, K = s.top_k, F = s.expert_hidden;
  MoeSaved<T>& m = *saved;
  m.n = n;
  m.seq_start = seq_start;
  m.scores.resize(n * E);
  m.ids.resize(n * K);
  m.gates.resize(n * K);
  layers::LinearForward(x, w.router, m.scores.data(), n, H, E);
  std::vector<int64_t> order(E);
  std::vector<T> sel(E);
  for (int64_t t = 0; t < n; ++t) {
    T* sc = m.scores.data() + t * E;
    if (s.sigmoid) {
      for (int64_t e = 0; e < E; ++e) sc[e] = layers::Sigmoid(sc[e]);
    } else {
      T mx = *std::max_element(sc, sc + E), sum = 0;
      for (int64_t e = 0; e < E; ++e) { sc[e] = std::exp(sc[e] - mx); sum += sc[e]; }
      for (int64_t e = 0; e < E; ++e) sc[e] /= sum;
    }
    uint16_t* id = m.ids.data() + t * K;
    if (replay) {
      std::copy(replay + t * K, replay + (t + 1) * K, id);
    } else {
      for (int64_t e = 0; e < E; ++e) sel[e] = sc[e] + w.bias[e];
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t i, int64_t j) {
        return sel[i] > sel[j] || (sel[i] == sel[j] && i < j);
      });
      for (int64_t j = 0; j < K; ++j) id[j] = uint16_t(order[j]);
    }
    T z = 0;
    for (int64_t j = 0; j < K; ++j) z += sc[id[j]];
    for (int64_t j = 0; j < K; ++j)
      m.gates[t * K + j] = (s.norm_topk ? sc[id[j]] / z : sc[id[j]]) * T(s.route_scale);
  }
  // Dispatch: group token rows per expert, run each expert once on its rows.
  m.rows.resize(E);
  m.slots.resize(E);
  for (int64_t e = 0; e < E; ++e) { m.rows[e].clear(); m.slots[e].clear(); }
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < K; ++j) {
      m.rows[m.ids[t * K + j]].push_back(t);
      m.slots[m.ids[t * K + j]].push_back(j);
    }
  if (load)
    for (int64_t e = 0; e < E; ++e) load[e] += int64_t(m.rows[e].size());
  // Shared experts first: they write every row of out.
  if (s.shared_hidden > 0) {
    const int64_t SF = s.shared_hidden;
    m.sa.resize(n * SF); m.sb.resize(n * SF); m.sh.resize(n * SF);
    layers::SwiGluForward(x, w.s_w1, w.s_w3, w.s_w2, m.sa.data(), m.sb.data(), m.sh.data(), out, n, H, SF);
  } else {
    std::fill(out, out + n * H, T(0));
  }
  m.a.resize(E); m.b.resize(E); m.h.resize(E); m.y.resize(E);
  std::vector<T>& xg = m.xg;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r = int64_t(m.rows[e].size());
    if (r == 0) continue;
    xg.resize(r * H);
    for (int64_t i = 0; i < r; ++i) std::copy(x + m.rows[e][i] * H, x + (m.rows[e][i] + 1) * H, xg.data() + i * H);
    m.a[e].resize(r * F); m.b[e].resize(r * F); m.h[e].resize(r * F); m.y[e].resize(r * H);
    layers::SwiGluForward(xg.data(), w.w1[e], w.w3[e], w.w2[e], m.a[e].data(), m.b[e].data(), m.h[e].data(),
                          m.y[e].data(), r, H, F);
    for (int64_t i = 0; i < r; ++i) {
      const int64_t t = m.rows[e][i];
      const T g = m.gates[t * K + m.slots[e][i]];
      const T* yi = m.y[e].data() + i * H;
      T* o = out + t * H;
      for (int64_t d = 0; d < H; ++d) o[d] += g * yi[d];
    }
  }
  if (alpha <= 0) return 0.0;
  double loss = 0;
  for (size_t q = 0; q + 1 < seq_start.size(); ++q) {
    const int64_t t0 = seq_start[q], t1 = seq_start[q + 1], len = t1 - t0;
    if (len == 0) continue;
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (int64_t t = t0; t < t1; ++t) {
      const T* sc = m.scores.data() + t * E;
      double z = 0;
      for (int64_t e = 0; e < E; ++e) z += sc[e];
      for (int64_t e = 0; e < E; ++e) P[e] += sc[e] / z / len;
      for (int64_t j = 0; j < K; ++j) f[m.ids[t * K + j]] += double(E) / double(K * len);
    }
    for (int64_t e = 0; e < E; ++e) loss += alpha * f[e] * P[e];
  }
  return loss;
}

// Aux-loss-free balancing (DeepSeek-V3): bias_i += gamma * sign(mean - load_i).
template <typename T>
void UpdateBias(T* bias, const int64_t* load, int64_t E, double gamma) {
  double mean = 0;
  for (int64_t e = 0; e < E; ++e) mean += double(load[e]) / double(E);
  for (int64_t e = 0; e < E; ++e) {
    const double d = mean - double(load[e]);
    bias[e] += T(gamma * double((d > 0) - (d < 0)));
  }
}

// dout [n, H] -> dx += ..., grads += ...; alpha as in forward.
template <typename T>
void MoeBackward(const MoeShape& s, const MoeWeights<T>& w, const MoeGrads<T>& g, const T* x, const T* dout,
                 double alpha, MoeSaved<T>& m, T* dx) {
  const int64_t H = s.hidden, E = s.experts, K = s.top_k, F = s.expert_hidden, n = m.n;
  std::vector<T>&scratch = m.scratch, &xg = m.xg, &dyg = m.dyg, &dxg = m.dxg;
  if (s.shared_hidden > 0)
    layers::SwiGluBackward(x, w.s_w1, w.s_w3, w.s_w2, m.sa.data(), m.sb.data(), m.sh.data(), dout, dx, g.s_w1,
                           g.s_w3, g.s_w2, n, H, s.shared_hidden, &scratch);
  std::vector<T>& dgate = m.dgate;
  dgate.assign(n * K, T(0));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r = int64_t(m.rows[e].size());
    if (r == 0) continue;
    xg.resize(r * H); dyg.resize(r * H); dxg.assign(r * H, T(0));
    for (int64_t i = 0; i < r; ++i) {
      const int64_t t = m.rows[e][i];
      const T gt = m.gates[t * K + m.slots[e][i]];
      std::copy(x + t * H, x + (t + 1) * H, xg.data() + i * H);
      const T* yi = m.y[e].data() + i * H;
      const T* di = dout + t * H;
      T dot = 0;
      for (int64_t d = 0; d < H; ++d) { dyg[i * H + d] = gt * di[d]; dot += di[d] * yi[d]; }
      dgate[t * K + m.slots[e][i]] = dot;
    }
    layers::SwiGluBackward(xg.data(), w.w1[e], w.w3[e], w.w2[e], m.a[e].data(), m.b[e].data(), m.h[e].data(),
                           dyg.data(), dxg.data(), g.w1[e], g.w3[e], g.w2[e], r, H, F, &scratch);
    for (int64_t i = 0; i < r; ++i) {
      T* o = dx + m.rows[e][i] * H;
      const T* di = dxg.data() + i * H;
      for (int64_t d = 0; d < H; ++d) o[d] += di[d];
    }
  }
  // Gates -> scores -> router logits.
  std::vector<T>& dlogits = m.dlogits;
  dlogits.assign(n * E, T(0));
  std::vector<double> fcoef(E);
  for (size_t q = 0; q + 1 < m.seq_start.size(); ++q) {
    const int64_t t0 = m.seq_start[q], t1 = m.seq_start[q + 1], len = t1 - t0;
    std::fill(fcoef.begin(), fcoef.end(), 0.0);
    if (alpha > 0 && len > 0) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < K; ++j) fcoef[m.ids[t * K + j]] += alpha * double(E) / double(K * len) / len;
    }
    for (int64_t t = t0; t < t1; ++t) {
      const T* sc = m.scores.data() + t * E;
      const uint16_t* id = m.ids.data() + t * K;
      T* dl = dlogits.data() + t * E;  // holds d/ds first
      const T scale = T(s.route_scale);
      if (s.norm_topk) {
        T z = 0, dot = 0;
        for (int64_t j = 0; j < K; ++j) z += sc[id[j]];
        for (int64_t j = 0; j < K; ++j) dot += dgate[t * K + j] * m.gates[t * K + j] / scale;
        for (int64_t j = 0; j < K; ++j) dl[id[j]] += scale * (dgate[t * K + j] - dot) / z;
      } else {
        for (int64_t j = 0; j < K; ++j) dl[id[j]] += scale * dgate[t * K + j];
      }
      if (alpha > 0) {  // balance loss through normalized scores s' = s / sum s
        T z = 0, dot = 0;
        for (int64_t e = 0; e < E; ++e) z += sc[e];
        for (int64_t e = 0; e < E; ++e) dot += T(fcoef[e]) * sc[e] / z;
        for (int64_t e = 0; e < E; ++e) dl[e] += (T(fcoef[e]) - dot) / z;
      }
      if (s.sigmoid) {
        for (int64_t e = 0; e < E; ++e) dl[e] *= sc[e] * (T(1) - sc[e]);
      } else {
        T dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += dl[e] * sc[e];
        for (int64_t e = 0; e < E; ++e) dl[e] = sc[e] * (dl[e] - dot);
      }
    }
  }
  layers::LinearBackward(x, w.router, dlogits.data(), dx, g.router, n, H, E);
}

}  // namespace grove::model
