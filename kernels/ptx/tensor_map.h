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

// A stack of `planes` such matrices [rows, cols], plane p starting
// `plane_stride_elems` elements after plane p-1 (a multiple of 8, planes may
// overlap or leave gaps), read in boxes of [box_rows, box_cols] of one
// plane (coordinates: column, row, plane). Elements past a plane's `rows`
// or `cols` are read as zeros even where memory follows (the next plane or
// a gap): what a 2-D map over all the planes' rows cannot give.
Status MakeTensorMap3dBf16Swizzled(CUtensorMap* map, const void* base, uint64_t planes,
                                   uint64_t rows, uint64_t cols, uint64_t row_stride_elems,
                                   uint64_t plane_stride_elems, uint32_t box_rows,
                                   uint32_t box_cols, uint32_t swizzle_bytes);

// A 2-D row-major fp32 tensor [rows, cols] (row stride `row_stride_elems`
// >= cols, a multiple of 4 so rows start 16-byte aligned) in boxes of
// [box_rows, box_cols] whose rows are one swizzle span: box_cols * 4 ==
// swizzle_bytes (64 or 128), box_rows <= 256, `base` 16-byte aligned. For
// TMA reductions (cp_reduce_async_bulk_tensor_2d_s2g_add): box elements
// outside the tensor are dropped.
Status MakeTensorMap2dF32Swizzled(CUtensorMap* map, const void* base, uint64_t rows,
                                  uint64_t cols, uint64_t row_stride_elems, uint32_t box_rows,
                                  uint32_t box_cols, uint32_t swizzle_bytes);

}  // namespace grove::ptx
