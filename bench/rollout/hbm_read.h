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

// The same read done by the bulk-copy engine (sm_90): one block an SM
// copies its slice into shared memory in 16 KB pieces, `in_flight` (1-8)
// at a time. `bytes` a multiple of 16 KB.
cudaError_t LaunchHbmBulkRead(const void* buf, size_t bytes, int in_flight, cudaStream_t stream);

}  // namespace grove::bench
