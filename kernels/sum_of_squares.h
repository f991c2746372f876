// The sum of squares of a flat fp32 buffer on the device (the optimizer's
// global gradient norm is its square root), deterministic: each thread sums
// a fixed strided slice in double, blocks reduce in a fixed tree order into
// one partial each, and a second one-block pass adds the partials in order,
// so the same input gives the same bits every run. Double accumulation keeps
// the result within a few ulps of double of the exact sum at any length the
// buffer can have (a float accumulator over ~10^4 terms per thread would
// lose ~10^-4 relative). Non-finite elements make the result non-finite.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"

namespace grove::kernels {

// Bytes of scratch SumOfSquares needs (independent of the buffer's length).
size_t SumOfSquaresWorkspaceBytes();

// *result (device, one double) = sum of x[i]^2 over i < count. x device,
// 16-byte aligned; count >= 0 (0 gives 0). Work is enqueued on `stream`.
// InvalidArgument for null or misaligned pointers, a negative count or a
// workspace smaller than SumOfSquaresWorkspaceBytes(); Internal for a CUDA
// launch error.
Status SumOfSquares(const float* x, int64_t count, double* result, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream);

// A piece of a sum of squares: `count` floats from `data` (device, 16-byte
// aligned; count >= 0).
struct SquaresRun {
  const float* data = nullptr;
  int64_t count = 0;
};
constexpr int kSumOfSquaresMaxRuns = 128;

// *result = the sum of x^2 over every element of runs[0 .. run_count) plus the sum of
// partials[0 .. partial_count) (device doubles, e.g. the squares a kernel
// summed as it wrote its output: GroupedWeightGradArgs::sum_sq), in the
// same deterministic way as SumOfSquares (with one run and no partials, the
// same bits). At most kSumOfSquaresMaxRuns runs (host array); InvalidArgument
// beyond, or as SumOfSquares.
Status SumOfSquaresOfRuns(const SquaresRun* runs, int run_count, const double* partials, int64_t partial_count,
                          double* result, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace grove::kernels
