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

// State (m, l)'s factor in a merge whose maximum is M: e^(m - M), or 0 for
// a state that saw no key (l == 0; such states add nothing).
GROVE_SOFTMAX_HD float MergeFactor(float m, float l, float M) { return l == 0.f ? 0.f : expf(m - M); }

// Adds a state (acc, l) with factor f to (num, den). Explicit fmas (no
// contraction left to the compiler): the same bits on the host and in every
// kernel that inlines this.
GROVE_SOFTMAX_HD void MergeAdd(float acc, float l, float f, float* num, float* den) {
  *num = fmaf(acc, f, *num);
  *den = fmaf(l, f, *den);
}

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
    MergeAdd(acc[i * acc_stride], li, MergeFactor(m[i * ml_stride], li, M), &nu, &de);
  }
  *mx = M;
  *num = nu;
  *den = de;
}

}  // namespace grove::kernels
