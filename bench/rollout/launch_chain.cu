#include "bench/rollout/launch_chain.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "bench/support/bench_util.h"
#include "bench/support/timed_stream.h"
#include "kernels/launch.cuh"
#include "kernels/programmatic_launch.h"
#include "kernels/ptx/griddepcontrol.cuh"

namespace grove::bench {
namespace {

constexpr int kVector = 1024;      // floats each link reads from the last (gpu-ref's hidden row)
constexpr int kLinkBlocks = 128;   // blocks of a full-grid link
constexpr int kLinkThreads = 256;
constexpr int kLoads = 4;          // 16-byte weight loads per thread: 128 x 256 x 4 x 16 B = 2 MiB a link

struct LinkArgs {
  const float* in;   // [kVector]: what the previous link wrote
  float* out;        // [kVector]
  const uint4* w;    // this link's weights (kLinkBlocks * kLinkThreads * kLoads), or null
  bool early;        // weight loads issued before griddepcontrol.wait
  bool reads_in;     // the link reads `in` (a data dependency on the previous link)
};

// One link: optionally streams its weight slice (before or after the wait),
// reads the previous link's vector, writes its own. The arithmetic only
// keeps the loads alive.
__global__ void __launch_bounds__(kLinkThreads) ChainLink(LinkArgs a) {
  uint4 v[kLoads] = {};
  const uint4* wb = a.w ? a.w + (size_t{blockIdx.x} * blockDim.x * kLoads) : nullptr;
  if (wb && a.early)
#pragma unroll
    for (int i = 0; i < kLoads; ++i) v[i] = __ldg(wb + i * blockDim.x + threadIdx.x);
  ptx::griddepcontrol_wait();
  ptx::griddepcontrol_launch_dependents();
  if (wb && !a.early)
#pragma unroll
    for (int i = 0; i < kLoads; ++i) v[i] = __ldg(wb + i * blockDim.x + threadIdx.x);
  float acc = 0.f;
  if (a.reads_in)
    for (int j = threadIdx.x; j < kVector; j += blockDim.x) acc += a.in[j];
#pragma unroll
  for (int i = 0; i < kLoads; ++i) acc += __uint_as_float((v[i].x ^ v[i].y ^ v[i].z ^ v[i].w) & 0x3f800000u);
  const int j = (blockIdx.x * blockDim.x + threadIdx.x) % kVector;
  if (blockIdx.x * blockDim.x + threadIdx.x < kVector) a.out[j] = acc;
}

struct Variant {
  const char* name;
  int blocks, threads;
  bool pdl, weights, early, reads_in;
};

}  // namespace

void LaunchChainTable(int links, int reps) {
  const size_t link_w = size_t{kLinkBlocks} * kLinkThreads * kLoads;  // uint4 per link
  uint4* w = nullptr;
  float* vec = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&w, link_w * 16 * links));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(w, 1, link_w * 16 * links));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&vec, 2 * kVector * sizeof(float)));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(vec, 0, 2 * kVector * sizeof(float)));
  TimedStream timed;
  cudaStream_t stream = timed.stream();

  const Variant variants[] = {
      {"empty, 1 block", 1, 32, false, false, false, false},
      {"empty, 1 block, PDL", 1, 32, true, false, false, false},
      {"empty, 128 x 256", kLinkBlocks, kLinkThreads, false, false, false, false},
      {"empty, 128 x 256, PDL", kLinkBlocks, kLinkThreads, true, false, false, false},
      {"reads the last link's 4 KB, PDL", kLinkBlocks, kLinkThreads, true, false, false, true},
      {"+ 2 MiB of weights, no PDL", kLinkBlocks, kLinkThreads, false, true, false, true},
      {"+ 2 MiB of weights after the wait, PDL", kLinkBlocks, kLinkThreads, true, true, false, true},
      {"+ 2 MiB of weights before the wait, PDL", kLinkBlocks, kLinkThreads, true, true, true, true},
  };
  std::printf("\nkernel chain: %d dependent links in one CUDA graph, median of %d graph launches, us per link\n",
              links, reps);
  std::printf("(2 MiB a link at the 2.82 TB/s read ceiling: %.2f us)\n", 2.0 * 1048576 / 2.82e6);
  std::printf("| link | us per link |\n| --- | --- |\n");
  for (const Variant& v : variants) {
    cudaGraph_t graph;
    GROVE_BENCH_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    {
      const kernels::ScopedProgrammaticLaunch pdl(v.pdl);
      for (int i = 0; i < links; ++i) {
        LinkArgs a;
        a.in = vec + (i % 2) * kVector;
        a.out = vec + ((i + 1) % 2) * kVector;
        a.w = v.weights ? w + link_w * i : nullptr;
        a.early = v.early;
        a.reads_in = v.reads_in;
        GROVE_BENCH_CUDA_CHECK(kernels::LaunchKernel(ChainLink, dim3(v.blocks), dim3(v.threads), 0, stream, a));
      }
    }
    GROVE_BENCH_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec;
    GROVE_BENCH_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    GROVE_BENCH_CUDA_CHECK(cudaGraphLaunch(exec, stream));  // warm-up
    std::vector<float> ms;
    for (int r = 0; r < reps; ++r) {
      timed.Start();
      GROVE_BENCH_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      ms.push_back(timed.StopMs());
    }
    std::sort(ms.begin(), ms.end());
    std::printf("| %s | %.2f |\n", v.name, 1000.0 * ms[ms.size() / 2] / links);
    GROVE_BENCH_CUDA_CHECK(cudaGraphExecDestroy(exec));
    GROVE_BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
  }
  cudaFree(vec);
  cudaFree(w);
}

}  // namespace grove::bench
