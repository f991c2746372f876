// Merging partial softmax states, written once for the device kernels
// (kernels/paged_kv.cu: the warps of one block, and PagedAttentionSplit's
// chunks) and the host, where tests/kernels/softmax_merge_test.cc checks it
// on the CPU against a direct softmax.
//
// A state (m, l, acc) summarizes keys j of one query row: m = max_j s_j,
// l = sum_j e^(s_j - m), acc = sum_j e^(s_j - m) v_j (one output dim). A
// state that saw no key has l = 0 (m = -inf).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define GROVE_SOFTMAX_HD __host__ __device__ __forceinline__
#else
#define GROVE_SOFTMAX_HD inline
#endif

namespace grove::kernels {

// The two per-state steps of a merge, one definition for MergeSoftmaxStates
// and for code that merges in phases (quant_linear.cu's split-KV staging:
// the factors of a head's states once, then each output dim), so both give
// the same bits: state i's factor e^(m_i - mx), and sum += x * factor as
// one fma (no contraction left to the compiler).
GROVE_SOFTMAX_HD float SoftmaxMergeFactor(float m_i, float mx) { return expf(m_i - mx); }
GROVE_SOFTMAX_HD void SoftmaxMergeAdd(float& sum, float x, float factor) { sum = fmaf(x, factor, sum); }

// Merges n states, state i at m[i * ml_stride], l[i * ml_stride],
// acc[i * acc_stride], in index order (so the same bits every run):
// *mx = max m_i, *den = sum l_i e^(m_i - mx), *num = sum acc_i e^(m_i - mx);
// out = num / den. States with l == 0 are skipped; den is 0 when all are.
GROVE_SOFTMAX_HD void MergeSoftmaxStates(int n, const float* m, const float* l, const float* acc, int ml_stride,
                                         int acc_stride, float* mx, float* num, float* den) {
  float M = -INFINITY;
  for (int i = 0; i < n; ++i) M = fmaxf(M, m[i * ml_stride]);
  float nu = 0.f, de = 0.f;
  for (int i = 0; i < n; ++i) {
    const float li = l[i * ml_stride];
    if (li == 0.f) continue;
    const float f = SoftmaxMergeFactor(m[i * ml_stride], M);
    SoftmaxMergeAdd(nu, acc[i * acc_stride], f);
    SoftmaxMergeAdd(de, li, f);
  }
  *mx = M;
  *num = nu;
  *den = de;
}

}  // namespace grove::kernels
