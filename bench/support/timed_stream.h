// A non-blocking CUDA stream with a pair of events around the work to time
// on it, for the GPU benchmarks (include <cuda_runtime_api.h> first; exits
// on a CUDA error, as GROVE_BENCH_CUDA_CHECK does).
#pragma once

#include "bench/support/bench_util.h"

namespace grove::bench {

class TimedStream {
 public:
  TimedStream() {
    GROVE_BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    GROVE_BENCH_CUDA_CHECK(cudaEventCreate(&start_));
    GROVE_BENCH_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~TimedStream() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
    cudaStreamDestroy(stream_);
  }
  TimedStream(const TimedStream&) = delete;
  TimedStream& operator=(const TimedStream&) = delete;

  cudaStream_t stream() const { return stream_; }
  void Start() { GROVE_BENCH_CUDA_CHECK(cudaEventRecord(start_, stream_)); }
  // Records the stop, waits for it and returns the milliseconds since Start.
  float StopMs() {
    GROVE_BENCH_CUDA_CHECK(cudaEventRecord(stop_, stream_));
    GROVE_BENCH_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0.f;
    GROVE_BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms;
  }

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

}  // namespace grove::bench
