// What one link of the decode step's kernel chain costs before any real
// work (issue 9): a chain of dependent kernels captured in one CUDA graph,
// with and without programmatic dependent launch, empty or streaming a
// slice of weights like a batch-1 GEMV. Host header.
#pragma once

namespace grove::bench {

// Prints a table: us per kernel for each chain variant (median of `reps`
// graph launches of `links` kernels each).
void LaunchChainTable(int links, int reps);

}  // namespace grove::bench
