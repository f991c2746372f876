#include "kernels/router.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace grove::kernels {
namespace {

constexpr int kPerLane = kRouterMaxExperts / 32;
constexpr int kWarps = 4;

// Expert e lives in lane e % 32, slot e / 32.
__global__ void RouterTopKKernel(RouterArgs a) {
  const int lane = threadIdx.x % 32;
  const int token = blockIdx.x * kWarps + threadIdx.x / 32;
  if (token >= a.tokens) return;
  const float* logits = a.logits + static_cast<int64_t>(token) * a.experts;
  float s[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = i * 32 + lane;
    s[i] = e < a.experts ? logits[e] : -INFINITY;
  }
  if (a.sigmoid) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) s[i] = 1.f / (1.f + expf(-s[i]));
  } else {
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) mx = fmaxf(mx, s[i]);
    for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, d));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      s[i] = i * 32 + lane < a.experts ? expf(s[i] - mx) : 0.f;
      sum += s[i];
    }
    for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) s[i] /= sum;
  }
  float* scores = a.scores + static_cast<int64_t>(token) * a.experts;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    if (i * 32 + lane < a.experts) scores[i * 32 + lane] = s[i];

  // Selection key s + bias; taken experts drop to -inf.
  float key[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = i * 32 + lane;
    key[i] = e < a.experts ? s[i] + (a.bias ? a.bias[e] : 0.f) : -INFINITY;
  }
  uint16_t* ids = a.ids + static_cast<int64_t>(token) * a.top_k;
  float* gates = a.gates + static_cast<int64_t>(token) * a.top_k;
  // Lane j keeps the j-th choice (top_k <= 16 < 32).
  float my_score = 0.f;
  int my_id = 0;
  for (int j = 0; j < a.top_k; ++j) {
    int best_e;
    if (a.replay_ids) {
      best_e = a.replay_ids[static_cast<int64_t>(token) * a.top_k + j];
    } else {
      // This lane's best (lowest id among equal keys), then the warp's.
      float best = -INFINITY;
      best_e = 0x7fffffff;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int e = i * 32 + lane;
        if (e < a.experts && (key[i] > best || (key[i] == best && e < best_e))) {
          best = key[i];
          best_e = e;
        }
      }
      for (int d = 16; d > 0; d /= 2) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, d);
        const int oe = __shfl_xor_sync(0xffffffffu, best_e, d);
        if (ob > best || (ob == best && oe < best_e)) {
          best = ob;
          best_e = oe;
        }
      }
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (i * 32 + lane == best_e) key[i] = -INFINITY;
    }
    // The chosen expert's score, from the lane that holds it.
    float sc = 0.f;
    const bool valid = best_e >= 0 && best_e < a.experts;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (valid && i * 32 + lane == best_e) sc = s[i];
    sc = __shfl_sync(0xffffffffu, sc, valid ? best_e % 32 : 0);
    if (lane == j) {
      my_score = valid ? sc : 0.f;
      my_id = best_e;
    }
  }
  // z = sum of the chosen scores, in selection order as the CPU model adds
  // them (a serial sum over lanes 0..top_k-1, not a tree).
  float z = 0.f;
  for (int j = 0; j < a.top_k; ++j) z += __shfl_sync(0xffffffffu, my_score, j);
  if (lane < a.top_k) {
    ids[lane] = static_cast<uint16_t>(my_id);
    const float g = a.norm_topk ? (z > 0.f ? my_score / z : 0.f) : my_score;
    gates[lane] = g * a.route_scale;
  }
}

}  // namespace

Status RouterTopK(const RouterArgs& a, cudaStream_t stream) {
  if (a.tokens < 0) return Status::InvalidArgument("router: tokens < 0");
  if (a.experts < 1 || a.experts > kRouterMaxExperts)
    return Status::InvalidArgument("router: experts must be in 1.." +
                                   std::to_string(kRouterMaxExperts) + ", got " +
                                   std::to_string(a.experts));
  if (a.top_k < 1 || a.top_k > std::min(a.experts, kRouterMaxTopK))
    return Status::InvalidArgument("router: top_k must be in 1..min(experts, " +
                                   std::to_string(kRouterMaxTopK) + "), got " +
                                   std::to_string(a.top_k));
  if (a.tokens == 0) return Status::OK();
  if (!a.logits || !a.scores || !a.ids || !a.gates)
    return Status::InvalidArgument("router: null logits or outputs");
  const int blocks = (a.tokens + kWarps - 1) / kWarps;
  RouterTopKKernel<<<blocks, kWarps * 32, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return Status::Internal(std::string("router launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace grove::kernels

namespace grove::kernels {
namespace {

// Balance-loss coefficients f_e of model/moe.h per sequence, already times
// alpha and divided by the sequence length (the 1/T of P's mean):
//   coef[q][e] = alpha * E / (k * len) / len * #slots of sequence q on e.
// One block per sequence.
__global__ void BalanceCoefKernel(const uint16_t* ids, const int32_t* seq_offsets, int experts, int top_k,
                                  float alpha, float* coef) {
  __shared__ int count[kRouterMaxExperts];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  const int t0 = seq_offsets[blockIdx.x], t1 = seq_offsets[blockIdx.x + 1];
  for (int64_t s = static_cast<int64_t>(t0) * top_k + threadIdx.x; s < static_cast<int64_t>(t1) * top_k;
       s += blockDim.x) {
    const int e = ids[s];
    if (e < experts) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  const double len = t1 - t0;
  for (int e = threadIdx.x; e < experts; e += blockDim.x)
    coef[static_cast<int64_t>(blockIdx.x) * experts + e] =
        len > 0 ? static_cast<float>(double(alpha) * experts / (top_k * len) / len * count[e]) : 0.f;
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// One warp per token; expert e in lane e % 32, slot e / 32 (as the forward).
__global__ void RouterBackwardKernel(RouterBackwardArgs a, const float* coef) {
  const int lane = threadIdx.x % 32;
  const int token = blockIdx.x * kWarps + threadIdx.x / 32;
  if (token >= a.tokens) return;
  const int E = a.experts, K = a.top_k;
  const float* sc = a.scores + static_cast<int64_t>(token) * E;
  const uint16_t* id = a.ids + static_cast<int64_t>(token) * K;
  const float* dg = a.dgates + static_cast<int64_t>(token) * K;
  float s[kPerLane], dl[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = i * 32 + lane;
    s[i] = e < E ? sc[e] : 0.f;
    dl[i] = 0.f;
  }
  // d gates / d scores at the chosen experts.
  float z = 0.f, dot = 0.f;
  if (a.norm_topk) {
    for (int j = 0; j < K; ++j)
      if (id[j] < E) z += sc[id[j]];
    for (int j = 0; j < K; ++j)
      if (id[j] < E) dot += dg[j] * (sc[id[j]] / z);
  }
  for (int j = 0; j < K; ++j) {
    const int e = id[j];
    if (e >= E || e % 32 != lane) continue;
    const float d = a.norm_topk ? a.route_scale * (dg[j] - dot) / z : a.route_scale * dg[j];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (i == e / 32) dl[i] += d;
  }
  if (coef) {  // balance loss through s / sum(s)
    int lo = 0, hi = a.sequences;  // find q with seq_offsets[q] <= token < seq_offsets[q + 1]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (a.seq_offsets[mid] <= token) lo = mid; else hi = mid;
    }
    if (token >= a.seq_offsets[lo] && token < a.seq_offsets[lo + 1]) {
      const float* f = coef + static_cast<int64_t>(lo) * E;
      float fe[kPerLane], zs = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        fe[i] = i * 32 + lane < E ? f[i * 32 + lane] : 0.f;
        zs += s[i];
      }
      zs = WarpSum(zs);
      float fdot = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) fdot += fe[i] * s[i] / zs;
      fdot = WarpSum(fdot);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) dl[i] += (fe[i] - fdot) / zs;
    }
  }
  if (a.sigmoid) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dl[i] *= s[i] * (1.f - s[i]);
  } else {
    float sdot = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) sdot += dl[i] * s[i];
    sdot = WarpSum(sdot);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dl[i] = s[i] * (dl[i] - sdot);
  }
  float* out = a.dlogits + static_cast<int64_t>(token) * E;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    if (i * 32 + lane < E) out[i * 32 + lane] = dl[i];
}

}  // namespace

size_t RouterBackwardWorkspaceBytes(int sequences, int experts) {
  if (sequences <= 0 || experts <= 0) return 0;
  return sizeof(float) * static_cast<size_t>(sequences) * experts;
}

Status RouterBackward(const RouterBackwardArgs& a, cudaStream_t stream) {
  if (a.tokens < 0) return Status::InvalidArgument("router backward: tokens < 0");
  if (a.experts < 1 || a.experts > kRouterMaxExperts)
    return Status::InvalidArgument("router backward: experts must be in 1.." + std::to_string(kRouterMaxExperts) +
                                   ", got " + std::to_string(a.experts));
  if (a.top_k < 1 || a.top_k > std::min(a.experts, kRouterMaxTopK))
    return Status::InvalidArgument("router backward: top_k must be in 1..min(experts, " +
                                   std::to_string(kRouterMaxTopK) + "), got " + std::to_string(a.top_k));
  if (!(a.balance_alpha >= 0.f) || !std::isfinite(a.balance_alpha))
    return Status::InvalidArgument("router backward: balance_alpha must be a finite value >= 0");
  if (a.tokens == 0) return Status::OK();
  if (!a.scores || !a.ids || !a.dgates || !a.dlogits)
    return Status::InvalidArgument("router backward: null scores, ids, dgates or dlogits");
  const float* coef = nullptr;
  if (a.balance_alpha > 0.f) {
    if (a.sequences < 1 || !a.seq_offsets)
      return Status::InvalidArgument("router backward: the balance loss needs seq_offsets of >= 1 sequence");
    const size_t need = RouterBackwardWorkspaceBytes(a.sequences, a.experts);
    if (!a.workspace || a.workspace_bytes < need)
      return Status::InvalidArgument("router backward: workspace of " + std::to_string(a.workspace_bytes) +
                                     " bytes, needs " + std::to_string(need));
    float* c = static_cast<float*>(a.workspace);
    BalanceCoefKernel<<<a.sequences, 256, 0, stream>>>(a.ids, a.seq_offsets, a.experts, a.top_k, a.balance_alpha,
                                                       c);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return Status::Internal(std::string("router balance launch: ") + cudaGetErrorString(err));
    coef = c;
  }
  const int blocks = (a.tokens + kWarps - 1) / kWarps;
  RouterBackwardKernel<<<blocks, kWarps * 32, 0, stream>>>(a, coef);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string("router backward launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace grove::kernels
