#include "kernels/swiglu.h"

#include <algorithm>
#include <string>

#include "kernels/swiglu_math.cuh"
#include "kernels/vector_io.cuh"

namespace grove::kernels {
namespace {

constexpr int kThreads = 256;

// Rows of `row_chunks` 8-element chunks; a row's g and u start ld elements
// after the previous row's (the flat form: one row, ld unused). Outputs h /
// dh are dense [rows, width]; dg and du sit at ld_out like g and u.
__global__ void SwiGluForwardKernel(const __nv_bfloat16* __restrict__ g,
                                    const __nv_bfloat16* __restrict__ u, int64_t ld,
                                    __nv_bfloat16* __restrict__ h, int64_t chunks, int64_t row_chunks) {
  for (int64_t c = blockIdx.x * int64_t{kThreads} + threadIdx.x; c < chunks;
       c += int64_t{gridDim.x} * kThreads) {
    const int64_t r = c / row_chunks, in = r * ld + 8 * (c - r * row_chunks);
    float gv[8], uv[8], out[8];
    LoadBf16x8(g + in, gv);
    LoadBf16x8(u + in, uv);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = SwiGluForwardElement(gv[i], uv[i]);
    StoreBf16x8(h + 8 * c, out);
  }
}

__global__ void SwiGluBackwardKernel(const __nv_bfloat16* __restrict__ dh,
                                     const __nv_bfloat16* __restrict__ g,
                                     const __nv_bfloat16* __restrict__ u, int64_t ld,
                                     __nv_bfloat16* __restrict__ dg,
                                     __nv_bfloat16* __restrict__ du, int64_t chunks, int64_t row_chunks) {
  for (int64_t c = blockIdx.x * int64_t{kThreads} + threadIdx.x; c < chunks;
       c += int64_t{gridDim.x} * kThreads) {
    const int64_t r = c / row_chunks, in = r * ld + 8 * (c - r * row_chunks);
    float dhv[8], gv[8], uv[8], dgo[8], duo[8];
    LoadBf16x8(dh + 8 * c, dhv);
    LoadBf16x8(g + in, gv);
    LoadBf16x8(u + in, uv);
#pragma unroll
    for (int i = 0; i < 8; ++i) SwiGluBackwardElement(dhv[i], gv[i], uv[i], dgo[i], duo[i]);
    StoreBf16x8(dg + in, dgo);
    StoreBf16x8(du + in, duo);
  }
}

bool Aligned16(const void* p) { return p && reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Status Check(int64_t count) {
  if (count < 0 || count % 8 != 0)
    return Status::InvalidArgument("SwiGLU: count must be a non-negative multiple of 8, got " +
                                   std::to_string(count));
  return Status::OK();
}

int Blocks(int64_t chunks) {
  // A grid the size of the data (one chunk per thread): as AdamW's
  // (kernels/adamw.cu), a few blocks per SM looping fell short of the copy rate.
  return static_cast<int>(std::min<int64_t>((chunks + kThreads - 1) / kThreads, int64_t{1} << 30));
}

Status LaunchStatus(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

Status SwiGluForward(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* h,
                     int64_t count, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(Check(count));
  if (count == 0) return Status::OK();
  if (!Aligned16(g) || !Aligned16(u) || !Aligned16(h))
    return Status::InvalidArgument("SwiGLU: pointers must be non-null and 16-byte aligned");
  SwiGluForwardKernel<<<Blocks(count / 8), kThreads, 0, stream>>>(g, u, 0, h, count / 8, count / 8);
  return LaunchStatus("SwiGLU forward launch");
}

Status SwiGluBackward(const __nv_bfloat16* dh, const __nv_bfloat16* g, const __nv_bfloat16* u,
                      __nv_bfloat16* dg, __nv_bfloat16* du, int64_t count, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(Check(count));
  if (count == 0) return Status::OK();
  if (!Aligned16(dh) || !Aligned16(g) || !Aligned16(u) || !Aligned16(dg) || !Aligned16(du))
    return Status::InvalidArgument("SwiGLU: pointers must be non-null and 16-byte aligned");
  SwiGluBackwardKernel<<<Blocks(count / 8), kThreads, 0, stream>>>(dh, g, u, 0, dg, du, count / 8, count / 8);
  return LaunchStatus("SwiGLU backward launch");
}

namespace {

Status CheckPacked(int64_t rows, int width) {
  if (rows < 0 || width <= 0 || width % 8 != 0)
    return Status::InvalidArgument("SwiGLU packed: rows must be >= 0 and width a positive multiple of 8, got " +
                                   std::to_string(rows) + " x " + std::to_string(width));
  return Status::OK();
}

}  // namespace

Status SwiGluForwardPacked(const __nv_bfloat16* gu, __nv_bfloat16* h, int64_t rows, int width,
                           cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckPacked(rows, width));
  if (rows == 0) return Status::OK();
  if (!Aligned16(gu) || !Aligned16(h))
    return Status::InvalidArgument("SwiGLU: pointers must be non-null and 16-byte aligned");
  const int64_t chunks = rows * (width / 8);
  SwiGluForwardKernel<<<Blocks(chunks), kThreads, 0, stream>>>(gu, gu + width, 2 * int64_t{width}, h, chunks,
                                                               width / 8);
  return LaunchStatus("SwiGLU packed forward launch");
}

Status SwiGluBackwardPacked(const __nv_bfloat16* dh, const __nv_bfloat16* gu, __nv_bfloat16* dgu, int64_t rows,
                            int width, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckPacked(rows, width));
  if (rows == 0) return Status::OK();
  if (!Aligned16(dh) || !Aligned16(gu) || !Aligned16(dgu))
    return Status::InvalidArgument("SwiGLU: pointers must be non-null and 16-byte aligned");
  const int64_t chunks = rows * (width / 8);
  SwiGluBackwardKernel<<<Blocks(chunks), kThreads, 0, stream>>>(dh, gu, gu + width, 2 * int64_t{width}, dgu,
                                                                dgu + width, chunks, width / 8);
  return LaunchStatus("SwiGLU packed backward launch");
}

namespace {

// One warp per row: the dot product <dh_ungated, h> is a warp reduction.
constexpr int kGatedWarps = 8;

__global__ void __launch_bounds__(32 * kGatedWarps)
    SwiGluBackwardGatedKernel(const __nv_bfloat16* __restrict__ dhu, const __nv_bfloat16* __restrict__ gu,
                              const int32_t* __restrict__ slot_of_row, const float* __restrict__ slot_gates,
                              __nv_bfloat16* __restrict__ dgu, __nv_bfloat16* __restrict__ h_gated,
                              float* __restrict__ slot_dgates, int64_t rows, int width) {
  const int lane = threadIdx.x % 32;
  const int chunks = width / 8;
  for (int64_t r = blockIdx.x * int64_t{kGatedWarps} + threadIdx.x / 32; r < rows;
       r += int64_t{gridDim.x} * kGatedWarps) {
    const int32_t slot = slot_of_row[r];
    const float gate = slot_gates[slot];
    const __nv_bfloat16* g_row = gu + r * 2 * width;
    const __nv_bfloat16* u_row = g_row + width;
    float dot = 0.f;
    for (int c = lane; c < chunks; c += 32) {
      float dv[8], gv[8], uv[8], dgo[8], duo[8], hg[8];
      LoadBf16x8(dhu + r * width + 8 * c, dv);
      LoadBf16x8(g_row + 8 * c, gv);
      LoadBf16x8(u_row + 8 * c, uv);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float h = SwiGluForwardElement(gv[i], uv[i]);
        dot = fmaf(dv[i], h, dot);
        hg[i] = gate * h;
        SwiGluBackwardElement(gate * dv[i], gv[i], uv[i], dgo[i], duo[i]);
      }
      StoreBf16x8(dgu + r * 2 * width + 8 * c, dgo);
      StoreBf16x8(dgu + r * 2 * width + width + 8 * c, duo);
      StoreBf16x8(h_gated + r * width + 8 * c, hg);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) slot_dgates[slot] = dot;
  }
}

__global__ void GateGradFromPartialsKernel(const float* __restrict__ partials, int parts,
                                           const int32_t* __restrict__ slot_of_row, float* __restrict__ slot_dgates,
                                           int64_t rows) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < rows; r += int64_t{gridDim.x} * blockDim.x) {
    float sum = 0.f;
    for (int j = 0; j < parts; ++j) sum += partials[r * parts + j];
    slot_dgates[slot_of_row[r]] = sum;
  }
}

}  // namespace

Status SwiGluGateGradFromPartials(const float* partials, int parts, const int32_t* slot_of_row, float* slot_dgates,
                                  int64_t rows, cudaStream_t stream) {
  if (rows < 0 || parts < 1) return Status::InvalidArgument("SwiGluGateGradFromPartials: bad rows or parts");
  if (rows == 0) return Status::OK();
  if (partials == nullptr || slot_of_row == nullptr || slot_dgates == nullptr)
    return Status::InvalidArgument("SwiGluGateGradFromPartials: null pointer");
  const int64_t blocks = std::min<int64_t>((rows + kThreads - 1) / kThreads, 132 * 8);
  GateGradFromPartialsKernel<<<static_cast<int>(blocks), kThreads, 0, stream>>>(partials, parts, slot_of_row,
                                                                                slot_dgates, rows);
  return LaunchStatus("SwiGLU gate gradient from partials launch");
}

Status SwiGluBackwardGated(const __nv_bfloat16* dh_ungated, const __nv_bfloat16* gu, const int32_t* slot_of_row,
                           const float* slot_gates, __nv_bfloat16* dgu, __nv_bfloat16* h_gated, float* slot_dgates,
                           int64_t rows, int width, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckPacked(rows, width));
  if (rows == 0) return Status::OK();
  if (!Aligned16(dh_ungated) || !Aligned16(gu) || !Aligned16(dgu) || !Aligned16(h_gated) ||
      slot_of_row == nullptr || slot_gates == nullptr || slot_dgates == nullptr)
    return Status::InvalidArgument("SwiGluBackwardGated: pointers must be non-null and 16-byte aligned");
  const int64_t blocks = std::min<int64_t>((rows + kGatedWarps - 1) / kGatedWarps, 132 * 16);
  SwiGluBackwardGatedKernel<<<static_cast<int>(blocks), 32 * kGatedWarps, 0, stream>>>(
      dh_ungated, gu, slot_of_row, slot_gates, dgu, h_gated, slot_dgates, rows, width);
  return LaunchStatus("SwiGLU gated backward launch");
}

}  // namespace grove::kernels
