// Layer math of the MoE transformer, forward and backward, templated on the
// scalar type: float is the model, double is the reference the tests use for
// finite differences. Row-major; a Linear weight W is [out, in], y = x W^T.
// Backward functions ACCUMULATE (+=) into parameter gradients and into dx
// unless stated otherwise. Internal to model/ (and its tests), except that
// rollout/precision_plan.cc runs single experts through SwiGluForward and
// takes LogSumExp.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace grove::model::layers {

// C[M,N] = alpha * op(A) op(B) + beta * C through CBLAS (threaded OpenBLAS).
inline void Gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A,
              lda, B, ldb, beta, C, ldc);
}
inline void Gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                 const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A,
              lda, B, ldb, beta, C, ldc);
}

// y[n,out] = x[n,in] W^T (beta=0) or += (beta=1).
template <typename T>
void LinearForward(const T* x, const T* W, T* y, int64_t n, int64_t in, int64_t out, T beta = 0) {
  Gemm(false, true, n, out, in, T(1), x, in, W, in, beta, y, out);
}
// dx += dy W (dx may be null); dW += dy^T x.
template <typename T>
void LinearBackward(const T* x, const T* W, const T* dy, T* dx, T* dW, int64_t n, int64_t in, int64_t out) {
  if (n == 0) return;
  if (dx) Gemm(false, false, n, in, out, T(1), dy, out, W, in, T(1), dx, in);
  if (dW) Gemm(true, false, out, in, n, T(1), dy, out, x, in, T(1), dW, in);
}

// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w; rstd[n] saved for backward.
template <typename T>
void RmsNormForward(const T* x, const T* w, T* y, T* rstd, int64_t n, int64_t d, double eps) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += double(xi[j]) * xi[j];
    T r = T(1.0 / std::sqrt(ss / d + eps));
    rstd[i] = r;
    for (int64_t j = 0; j < d; ++j) y[i * d + j] = xi[j] * r * w[j];
  }
}
// dx += ..., dw += ...
template <typename T>
void RmsNormBackward(const T* x, const T* w, const T* rstd, const T* dy, T* dx, T* dw, int64_t n, int64_t d) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    const T* dyi = dy + i * d;
    const T r = rstd[i];
    double dot = 0;  // sum_j (dy_j w_j) xhat_j
    for (int64_t j = 0; j < d; ++j) {
      T xhat = xi[j] * r;
      dw[j] += dyi[j] * xhat;
      dot += double(dyi[j] * w[j]) * xhat;
    }
    const T m = T(dot / d);
    for (int64_t j = 0; j < d; ++j) dx[i * d + j] += r * (dyi[j] * w[j] - xi[j] * r * m);
  }
}

// Rotary tables: cos/sin[pos * half + i] of pos * base^(-2i/head_dim).
template <typename T>
void RopeTables(int64_t max_pos, int64_t head_dim, double base, std::vector<T>* cos_t, std::vector<T>* sin_t) {
  const int64_t half = head_dim / 2;
  cos_t->resize(max_pos * half);
  sin_t->resize(max_pos * half);
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < half; ++i) {
      double a = double(p) * std::pow(base, -2.0 * double(i) / double(head_dim));
      (*cos_t)[p * half + i] = T(std::cos(a));
      (*sin_t)[p * half + i] = T(std::sin(a));
    }
}
// In place on one row of `nh` heads; pairs (i, i + head_dim/2) ("rotate half").
// inverse=true applies the transpose rotation (that is the backward).
template <typename T>
void RopeRow(T* row, int64_t nh, int64_t head_dim, const T* cos_p, const T* sin_p, bool inverse) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < nh; ++h) {
    T* v = row + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      T c = cos_p[i], s = inverse ? -sin_p[i] : sin_p[i];
      T a = v[i], b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = a * s + b * c;
    }
  }
}

// Causal grouped-query attention of n new query rows at positions p0..p0+n-1
// over keys/values rows 0..p0+n-1.
// q: [n, heads*hd]; k, v: [p0+n, kv_heads*hd]; o: [n, heads*hd] (overwritten);
// probs (optional, [heads, n, p0+n]) keeps the softmax for backward.
template <typename T>
void AttentionForward(const T* q, const T* k, const T* v, T* o, T* probs, int64_t n, int64_t p0, int64_t heads,
                      int64_t kv_heads, int64_t hd, std::vector<T>* scratch) {
  const int64_t L = p0 + n, qd = heads * hd, kd = kv_heads * hd, group = heads / kv_heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  scratch->resize(n * L);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / group;
    T* S = probs ? probs + h * n * L : scratch->data();
    Gemm(false, true, n, L, hd, scale, q + h * hd, qd, k + g * hd, kd, T(0), S, L);
    for (int64_t i = 0; i < n; ++i) {
      T* s = S + i * L;
      const int64_t last = p0 + i;  // causal: keys 0..last
      T mx = s[0];
      for (int64_t j = 1; j <= last; ++j) mx = std::max(mx, s[j]);
      T sum = 0;
      for (int64_t j = 0; j <= last; ++j) { s[j] = std::exp(s[j] - mx); sum += s[j]; }
      T inv = T(1) / sum;
      for (int64_t j = 0; j <= last; ++j) s[j] *= inv;
      for (int64_t j = last + 1; j < L; ++j) s[j] = 0;
    }
    Gemm(false, false, n, hd, L, T(1), S, L, v + g * hd, kd, T(0), o + h * hd, qd);
  }
}
// Backward of AttentionForward for the training case (p0 = 0, n = L):
// dq (overwritten), dk and dv (accumulated). scratch: >= n*L.
template <typename T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* probs, const T* dout, T* dq, T* dk, T* dv,
                       int64_t n, int64_t heads, int64_t kv_heads, int64_t hd, std::vector<T>* scratch) {
  const int64_t L = n, qd = heads * hd, kd = kv_heads * hd, group = heads / kv_heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  scratch->resize(n * L);
  T* dS = scratch->data();
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / group;
    const T* P = probs + h * n * L;
    // dP = dO V^T; dV += P^T dO
    Gemm(false, true, n, L, hd, T(1), dout + h * hd, qd, v + g * hd, kd, T(0), dS, L);
    Gemm(true, false, L, hd, n, T(1), P, L, dout + h * hd, qd, T(1), dv + g * hd, kd);
    for (int64_t i = 0; i < n; ++i) {
      T* d = dS + i * L;
      const T* p = P + i * L;
      T dot = 0;
      for (int64_t j = 0; j <= i; ++j) dot += d[j] * p[j];
      for (int64_t j = 0; j <= i; ++j) d[j] = p[j] * (d[j] - dot) * scale;
      for (int64_t j = i + 1; j < L; ++j) d[j] = 0;
    }
    Gemm(false, false, n, hd, L, T(1), dS, L, k + g * hd, kd, T(0), dq + h * hd, qd);
    Gemm(true, false, L, hd, n, T(1), dS, L, q + h * hd, qd, T(1), dk + g * hd, kd);
  }
}

template <typename T>
inline T Sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

// SwiGLU: a = x W1^T, b = x W3^T, h = silu(a) * b, y = h W2^T.
// a, b, h: [n, F] kept for backward; y [n, d] overwritten.
template <typename T>
void SwiGluForward(const T* x, const T* w1, const T* w3, const T* w2, T* a, T* b, T* h, T* y, int64_t n,
                   int64_t d, int64_t F) {
  LinearForward(x, w1, a, n, d, F);
  LinearForward(x, w3, b, n, d, F);
  for (int64_t i = 0; i < n * F; ++i) h[i] = a[i] * Sigmoid(a[i]) * b[i];
  LinearForward(h, w2, y, n, F, d);
}
// dx += ..., dW* += ...; scratch gets dh/da/db ([n, F] each).
template <typename T>
void SwiGluBackward(const T* x, const T* w1, const T* w3, const T* w2, const T* a, const T* b, const T* h,
                    const T* dy, T* dx, T* dw1, T* dw3, T* dw2, int64_t n, int64_t d, int64_t F,
                    std::vector<T>* scratch) {
  scratch->resize(3 * n * F);
  T* dh = scratch->data();
  T* da = dh + n * F;
  T* db = da + n * F;
  std::fill(dh, dh + n * F, T(0));
  LinearBackward(h, w2, dy, dh, dw2, n, F, d);
  for (int64_t i = 0; i < n * F; ++i) {
    T s = Sigmoid(a[i]);
    T silu = a[i] * s;
    db[i] = dh[i] * silu;
    da[i] = dh[i] * b[i] * s * (T(1) + a[i] * (T(1) - s));
  }
  LinearBackward(x, w1, da, dx, dw1, n, d, F);
  LinearBackward(x, w3, db, dx, dw3, n, d, F);
}

// Log-softmax of one row; returns log-sum-exp.
template <typename T>
T LogSumExp(const T* z, int64_t V) {
  T mx = z[0];
  for (int64_t j = 1; j < V; ++j) mx = std::max(mx, z[j]);
  double s = 0;
  for (int64_t j = 0; j < V; ++j) s += std::exp(double(z[j] - mx));
  return mx + T(std::log(s));
}

}  // namespace grove::model::layers
