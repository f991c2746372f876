// Glue kernels of GpuTransformer (internal to model/gpu_transformer.cc):
// the data movement between the big kernels of kernels/ and cuBLAS that is
// specific to how the model lays its tensors out. Each launcher only
// enqueues work on `stream`; shapes are checked by the caller. bf16 is
// __nv_bfloat16, every pointer a device pointer, rows of bf16 tensors
// 16-byte aligned (widths multiples of 8).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace grove::model::gpu {

using bf16 = __nv_bfloat16;

// dst[i] = bf16(src[i]).
void CastToBf16(const float* src, bf16* dst, int64_t n, cudaStream_t stream);
// dst[i] += float(src[i]).
void AddBf16Into(const bf16* src, float* dst, int64_t n, cudaStream_t stream);

// Expert weights from the layout-ordered bf16 mirror into one [experts, n, k]
// tensor per kind: expert e's [n, k] block starts at src + e * expert_stride.
// transpose=true writes [experts, k, n] instead (for dA = dY W).
void PackExperts(const bf16* src, int64_t expert_stride, int experts, int n, int k, bool transpose,
                 bf16* dst, cudaStream_t stream);

// out[r] = table[tokens[r]] (rows of width h).
void EmbeddingGather(const int32_t* tokens, const bf16* table, bf16* out, int rows, int h,
                     cudaStream_t stream);
// dtable[tokens[r]] += d[r] (fp32 atomics: repeated tokens add up).
void EmbeddingScatterAdd(const int32_t* tokens, const float* d, float* dtable, int rows, int h,
                         cudaStream_t stream);

// Rotary embedding in place on x [rows, heads, head_dim] with the model's
// "rotate half" pairs (i, i + head_dim/2); angle table cos/sin [max_pos,
// head_dim/2] fp32; pos[r] the row's position. inverse: the transpose (backward).
void Rope(bf16* x, const int32_t* pos, const float* cos_t, const float* sin_t, int rows, int heads,
          int head_dim, bool inverse, cudaStream_t stream);

// Rows of src gathered: dst[i] = src[index[i]].
void GatherRows(const bf16* src, const int32_t* index, bf16* dst, int rows, int h, cudaStream_t stream);
// dst[index[i]] = src[i] (dst pre-zeroed; indices distinct).
void ScatterRows(const float* src, const int32_t* index, float* dst, int rows, int h, cudaStream_t stream);

// Grouping of routed (token, slot) pairs by expert, stable in token order:
// counts[e], offsets[e] (exclusive prefix, offsets[experts] = rows*top_k),
// pos[t*top_k+j] = the pair's row in the grouped order, src[pos] = t*top_k+j.
void MoeGroup(const uint16_t* ids, int rows, int top_k, int experts, int32_t* counts, int32_t* offsets,
              int32_t* pos, int32_t* src, cudaStream_t stream);
// xe[p] = x[src[p] / top_k] for p < rows*top_k.
void MoeGather(const bf16* x, const int32_t* src, bf16* xe, int rows, int top_k, int h, cudaStream_t stream);
// x[t] = bf16(x[t] + shared[t] + sum_j gates[t,j] * y[pos[t,j]]); shared may be null.
void MoeCombine(bf16* x, const float* shared, const bf16* y, const float* gates, const int32_t* pos, int rows,
                int top_k, int h, cudaStream_t stream);
// Backward of the combine for the routed part: dy[p] = gate * dout[t],
// dgate[t,j] = dout[t] . y[p] (p = pos[t,j]).
void MoeCombineBackward(const bf16* dout, const bf16* y, const float* gates, const int32_t* pos, bf16* dy,
                        float* dgate, int rows, int top_k, int h, cudaStream_t stream);
// dx[t] += sum_j (a[p] + b[p]) over p = pos[t,j] (the expert inputs' gradients).
void MoeScatterBackward(const float* a, const float* b, const int32_t* pos, float* dx, int rows, int top_k,
                        int h, cudaStream_t stream);

// Sequence-wise balance loss statistics (model/moe.h): per sequence q and
// expert e, prob_mean[q,e] = mean over its rows of s_e / sum s, count[q,e]
// = routed pairs. seq[r]: the row's sequence; seq_len[q] rows of q. Both
// outputs are overwritten.
void BalanceStats(const float* scores, const uint16_t* ids, const int32_t* seq, const int32_t* seq_len,
                  int rows, int seqs, int experts, int top_k, float* prob_mean, int32_t* count,
                  cudaStream_t stream);

// d(router logits) [rows, experts] (bf16, for the dX / dW GEMMs) from
// dgate [rows, top_k] through gates (norm_topk, route_scale) and the
// score function, plus the balance loss's gradient when alpha > 0 (count,
// seq, seq_len from BalanceStats' inputs).
struct RouterBackwardArgs {
  const float* scores;
  const uint16_t* ids;
  const float* gates;
  const float* dgate;
  const int32_t* count;  // [seqs, experts], used when alpha > 0
  const int32_t* seq;
  const int32_t* seq_len;
  bf16* dlogits;
  int rows, experts, top_k;
  bool sigmoid, norm_topk;
  float route_scale, alpha;
};
void RouterBackward(const RouterBackwardArgs& a, cudaStream_t stream);

// Per row of logits [rows, vocab] fp32: lse[r] and logp[r] = z[target] - lse.
void LogProbForward(const float* logits, const int32_t* target, float* lse, float* logp, int rows, int vocab,
                    cudaStream_t stream);
// dz[r, v] = g[r] * (onehot(target) - exp(z - lse)) as bf16.
void LogProbBackward(const float* logits, const int32_t* target, const float* lse, const float* g, bf16* dz,
                     int rows, int vocab, cudaStream_t stream);

}  // namespace grove::model::gpu
