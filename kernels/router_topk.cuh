// RouterTopK's per-token work as a device function (kernels/router.h has
// the contract): one warp routes one token. Shared by RouterTopK's kernel and
// the batch-1 router GEMV that routes in its last block
// (QuantLinearRmsNormed with a RouterTail), so both give the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/router.h"

namespace grove::kernels {

// The slots a lane needs for `experts` (1, 2, 4 or 8): a lane walks only
// those (with all 8 for gpu-ref's 64 experts the kernel was instruction-
// bound: 58 us for 32k tokens on the H100). Any count >= the need gives the
// same bits: the extra slots hold -inf keys and 0 scores, which no max,
// argmax or sum changes.
__host__ __device__ constexpr int RouterSlotsPerLane(int experts) {
  return experts <= 32 ? 1 : experts <= 64 ? 2 : experts <= 128 ? 4 : 8;
}

// The whole warp calls it (shuffles); expert e lives in lane e % 32, slot e
// / 32; kPerLane >= RouterSlotsPerLane(a.experts).
template <int kPerLane>
__device__ __forceinline__ void RouterTopKWarpN(const RouterArgs& a, int token) {
  const int lane = threadIdx.x % 32;
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
  const int64_t stride = a.out_stride > 0 ? a.out_stride : a.top_k;
  uint16_t* ids = a.ids + static_cast<int64_t>(token) * stride;
  float* gates = a.gates + static_cast<int64_t>(token) * stride;
  // Lane j keeps the j-th choice (top_k <= 16 < 32).
  float my_score = 0.f;
  int my_id = 0;
  for (int j = 0; j < a.top_k; ++j) {
    int best_e;
    if (a.replay_ids) {
      best_e = a.replay_ids[static_cast<int64_t>(token) * (a.replay_stride > 0 ? a.replay_stride : a.top_k) + j];
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
    if (a.ids_copy) a.ids_copy[static_cast<int64_t>(token) * a.ids_copy_stride + lane] = static_cast<uint16_t>(my_id);
    const float g = a.norm_topk ? (z > 0.f ? my_score / z : 0.f) : my_score;
    gates[lane] = g * a.route_scale;
  }
}

// f(std::integral_constant<int, RouterSlotsPerLane(experts)>{}): picks the
// template instance for an expert count (host launches, device dispatch).
template <typename F>
__host__ __device__ __forceinline__ void WithRouterSlots(int experts, F&& f) {
  switch (RouterSlotsPerLane(experts)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// RouterTopKWarpN for a's expert count (a uniform branch).
__device__ __forceinline__ void RouterTopKWarp(const RouterArgs& a, int token) {
  WithRouterSlots(a.experts, [&](auto slots) { RouterTopKWarpN<decltype(slots)::value>(a, token); });
}

}  // namespace grove::kernels
