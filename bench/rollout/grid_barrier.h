// What one grid-wide synchronization of a persistent kernel costs (issue 9:
// the persistent batch-1 decode step, kernels/decode_step.cu, meets at ~112
// of them a step): one resident block per SM passing N barriers in one
// cooperative launch, for several ways of building the barrier, bare and
// with a stage head (every block writes its slice of a 4 KB row before the
// barrier and reads all of it after, as a GEMV stage reads the residual).
// Host header.
#pragma once

namespace grove::bench {

// Prints a table: us per barrier for each variant (median of `reps`
// launches of `barriers` barriers each).
void GridBarrierTable(int barriers, int reps);

}  // namespace grove::bench
