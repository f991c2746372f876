// Token sampling on the GPU for the rollout engine, one block per row of
// fp32 logits [rows, vocab] (row stride ld):
//
//   logprob[r] = z[tok] - log sum_v exp(z_v)   (temperature 1, full vocab:
//                the model::Completion::logprobs contract, whatever sampled tok)
//   temperature 0: tok = argmax z (lowest id on ties), as model::Sampler.
//   otherwise: p_v ~ exp((z_v - max) / T) restricted to the top_k largest
//              (top_k 0: all), then to the smallest most-likely set whose
//              mass reaches top_p of what is left, renormalized; tok drawn
//              from it with one uniform of Philox4x32-10 (curand) keyed by
//              (seed, seq_id[r]) at offset step[r], so a sequence's draws do
//              not depend on the batch it shares.
//
// The kept set is found by radix selection on the logits' order-preserving
// 32-bit keys, so tokens tied with the k-th largest (or at the top-p cut) are
// all kept (model::Sampler keeps the lower ids of a tie; ties of fp32 logits
// are rare enough that this is a documented difference, not a bug). The
// draw walks the kept tokens in id order (the CPU walks them by
// probability): same distribution, different token for the same uniform,
// so sampled (T > 0) tokens match the CPU engine in distribution only;
// greedy tokens and every logprob match it to fp32 rounding.
//
// Graph-capturable (no host sync). Host header, no device code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

struct SamplingParams {
  float temperature = 1.f;  // >= 0
  float top_p = 1.f;        // (0, 1]
  int top_k = 0;            // >= 0; 0: no cut
  uint64_t seed = 0;
};

// seq_ids int64 [rows], steps int32 [rows] (device): the draw of row r is
// Philox(seed, subsequence seq_ids[r], offset steps[r]). tokens int32
// [rows] and logprobs fp32 [rows] out. vocab >= 1.
Status SampleTokens(const float* logits, int rows, int vocab, int64_t ld, const SamplingParams& params,
                    const int64_t* seq_ids, const int32_t* steps, int32_t* tokens, float* logprobs,
                    cudaStream_t stream);

}  // namespace grove::kernels
