// Device helpers shared by the sm_90a attention kernels (attention_wgmma.cu,
// attention_wgmma_bwd.cu).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace grove::kernels::detail {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Keeps the compiler from moving accesses to registers that an in-flight
// wgmma reads or writes across this point (it does not know about them).
template <int N>
__device__ __forceinline__ void PinRegs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void PinRegs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

// Zeroes rows first_row .. rows-1 of a tile of two [rows][64] bf16 boxes
// (128-byte rows; the swizzle permutes 16-byte chunks within a row, so rows
// stay rows). All 256 consumer threads (threads 128..383) call it; the
// caller then makes the zeros visible to wgmma (fence.proxy.async) and
// syncs both consumer warpgroups.
__device__ __forceinline__ void ClearRowsFrom(uint8_t* tile, int rows, int first_row) {
  const int clear = rows - first_row, chunks = 2 * clear * 8;
  for (int idx = int(threadIdx.x) - 128; idx < chunks; idx += 256) {
    const int box = idx / (clear * 8), rem = idx % (clear * 8);
    *reinterpret_cast<uint4*>(tile + box * rows * 128 + (first_row + rem / 8) * 128 + (rem % 8) * 16) =
        make_uint4(0, 0, 0, 0);
  }
}

}  // namespace grove::kernels::detail
