// Host side of the TMA: building the CUtensorMap that cp.async.bulk.tensor
// (kernels/ptx/tma.cuh) reads. The driver entry point is looked up through
// the CUDA runtime, so nothing links libcuda directly.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "base/status.h"

namespace grove::ptx {

// A 2-D row-major bf16 tensor [rows, cols] (cols contiguous, row stride
// `row_stride_elems` >= cols, a multiple of 8 so rows start 16-byte aligned)
// read in boxes of [box_rows, box_cols] whose rows are one swizzle span:
// box_cols * 2 == swizzle_bytes (64 or 128), box_rows <= 256, `base`
// 16-byte aligned. Elements of a box outside the tensor are read as zeros.
Status MakeTensorMap2dBf16Swizzled(CUtensorMap* map, const void* base, uint64_t rows,
                                   uint64_t cols, uint64_t row_stride_elems, uint32_t box_rows,
                                   uint32_t box_cols, uint32_t swizzle_bytes);

}  // namespace grove::ptx
