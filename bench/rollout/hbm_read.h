// The HBM read ceiling for the quantized-kernel benchmark: a plain streaming
// read kernel over a device buffer (16-byte loads, grid-stride, every byte
// read once), the number a weight-streaming GEMV is compared against.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace grove::bench {

// Launches one read pass over `bytes` (a multiple of 16) at `buf` on `stream`;
// `sink` (one device uint32) keeps the compiler from dropping the loads.
cudaError_t LaunchHbmRead(const void* buf, size_t bytes, unsigned* sink, cudaStream_t stream);

}  // namespace grove::bench
