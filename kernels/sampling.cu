#include "kernels/sampling.h"

#include <curand_kernel.h>

#include <climits>
#include <cmath>
#include <string>

namespace grove::kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Order-preserving map of fp32 to uint32: a < b iff key(a) < key(b).
__device__ inline uint32_t OrderKey(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ int operator()(int a, int b) const { return max(a, b); }
};
struct MinOp {
  __device__ int operator()(int a, int b) const { return min(a, b); }
};

// Every thread gets the reduction of v over the block (warps combined in a
// fixed order: deterministic). smem: kWarps values.
template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, T* smem) {
  for (int d = 16; d > 0; d /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, d));
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(kThreads)
    SampleKernel(const float* logits, int vocab, int64_t ld, SamplingParams p, const int64_t* seq_ids,
                 const int32_t* steps, int32_t* tokens, float* logprobs) {
  __shared__ float sf[kWarps];
  __shared__ int si[kWarps];
  __shared__ float s_excl[kWarps];
  __shared__ int s_chosen;
  __shared__ float s_u;
  const int r = blockIdx.x;
  const float* z = logits + int64_t(r) * ld;

  float mx = -INFINITY;
  for (int v = threadIdx.x; v < vocab; v += kThreads) mx = fmaxf(mx, z[v]);
  mx = BlockReduce(mx, MaxOp{}, sf);
  float se = 0.f;
  for (int v = threadIdx.x; v < vocab; v += kThreads) se += expf(z[v] - mx);
  se = BlockReduce(se, SumOp{}, sf);
  const float lse = mx + logf(se);

  int tok;
  if (!(p.temperature > 0.f)) {
    int am = INT_MAX;
    for (int v = threadIdx.x; v < vocab; v += kThreads)
      if (z[v] == mx) am = min(am, v);
    tok = BlockReduce(am, MinOp{}, si);
    if (tok == INT_MAX) tok = 0;  // all NaN: nothing equals the max
  } else {
    const float inv_t = 1.f / p.temperature;
    // Keep tokens whose key >= thr.
    uint32_t thr = 0;
    if (p.top_k > 0 && p.top_k < vocab) {
      // The largest t with count(key >= t) >= top_k: the key of the k-th largest.
      uint32_t t = 0;
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t cand = t | (1u << bit);
        int count = 0;
        for (int v = threadIdx.x; v < vocab; v += kThreads) count += OrderKey(z[v]) >= cand;
        if (BlockReduce(count, SumOp{}, si) >= p.top_k) t = cand;
      }
      thr = t;
    }
    if (p.top_p < 1.f) {
      float mass = 0.f;
      for (int v = threadIdx.x; v < vocab; v += kThreads)
        if (OrderKey(z[v]) >= thr) mass += expf((z[v] - mx) * inv_t);
      const float target = p.top_p * BlockReduce(mass, SumOp{}, sf);
      // The largest t with mass(key >= max(t, thr)) >= target: the smallest
      // most-likely set reaching top_p of the kept mass.
      uint32_t t = 0;
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t cand = t | (1u << bit);
        const uint32_t cut = cand > thr ? cand : thr;
        float m = 0.f;
        for (int v = threadIdx.x; v < vocab; v += kThreads)
          if (OrderKey(z[v]) >= cut) m += expf((z[v] - mx) * inv_t);
        if (BlockReduce(m, SumOp{}, sf) >= target) t = cand;
      }
      if (t > thr) thr = t;
    }
    // Draw: walk the kept tokens in id order, each thread a contiguous chunk.
    if (threadIdx.x == 0) {
      curandStatePhilox4_32_10_t st;
      curand_init(p.seed, static_cast<unsigned long long>(seq_ids[r]), static_cast<unsigned long long>(steps[r]),
                  &st);
      s_u = curand_uniform(&st);  // (0, 1]
      s_chosen = INT_MAX;
    }
    const int chunk = (vocab + kThreads - 1) / kThreads;
    const int c0 = min(vocab, int(threadIdx.x) * chunk), c1 = min(vocab, c0 + chunk);
    float local = 0.f;
    int last_kept = -1;
    for (int v = c0; v < c1; ++v)
      if (OrderKey(z[v]) >= thr) {
        local += expf((z[v] - mx) * inv_t);
        last_kept = v;
      }
    // Exclusive prefix of `local` over threads: warp scan, then the warp totals.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float incl = local;
    for (int d = 1; d < 32; d *= 2) {
      const float o = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += o;
    }
    if (lane == 31) s_excl[warp] = incl;
    __syncthreads();
    float before = 0.f, total = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += s_excl[w];
      total += s_excl[w];
    }
    const float excl = before + incl - local;
    const float target = s_u * total;
    if (local > 0.f && target >= excl && target < excl + local) {
      float acc = excl;
      int pick = last_kept;
      for (int v = c0; v < c1; ++v)
        if (OrderKey(z[v]) >= thr) {
          acc += expf((z[v] - mx) * inv_t);
          if (target < acc) {
            pick = v;
            break;
          }
        }
      atomicMin(&s_chosen, pick);
    }
    const int fallback = BlockReduce(last_kept, MaxOp{}, si);  // also orders s_chosen's writes before the read
    tok = s_chosen != INT_MAX ? s_chosen : fallback;  // none: the draw fell past the total by rounding
    if (tok < 0) tok = 0;
  }
  if (threadIdx.x == 0) {
    tokens[r] = tok;
    logprobs[r] = z[tok] - lse;
  }
}

}  // namespace

Status SampleTokens(const float* logits, int rows, int vocab, int64_t ld, const SamplingParams& params,
                    const int64_t* seq_ids, const int32_t* steps, int32_t* tokens, float* logprobs,
                    cudaStream_t stream) {
  if (rows < 0 || vocab < 1 || ld < vocab) return Status::InvalidArgument("SampleTokens: bad rows, vocab or ld");
  if (!(params.temperature >= 0.f) || !std::isfinite(params.temperature))
    return Status::InvalidArgument("SampleTokens: temperature must be finite and >= 0");
  if (!(params.top_p > 0.f && params.top_p <= 1.f)) return Status::InvalidArgument("SampleTokens: top_p not in (0, 1]");
  if (params.top_k < 0) return Status::InvalidArgument("SampleTokens: top_k < 0");
  if (rows == 0) return Status::OK();
  if (!logits || !tokens || !logprobs || (params.temperature > 0.f && (!seq_ids || !steps)))
    return Status::InvalidArgument("SampleTokens: null pointer");
  SampleKernel<<<rows, kThreads, 0, stream>>>(logits, vocab, ld, params, seq_ids, steps, tokens, logprobs);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string("SampleTokens launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace grove::kernels
