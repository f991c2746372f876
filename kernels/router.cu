#include "kernels/router.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/launch.cuh"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/router_topk.cuh"

namespace grove::kernels {
namespace {

constexpr int kWarps = 4;

template <int kSlots>
__global__ void RouterTopKKernel(RouterArgs a) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  const int token = blockIdx.x * kWarps + threadIdx.x / 32;
  if (token < a.tokens) RouterTopKWarpN<kSlots>(a, token);
}

}  // namespace

Status CheckRouterArgs(const RouterArgs& a) {
  if (a.tokens < 0) return Status::InvalidArgument("router: tokens < 0");
  if (a.experts < 1 || a.experts > kRouterMaxExperts)
    return Status::InvalidArgument("router: experts must be in 1.." +
                                   std::to_string(kRouterMaxExperts) + ", got " +
                                   std::to_string(a.experts));
  if (a.top_k < 1 || a.top_k > std::min(a.experts, kRouterMaxTopK))
    return Status::InvalidArgument("router: top_k must be in 1..min(experts, " +
                                   std::to_string(kRouterMaxTopK) + "), got " +
                                   std::to_string(a.top_k));
  if (a.out_stride != 0 && a.out_stride < a.top_k)
    return Status::InvalidArgument("router: out_stride must be 0 or >= top_k, got " + std::to_string(a.out_stride));
  if (a.replay_stride != 0 && a.replay_stride < a.top_k)
    return Status::InvalidArgument("router: replay_stride must be 0 or >= top_k, got " +
                                   std::to_string(a.replay_stride));
  if (a.ids_copy && a.ids_copy_stride < a.top_k)
    return Status::InvalidArgument("router: ids_copy_stride must be >= top_k, got " +
                                   std::to_string(a.ids_copy_stride));
  if (a.tokens > 0 && (!a.logits || !a.scores || !a.ids || !a.gates))
    return Status::InvalidArgument("router: null logits or outputs");
  return Status::OK();
}

Status RouterTopK(const RouterArgs& a, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckRouterArgs(a));
  if (a.tokens == 0) return Status::OK();
  const int blocks = (a.tokens + kWarps - 1) / kWarps;
  auto kernel = RouterTopKKernel<8>;
  WithRouterSlots(a.experts, [&](auto slots) { kernel = RouterTopKKernel<decltype(slots)::value>; });
  cudaError_t err = LaunchKernel(kernel, dim3(blocks), dim3(kWarps * 32), 0, stream, a);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess)
    return Status::Internal(std::string("router launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace grove::kernels

namespace grove::kernels {
namespace {

constexpr int kCountSplits = 16;  // blocks per sequence counting its slots

// Slots per (sequence, expert) of the balance loss: sequence q's slots are
// split over kCountSplits blocks; each histograms its share in shared memory
// and adds it to counts[q][e] (integer atomics: exact, order-free).
__global__ void BalanceCountKernel(const uint16_t* ids, const int32_t* seq_offsets, int experts, int top_k,
                                   int32_t* counts) {
  __shared__ int hist[kRouterMaxExperts];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t s0 = static_cast<int64_t>(seq_offsets[blockIdx.x]) * top_k;
  const int64_t s1 = static_cast<int64_t>(seq_offsets[blockIdx.x + 1]) * top_k;
  const int64_t share = (s1 - s0 + gridDim.y - 1) / gridDim.y;
  const int64_t begin = s0 + share * blockIdx.y, end = min(s1, begin + share);
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int e = ids[s];
    if (e < experts) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x)
    if (hist[e]) atomicAdd(&counts[static_cast<int64_t>(blockIdx.x) * experts + e], hist[e]);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// One warp per token; expert e in lane e % 32, slot e / 32 (as the forward).
// Lane j < top_k holds choice j, so the gate terms need no serial loads.
template <int kSlots>
__global__ void RouterBackwardKernel(RouterBackwardArgs a, const int32_t* counts, float* token_loss) {
  const int lane = threadIdx.x % 32;
  const int token = blockIdx.x * kWarps + threadIdx.x / 32;
  if (token >= a.tokens) return;
  const int E = a.experts, K = a.top_k;
  const float* sc = a.scores + static_cast<int64_t>(token) * E;
  float s[kSlots], dl[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int e = i * 32 + lane;
    s[i] = e < E ? sc[e] : 0.f;
    dl[i] = 0.f;
  }
  // Choice j in lane j: its expert, dgate and score.
  int my_id = E;
  float my_dg = 0.f, my_s = 0.f;
  if (lane < K) {
    my_id = a.ids[static_cast<int64_t>(token) * K + lane];
    my_dg = a.dgates[static_cast<int64_t>(token) * K + lane];
    if (my_id < E) my_s = sc[my_id];
  }
  const bool chosen = lane < K && my_id < E;
  float d = a.route_scale * my_dg;  // d gates / d s at the chosen expert
  if (a.norm_topk) {
    const float z = WarpSum(chosen ? my_s : 0.f);
    const float dot = WarpSum(chosen ? my_dg * (my_s / z) : 0.f);
    d = a.route_scale * (my_dg - dot) / z;
  }
  for (int j = 0; j < K; ++j) {
    const int e = __shfl_sync(0xffffffffu, my_id, j);
    const float dj = __shfl_sync(0xffffffffu, d, j);
    if (e >= E || e % 32 != lane) continue;
#pragma unroll
    for (int i = 0; i < kSlots; ++i)
      if (i == e / 32) dl[i] += dj;
  }
  if (counts) {  // balance loss through s / sum(s)
    int lo = 0, hi = a.sequences;  // q with seq_offsets[q] <= token < seq_offsets[q + 1]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (a.seq_offsets[mid] <= token) lo = mid; else hi = mid;
    }
    const int t0 = a.seq_offsets[lo], t1 = a.seq_offsets[lo + 1];
    float fdot = 0.f;
    if (token >= t0 && token < t1) {
      // f_e P_e's coefficient of s_te / z_t: alpha * E / (k len) * count_e / len.
      const double len = t1 - t0;
      const double unit = double(a.balance_alpha) * E / (K * len) / len;
      const int32_t* c = counts + static_cast<int64_t>(lo) * E;
      float fe[kSlots], zs = 0.f;
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        fe[i] = i * 32 + lane < E ? static_cast<float>(unit * c[i * 32 + lane]) : 0.f;
        zs += s[i];
      }
      zs = WarpSum(zs);
#pragma unroll
      for (int i = 0; i < kSlots; ++i) fdot += fe[i] * s[i] / zs;
      fdot = WarpSum(fdot);
#pragma unroll
      for (int i = 0; i < kSlots; ++i) dl[i] += (fe[i] - fdot) / zs;
    }
    if (token_loss && lane == 0) token_loss[token] = fdot;  // this token's share of alpha sum_e f_e P_e
  }
  if (a.sigmoid) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) dl[i] *= s[i] * (1.f - s[i]);
  } else {
    float sdot = 0.f;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) sdot += dl[i] * s[i];
    sdot = WarpSum(sdot);
#pragma unroll
    for (int i = 0; i < kSlots; ++i) dl[i] = s[i] * (dl[i] - sdot);
  }
  float* out = a.dlogits + static_cast<int64_t>(token) * E;
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
    if (i * 32 + lane < E) out[i * 32 + lane] = dl[i];
}

// The balance loss: the per-token shares summed in double, in a fixed order.
constexpr int kLossThreads = 1024;
__global__ void SumLossKernel(const float* token_loss, int tokens, float* loss) {
  __shared__ double part[kLossThreads / 32];
  double v = 0.0;
  for (int t = threadIdx.x; t < tokens; t += kLossThreads) v += token_loss[t];
  for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double all = 0.0;
    for (int w = 0; w < kLossThreads / 32; ++w) all += part[w];
    *loss = static_cast<float>(all);
  }
}

size_t CountBytes(int sequences, int experts) {
  return (sizeof(int32_t) * static_cast<size_t>(sequences) * experts + 255) / 256 * 256;
}

}  // namespace

size_t RouterBackwardWorkspaceBytes(int sequences, int tokens, int experts) {
  if (sequences <= 0 || experts <= 0 || tokens < 0) return 0;
  return CountBytes(sequences, experts) + sizeof(float) * static_cast<size_t>(tokens);
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
  if (a.balance_loss && !(a.balance_alpha > 0.f))
    return Status::InvalidArgument("router backward: balance_loss needs balance_alpha > 0");
  if (a.tokens == 0) {
    if (a.balance_loss && cudaMemsetAsync(a.balance_loss, 0, sizeof(float), stream) != cudaSuccess)
      return Status::Internal("router backward: memset failed");
    return Status::OK();
  }
  if (!a.scores || !a.ids || !a.dgates || !a.dlogits)
    return Status::InvalidArgument("router backward: null scores, ids, dgates or dlogits");
  int32_t* counts = nullptr;
  float* token_loss = nullptr;
  if (a.balance_alpha > 0.f) {
    if (a.sequences < 1 || !a.seq_offsets)
      return Status::InvalidArgument("router backward: the balance loss needs seq_offsets of >= 1 sequence");
    const size_t need = RouterBackwardWorkspaceBytes(a.sequences, a.tokens, a.experts);
    if (!a.workspace || a.workspace_bytes < need)
      return Status::InvalidArgument("router backward: workspace of " + std::to_string(a.workspace_bytes) +
                                     " bytes, needs " + std::to_string(need));
    counts = static_cast<int32_t*>(a.workspace);
    if (a.balance_loss) token_loss = reinterpret_cast<float*>(static_cast<char*>(a.workspace) +
                                                              CountBytes(a.sequences, a.experts));
    if (cudaMemsetAsync(counts, 0, sizeof(int32_t) * static_cast<size_t>(a.sequences) * a.experts, stream) !=
        cudaSuccess)
      return Status::Internal("router backward: memset failed");
    BalanceCountKernel<<<dim3(a.sequences, kCountSplits), 256, 0, stream>>>(a.ids, a.seq_offsets, a.experts,
                                                                          a.top_k, counts);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return Status::Internal(std::string("router balance launch: ") + cudaGetErrorString(err));
  }
  const int blocks = (a.tokens + kWarps - 1) / kWarps;
  // The fewest slots a lane needs (RouterSlotsPerLane): same bits.
  auto kernel = RouterBackwardKernel<8>;
  WithRouterSlots(a.experts, [&](auto slots) { kernel = RouterBackwardKernel<decltype(slots)::value>; });
  kernel<<<blocks, kWarps * 32, 0, stream>>>(a, counts, token_loss);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string("router backward launch: ") + cudaGetErrorString(err));
  if (token_loss) {
    SumLossKernel<<<1, kLossThreads, 0, stream>>>(token_loss, a.tokens, a.balance_loss);
    err = cudaGetLastError();
    if (err != cudaSuccess) return Status::Internal(std::string("router loss launch: ") + cudaGetErrorString(err));
  }
  return Status::OK();
}

}  // namespace grove::kernels
