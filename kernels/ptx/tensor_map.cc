#include "kernels/ptx/tensor_map.h"

#include "base/result.h"

#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <string>

namespace grove::ptx {
namespace {

Result<PFN_cuTensorMapEncodeTiled_v12000> EncodeTiledFn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static cudaError_t lookup_error = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult query{};
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                       cudaEnableDefault, &query);
    if (err == cudaSuccess && query != cudaDriverEntryPointSuccess) err = cudaErrorSymbolNotFound;
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
    return err;
  }();
  if (lookup_error != cudaSuccess || fn == nullptr) {
    return Status::Unavailable(std::string("cuTensorMapEncodeTiled not found in the driver: ") +
                               cudaGetErrorString(lookup_error));
  }
  return fn;
}

// Rank 2 or 3: dims innermost first, strides_elems those of dims 1 .. rank - 1
// (elements; the driver wants bytes). bf16 unless `fp32`.
Status EncodeSwizzled(CUtensorMap* map, const void* base, int rank, const cuuint64_t* dims,
                      const cuuint64_t* strides_elems, uint32_t box_rows, uint32_t box_cols,
                      uint32_t swizzle_bytes, bool fp32 = false) {
  const uint32_t elem_bytes = fp32 ? 4 : 2, align_elems = 16 / elem_bytes;
  if (map == nullptr || base == nullptr) return Status::InvalidArgument("tensor map: null pointer");
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0)
    return Status::InvalidArgument("tensor map: base must be 16-byte aligned");
  for (int d = 0; d < rank; ++d)
    if (dims[d] == 0) return Status::InvalidArgument("tensor map: empty tensor");
  if (strides_elems[0] < dims[0] || strides_elems[0] % align_elems != 0)
    return Status::InvalidArgument(
        "tensor map: row stride must be >= cols and a multiple of 16 bytes");
  if (rank == 3 && strides_elems[1] % align_elems != 0)
    return Status::InvalidArgument("tensor map: plane stride must be a multiple of 16 bytes");
  if ((swizzle_bytes != 64 && swizzle_bytes != 128) || box_cols * elem_bytes != swizzle_bytes ||
      box_rows == 0 || box_rows > 256)
    return Status::InvalidArgument(
        "tensor map: swizzle must be 64 or 128 bytes and the box [1..256, one swizzle span]");
  auto fn = EncodeTiledFn();
  if (!fn.ok()) return fn.status();
  const cuuint64_t strides[2] = {strides_elems[0] * elem_bytes,
                                 rank == 3 ? strides_elems[1] * elem_bytes : 0};
  const cuuint32_t box[3] = {box_cols, box_rows, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  CUresult r = (*fn)(map, fp32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, const_cast<void*>(base), dims,
                     strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                     swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return Status::InvalidArgument("cuTensorMapEncodeTiled failed with CUresult " +
                                   std::to_string(static_cast<int>(r)));
  return Status::OK();
}

}  // namespace

Status MakeTensorMap2dBf16Swizzled(CUtensorMap* map, const void* base, uint64_t rows,
                                   uint64_t cols, uint64_t row_stride_elems, uint32_t box_rows,
                                   uint32_t box_cols, uint32_t swizzle_bytes) {
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_stride_elems};
  return EncodeSwizzled(map, base, 2, dims, strides, box_rows, box_cols, swizzle_bytes);
}

Status MakeTensorMap3dBf16Swizzled(CUtensorMap* map, const void* base, uint64_t planes,
                                   uint64_t rows, uint64_t cols, uint64_t row_stride_elems,
                                   uint64_t plane_stride_elems, uint32_t box_rows,
                                   uint32_t box_cols, uint32_t swizzle_bytes) {
  const cuuint64_t dims[3] = {cols, rows, planes};
  const cuuint64_t strides[2] = {row_stride_elems, plane_stride_elems};
  return EncodeSwizzled(map, base, 3, dims, strides, box_rows, box_cols, swizzle_bytes);
}

Status MakeTensorMap2dF32Swizzled(CUtensorMap* map, const void* base, uint64_t rows,
                                  uint64_t cols, uint64_t row_stride_elems, uint32_t box_rows,
                                  uint32_t box_cols, uint32_t swizzle_bytes) {
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_stride_elems};
  return EncodeSwizzled(map, base, 2, dims, strides, box_rows, box_cols, swizzle_bytes,
                        /*fp32=*/true);
}

}  // namespace grove::ptx
