#include "kernels/router.h"

#include <algorithm>
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
