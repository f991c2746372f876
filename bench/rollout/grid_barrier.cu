#include "bench/rollout/grid_barrier.h"

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "bench/support/bench_util.h"
#include "bench/support/timed_stream.h"
#include "kernels/ptx/grid_sync.cuh"

namespace grove::bench {
namespace {

constexpr int kThreads = 256;
constexpr int kRow = 1024;  // floats of the stage head's row (gpu-ref's hidden)

enum class Kind {
  kReleaseAcquire,  // decode_step.cu's: thread 0 red.release.gpu.add, spins on ld.acquire.gpu
  kRelaxedPollFence,  // the same add; spins on ld.relaxed.gpu, one fence.acq_rel.gpu after
  kFenceAtomic,     // __threadfence + atomicAdd, volatile spin, __threadfence
  kCooperativeGroups,  // cooperative_groups::this_grid().sync()
  kFlags,           // a flag a block (st.release.gpu); warp 0 polls all of them (ld.acquire.gpu)
  kFewProducers,    // only 16 blocks arrive, all wait: a dataflow dependency on 16 items
};

__device__ __forceinline__ uint32_t LoadRelaxed(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void StoreRelease(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

struct Args {
  uint32_t* sync;  // counter at [0]; flags at [32 ..)
  float* row;      // [2][kRow]
  float* sink;
  int barriers;
  bool head;
};

template <Kind K>
__device__ __forceinline__ void Barrier(uint32_t* sync, uint32_t epoch) {
  if constexpr (K == Kind::kCooperativeGroups) {
    cooperative_groups::this_grid().sync();
    return;
  }
  __syncthreads();
  if constexpr (K == Kind::kReleaseAcquire || K == Kind::kRelaxedPollFence || K == Kind::kFewProducers) {
    constexpr uint32_t kFew = 16;
    const uint32_t producers = K == Kind::kFewProducers ? kFew : gridDim.x;
    if (threadIdx.x == 0) {
      if (blockIdx.x < producers) ptx::red_release_gpu_add(sync, 1u);
      if constexpr (K == Kind::kRelaxedPollFence) {
        while (LoadRelaxed(sync) < epoch * producers) {
        }
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
      } else {
        while (ptx::ld_acquire_gpu(sync) < epoch * producers) {
        }
      }
    }
  } else if constexpr (K == Kind::kFenceAtomic) {
    if (threadIdx.x == 0) {
      __threadfence();
      atomicAdd(sync, 1u);
      while (*reinterpret_cast<volatile uint32_t*>(sync) < epoch * gridDim.x) {
      }
      __threadfence();
    }
  } else if constexpr (K == Kind::kFlags) {
    uint32_t* flags = sync + 32;
    if (threadIdx.x == 0) StoreRelease(flags + blockIdx.x, epoch);
    if (threadIdx.x < 32) {
      for (;;) {
        bool done = true;
        for (int b = threadIdx.x; b < int(gridDim.x); b += 32) done &= ptx::ld_acquire_gpu(flags + b) >= epoch;
        if (__all_sync(0xffffffffu, done)) break;
      }
    }
  }
  __syncthreads();
}

template <Kind K>
__global__ void __launch_bounds__(kThreads, 1) BarrierKernel(Args a) {
  __shared__ float red[kThreads / 32];
  float acc = 0.f;
  for (int s = 1; s <= a.barriers; ++s) {
    float* row = a.row + (s & 1) * kRow;
    if (a.head) {
      const int per = kRow / int(gridDim.x) + 1;
      for (int j = blockIdx.x * per + threadIdx.x; j < min(kRow, int(blockIdx.x + 1) * per); j += blockDim.x)
        row[j] = float(s + j);
    }
    Barrier<K>(a.sync, uint32_t(s));
    if (a.head) {
      // Every block reads the whole row and reduces it (an RMSNorm's rstd).
      float v = 0.f;
      for (int j = threadIdx.x; j < kRow; j += blockDim.x) v += row[j] * row[j];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
      __syncthreads();
      if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < kThreads / 32; ++w) t += red[w];
        acc += t;
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0 && acc == -1.f) a.sink[blockIdx.x] = acc;
}

struct Variant {
  const char* name;
  void (*kernel)(Args);
};

}  // namespace

void GridBarrierTable(int barriers, int reps) {
  int device = 0, sms = 0;
  GROVE_BENCH_CUDA_CHECK(cudaGetDevice(&device));
  GROVE_BENCH_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  uint32_t* sync = nullptr;
  float *row = nullptr, *sink = nullptr;
  const size_t sync_bytes = sizeof(uint32_t) * (32 + size_t(sms));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&sync, sync_bytes));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&row, sizeof(float) * 2 * kRow));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&sink, sizeof(float) * sms));
  TimedStream timed;
  cudaStream_t stream = timed.stream();
  const Variant variants[] = {
      {"release add, acquire spin (decode_step's)", BarrierKernel<Kind::kReleaseAcquire>},
      {"release add, relaxed spin + acq_rel fence", BarrierKernel<Kind::kRelaxedPollFence>},
      {"threadfence + atomicAdd, volatile spin", BarrierKernel<Kind::kFenceAtomic>},
      {"cooperative_groups grid.sync", BarrierKernel<Kind::kCooperativeGroups>},
      {"a release flag a block, warp 0 polls all", BarrierKernel<Kind::kFlags>},
      {"16 producers, every block waits", BarrierKernel<Kind::kFewProducers>},
  };
  std::printf("grid barriers: %d blocks x %d threads, one cooperative launch of %d barriers, median of %d (us per barrier)\n",
              sms, kThreads, barriers, reps);
  std::printf("%-46s %10s %14s\n", "variant", "bare", "+ 4 KB head");
  for (const Variant& v : variants) {
    double us[2];
    for (int head = 0; head < 2; ++head) {
      std::vector<float> t;
      for (int r = 0; r < reps + 1; ++r) {
        GROVE_BENCH_CUDA_CHECK(cudaMemsetAsync(sync, 0, sync_bytes, stream));
        Args args{sync, row, sink, barriers, head == 1};
        void* params[] = {&args};
        timed.Start();
        GROVE_BENCH_CUDA_CHECK(
            cudaLaunchCooperativeKernel(reinterpret_cast<void*>(v.kernel), dim3(sms), dim3(kThreads), params, 0, stream));
        const float ms = timed.StopMs();
        if (r > 0) t.push_back(ms);  // the first launch is a warm-up
      }
      std::sort(t.begin(), t.end());
      us[head] = 1e3 * t[t.size() / 2] / barriers;
    }
    std::printf("%-46s %10.2f %14.2f\n", v.name, us[0], us[1]);
  }
  cudaFree(sync);
  cudaFree(row);
  cudaFree(sink);
}

}  // namespace grove::bench
