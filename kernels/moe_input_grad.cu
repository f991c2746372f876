#include "kernels/moe_input_grad.h"

#include <cstdint>
#include <string>

#include "kernels/ptx/ldmatrix.cuh"
#include "kernels/ptx/mma.cuh"

namespace grove::kernels {
namespace {

using bf16 = __nv_bfloat16;

// A block's tile: kRows tokens x kCols columns of dx; 8 warps, warp w
// computes rows 16 (w % 4) .. + 15, columns 64 (w / 4) .. + 63 of the
// router product (8 mma n-tiles) and then takes its share of the tile's
// 16-byte column chunks for the adds.
constexpr int kRows = 64, kCols = 128, kThreads = 256;
constexpr int kTasks = kRows * (kCols / 8) / kThreads;  // 16-byte column chunks a thread adds
// Shared-memory pitches: +16 bytes a row, so the 8 rows one ldmatrix
// reads start in 8 different 16-byte bank groups.
constexpr int kBPitch = kCols + 8;       // bf16
constexpr int kStagePitch = kCols + 4;   // fp32

int PaddedExperts(int experts) { return (experts + 15) / 16 * 16; }  // whole mma k-steps

size_t SmemBytes(int kpad) {
  const size_t operands = (size_t(kRows) * (kpad + 8) + size_t(kpad) * kBPitch) * sizeof(bf16);
  const size_t stage = size_t(kRows) * kStagePitch * sizeof(float);
  return operands > stage ? operands : stage;
}

__device__ __forceinline__ void AddBf16x8(const uint4& v, float (&s)[8]) {
  const bf16* e = reinterpret_cast<const bf16*>(&v);
#pragma unroll
  for (int k = 0; k < 8; ++k) s[k] += __bfloat162float(e[k]);
}

__global__ void __launch_bounds__(kThreads) MoeInputGradKernel(const MoeInputGradArgs a, int kpad) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int a_pitch = kpad + 8;
  bf16* sa = reinterpret_cast<bf16*>(smem);  // dlogits tile [kRows][a_pitch]
  bf16* sb = sa + kRows * a_pitch;           // W_router columns [kpad][kBPitch]
  float* stage = reinterpret_cast<float*>(smem);  // the product [kRows][kStagePitch], after the mma
  const int t0 = blockIdx.x * kRows, c0 = blockIdx.y * kCols;

  // Operands, zero past the tokens, the experts and h (zero k-steps add 0).
  const int a_chunks = kpad / 8;
  for (int i = threadIdx.x; i < kRows * a_chunks; i += kThreads) {
    const int r = i / a_chunks, e = (i % a_chunks) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (t0 + r < a.tokens && e < a.experts)
      v = *reinterpret_cast<const uint4*>(a.dlogits + int64_t(t0 + r) * a.experts + e);
    *reinterpret_cast<uint4*>(sa + r * a_pitch + e) = v;
  }
  for (int i = threadIdx.x; i < kpad * (kCols / 8); i += kThreads) {
    const int e = i / (kCols / 8), c = (i % (kCols / 8)) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (e < a.experts && c0 + c < a.h) v = *reinterpret_cast<const uint4*>(a.w_router + int64_t(e) * a.h + c0 + c);
    *reinterpret_cast<uint4*>(sb + e * kBPitch + c) = v;
  }
  // This thread's chunks of the tile (see the adds below) and their old dx,
  // loaded now so the reads overlap the operands' and the mma.
  auto task_row = [](int i) { return (int(threadIdx.x) + i * kThreads) / (kCols / 8); };
  auto task_col = [](int i) { return ((int(threadIdx.x) + i * kThreads) % (kCols / 8)) * 8; };
  bool live[kTasks];
  float4 old0[kTasks], old1[kTasks];
#pragma unroll
  for (int i = 0; i < kTasks; ++i) {
    live[i] = t0 + task_row(i) < a.tokens && c0 + task_col(i) < a.h;
    if (live[i]) {
      const float4* d = reinterpret_cast<const float4*>(a.dx + int64_t(t0 + task_row(i)) * a.h + c0 + task_col(i));
      old0[i] = d[0];
      old1[i] = d[1];
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp % 4, wn = warp / 4;
  float acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[n][r] = 0.f;
  // ldmatrix lane addressing: lanes 8q .. 8q + 7 give the rows of matrix q.
  const int lrow = (lane % 8) + 8 * ((lane / 8) % 2), lcol = 8 * (lane / 16);
  for (int kk = 0; kk < kpad; kk += 16) {
    // A (16 tokens x 16 experts, stored [token][expert]): matrices (m 0-7,
    // k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15).
    uint32_t af[4];
    ptx::ldmatrix_x4(af[0], af[1], af[2], af[3], sa + (wm * 16 + lrow) * a_pitch + kk + lcol);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // B (16 experts x 8 columns, stored [expert][column]) transposed:
      // (k 0-7, n 0-7), (k 8-15, n 0-7) for n-tile 2j; the same at n + 8 for 2j + 1.
      uint32_t b0[2], b1[2];
      ptx::ldmatrix_x4_trans(b0[0], b0[1], b1[0], b1[1], sb + (kk + lrow) * kBPitch + wn * 64 + j * 16 + lcol);
      ptx::mma_m16n8k16_bf16_f32(acc[2 * j], af, b0);
      ptx::mma_m16n8k16_bf16_f32(acc[2 * j + 1], af, b1);
    }
  }
  __syncthreads();  // every warp is done reading sa / sb: the stage overwrites them
  // Accumulator n of lane l: rows g = l / 4 and g + 8, columns 2 (l % 4), + 1 of n-tile n.
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    const int r = wm * 16 + lane / 4, c = wn * 64 + n * 8 + 2 * (lane % 4);
    *reinterpret_cast<float2*>(stage + r * kStagePitch + c) = make_float2(acc[n][0], acc[n][1]);
    *reinterpret_cast<float2*>(stage + (r + 8) * kStagePitch + c) = make_float2(acc[n][2], acc[n][3]);
  }
  __syncthreads();

  // 16 threads a row, 8 columns each (512 contiguous bytes of dx a row);
  // each thread's kTasks chunks are in flight together: their old dx was
  // loaded before the mma, the rows are loaded slot by slot for all of them.
  float s[kTasks][8];
#pragma unroll
  for (int i = 0; i < kTasks; ++i) {
    const int r = task_row(i), c = task_col(i);
    const float4 p0 = *reinterpret_cast<const float4*>(stage + r * kStagePitch + c);
    const float4 p1 = *reinterpret_cast<const float4*>(stage + r * kStagePitch + c + 4);
    s[i][0] = p0.x; s[i][1] = p0.y; s[i][2] = p0.z; s[i][3] = p0.w;
    s[i][4] = p1.x; s[i][5] = p1.y; s[i][6] = p1.z; s[i][7] = p1.w;
  }
  for (int j = 0; j < a.top_k; ++j) {
    int32_t row[kTasks];
#pragma unroll
    for (int i = 0; i < kTasks; ++i) row[i] = live[i] ? a.row_of_slot[int64_t(t0 + task_row(i)) * a.top_k + j] : -1;
    uint4 v[kTasks];
#pragma unroll
    for (int i = 0; i < kTasks; ++i)
      if (row[i] >= 0) v[i] = *reinterpret_cast<const uint4*>(a.da + int64_t(row[i]) * a.h + c0 + task_col(i));
#pragma unroll
    for (int i = 0; i < kTasks; ++i)
      if (row[i] >= 0) AddBf16x8(v[i], s[i]);  // -1: a dropped slot
  }
#pragma unroll
  for (int i = 0; i < kTasks; ++i) {
    if (!live[i]) continue;
    float4* d = reinterpret_cast<float4*>(a.dx + int64_t(t0 + task_row(i)) * a.h + c0 + task_col(i));
    d[0] = make_float4(old0[i].x + s[i][0], old0[i].y + s[i][1], old0[i].z + s[i][2], old0[i].w + s[i][3]);
    d[1] = make_float4(old1[i].x + s[i][4], old1[i].y + s[i][5], old1[i].z + s[i][6], old1[i].w + s[i][7]);
  }
}

}  // namespace

Status MoeInputGrad(const MoeInputGradArgs& a, cudaStream_t stream) {
  const std::string where = "MoeInputGrad: ";
  if (a.tokens < 0) return Status::InvalidArgument(where + "tokens < 0");
  if (a.top_k < 1 || a.top_k > 16) return Status::InvalidArgument(where + "top_k must be in 1..16");
  if (a.experts < 1 || a.experts > 256 || a.experts % 8 != 0)
    return Status::InvalidArgument(where + "experts must be a multiple of 8 in 8..256, got " +
                                   std::to_string(a.experts));
  if (a.h < 8 || a.h % 8 != 0)
    return Status::InvalidArgument(where + "h must be a positive multiple of 8, got " + std::to_string(a.h));
  if (a.tokens == 0) return Status::OK();
  if (!a.da || !a.row_of_slot || !a.dlogits || !a.w_router || !a.dx)
    return Status::InvalidArgument(where + "null pointer");
  auto misaligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; };
  if (misaligned(a.da) || misaligned(a.dlogits) || misaligned(a.w_router) || misaligned(a.dx))
    return Status::InvalidArgument(where + "da, dlogits, w_router and dx must be 16-byte aligned");
  const int kpad = PaddedExperts(a.experts);
  const size_t smem = SmemBytes(kpad);
  cudaError_t err = cudaFuncSetAttribute(MoeInputGradKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return Status::Internal(where + "shared memory attribute: " + cudaGetErrorString(err));
  const dim3 grid((a.tokens + kRows - 1) / kRows, (a.h + kCols - 1) / kCols);
  MoeInputGradKernel<<<grid, kThreads, smem, stream>>>(a, kpad);
  err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(where + "launch: " + cudaGetErrorString(err));
  return Status::OK();
}

}  // namespace grove::kernels
