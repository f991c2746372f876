// Helpers for the GPU kernel tests: skipping without a GPU, device buffers,
// bf16 on the host, and the error metrics the tests assert on.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace grove::kernels::testing {

// True when a CUDA device is usable; GPU tests GTEST_SKIP otherwise.
inline bool HaveGpu() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// Whether the current device runs sm_90a code (wgmma, TMA): an H100 / H200.
inline bool IsHopper() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return major == 9 && minor == 0;
}

#define GROVE_SKIP_WITHOUT_GPU() \
  do {                           \
    if (!::grove::kernels::testing::HaveGpu()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

#define GROVE_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

// A device allocation freed on scope exit.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t count) : count_(count) {
    if (count_ > 0 && cudaMalloc(&ptr_, count_ * sizeof(T)) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() { if (ptr_) cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }
  size_t count() const { return count_; }
  cudaError_t Upload(const std::vector<T>& host) {
    return cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  cudaError_t Download(std::vector<T>* host) const {
    host->resize(count_);
    return cudaMemcpy(host->data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost);
  }

 private:
  T* ptr_ = nullptr;
  size_t count_;
};

// Fresh seed for every run, printed by the test so a failure can be replayed.
inline uint64_t FreshSeed() { return (uint64_t{std::random_device{}()} << 32) | std::random_device{}(); }

// Random bf16 values in [-1, 1]; `exact` gets the same values as doubles
// (bf16 -> double is exact), so a reference on `exact` sees the kernel's inputs.
inline void RandomBf16(std::mt19937_64& rng, size_t count, std::vector<__nv_bfloat16>* bf16,
                       std::vector<double>* exact) {
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  bf16->resize(count);
  exact->resize(count);
  for (size_t i = 0; i < count; ++i) {
    (*bf16)[i] = __float2bfloat16(dist(rng));
    (*exact)[i] = static_cast<double>(__bfloat162float((*bf16)[i]));
  }
}

// ||out - ref||_2 / ||ref||_2; infinite if any output is NaN or infinite.
inline double RelativeError(const std::vector<double>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return INFINITY;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace grove::kernels::testing
