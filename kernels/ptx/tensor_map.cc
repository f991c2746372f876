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

}  // namespace

Status MakeTensorMap2dBf16Swizzled(CUtensorMap* map, const void* base, uint64_t rows,
                                   uint64_t cols, uint64_t row_stride_elems, uint32_t box_rows,
                                   uint32_t box_cols, uint32_t swizzle_bytes) {
  if (map == nullptr || base == nullptr) return Status::InvalidArgument("tensor map: null pointer");
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0)
    return Status::InvalidArgument("tensor map: base must be 16-byte aligned");
  if (rows == 0 || cols == 0) return Status::InvalidArgument("tensor map: empty tensor");
  if (row_stride_elems < cols || row_stride_elems % 8 != 0)
    return Status::InvalidArgument("tensor map: row stride must be >= cols and a multiple of 8");
  if ((swizzle_bytes != 64 && swizzle_bytes != 128) || box_cols * 2 != swizzle_bytes ||
      box_rows == 0 || box_rows > 256)
    return Status::InvalidArgument(
        "tensor map: swizzle must be 64 or 128 bytes and the box [1..256, swizzle / 2]");
  auto fn = EncodeTiledFn();
  if (!fn.ok()) return fn.status();
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_stride_elems * 2};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  CUresult r = (*fn)(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims,
                     strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                     swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return Status::InvalidArgument("cuTensorMapEncodeTiled failed with CUresult " +
                                   std::to_string(static_cast<int>(r)));
  return Status::OK();
}

}  // namespace grove::ptx
