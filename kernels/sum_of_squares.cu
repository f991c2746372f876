#include "kernels/sum_of_squares.h"

#include <cstdint>
#include <string>

namespace grove::kernels {
namespace {

// Enough blocks of 256 threads to keep ~8 float4 loads in flight per SM
// thread slot on a 132-SM H100 (a streaming read needs many bytes in
// flight); fixed, so the summation order never depends on the GPU.
constexpr int kThreads = 256;
constexpr int kBlocks = 1024;

// Fixed-order block sum: warp butterflies, then warp 0 over the warps' sums.
__device__ double BlockSum(double v, double* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = 0;
  if (warp == 0) {
    v = lane < kThreads / 32 ? smem[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

struct Runs {
  SquaresRun run[kSumOfSquaresMaxRuns];
  int count;
};

// This thread's share of one run: a fixed strided slice, in double.
__device__ __forceinline__ double RunSquares(const float* __restrict__ x, int64_t count) {
  const int64_t quads = count / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  double acc = 0;
  int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  // Four independent loads per iteration: the read is latency-bound otherwise.
  for (; i + 3 * stride < quads; i += 4 * stride) {
    float4 a = __ldcs(x4 + i), b = __ldcs(x4 + i + stride), c = __ldcs(x4 + i + 2 * stride),
           d = __ldcs(x4 + i + 3 * stride);
    acc += double(a.x) * a.x + double(a.y) * a.y + double(a.z) * a.z + double(a.w) * a.w;
    acc += double(b.x) * b.x + double(b.y) * b.y + double(b.z) * b.z + double(b.w) * b.w;
    acc += double(c.x) * c.x + double(c.y) * c.y + double(c.z) * c.z + double(c.w) * c.w;
    acc += double(d.x) * d.x + double(d.y) * d.y + double(d.z) * d.z + double(d.w) * d.w;
  }
  for (; i < quads; i += stride) {
    float4 a = __ldcs(x4 + i);
    acc += double(a.x) * a.x + double(a.y) * a.y + double(a.z) * a.z + double(a.w) * a.w;
  }
  // The last count % 4 elements: block 0's first threads.
  if (blockIdx.x == 0 && threadIdx.x < count % 4) {
    const float t = x[quads * 4 + threadIdx.x];
    acc += double(t) * t;
  }
  return acc;
}

__global__ void __launch_bounds__(kThreads) PartialSumsKernel(const Runs runs, const double* __restrict__ extra,
                                                              int64_t extra_count, double* __restrict__ partials) {
  __shared__ double smem[kThreads / 32];
  double acc = 0;
  for (int r = 0; r < runs.count; ++r) acc += RunSquares(runs.run[r].data, runs.run[r].count);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < extra_count; i += int64_t(gridDim.x) * kThreads)
    acc += extra[i];
  const double block = BlockSum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = block;
}

__global__ void __launch_bounds__(kThreads) FinalSumKernel(const double* __restrict__ partials, int n,
                                                           double* __restrict__ result) {
  __shared__ double smem[kThreads / 32];
  double acc = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) acc += partials[i];
  const double total = BlockSum(acc, smem);
  if (threadIdx.x == 0) *result = total;
}

}  // namespace

size_t SumOfSquaresWorkspaceBytes() { return sizeof(double) * kBlocks; }

Status SumOfSquaresOfRuns(const SquaresRun* runs, int run_count, const double* partials, int64_t partial_count,
                          double* result, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (run_count < 0 || run_count > kSumOfSquaresMaxRuns || (run_count > 0 && !runs))
    return Status::InvalidArgument("SumOfSquares: " + std::to_string(run_count) + " runs, at most " +
                                   std::to_string(kSumOfSquaresMaxRuns));
  if (partial_count < 0 || (partial_count > 0 && !partials))
    return Status::InvalidArgument("SumOfSquares: negative partial count or null partials");
  if (!result || !workspace) return Status::InvalidArgument("SumOfSquares: null result or workspace");
  Runs table{};
  for (int i = 0; i < run_count; ++i) {
    const SquaresRun& r = runs[i];
    if (r.count < 0) return Status::InvalidArgument("SumOfSquares: negative count " + std::to_string(r.count));
    if (r.count > 0 && !r.data) return Status::InvalidArgument("SumOfSquares: null input");
    if (reinterpret_cast<uintptr_t>(r.data) % 16 != 0)
      return Status::InvalidArgument("SumOfSquares: input not 16-byte aligned");
    table.run[table.count++] = r;
  }
  if (workspace_bytes < SumOfSquaresWorkspaceBytes())
    return Status::InvalidArgument("SumOfSquares: workspace of " + std::to_string(workspace_bytes) + " bytes, needs " +
                                   std::to_string(SumOfSquaresWorkspaceBytes()));
  auto* block_sums = static_cast<double*>(workspace);
  PartialSumsKernel<<<kBlocks, kThreads, 0, stream>>>(table, partials, partial_count, block_sums);
  FinalSumKernel<<<1, kThreads, 0, stream>>>(block_sums, kBlocks, result);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string("SumOfSquares: launch: ") + cudaGetErrorString(err));
  return Status::OK();
}

Status SumOfSquares(const float* x, int64_t count, double* result, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream) {
  if (count < 0) return Status::InvalidArgument("SumOfSquares: negative count " + std::to_string(count));
  if (!result || !workspace || (count > 0 && !x))
    return Status::InvalidArgument("SumOfSquares: null input, result or workspace");
  const SquaresRun run{x, count};
  return SumOfSquaresOfRuns(&run, 1, nullptr, 0, result, workspace, workspace_bytes, stream);
}

}  // namespace grove::kernels
