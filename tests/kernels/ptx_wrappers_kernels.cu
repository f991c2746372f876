#include "tests/kernels/ptx_wrappers_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/ptx/cp_async.cuh"
#include "kernels/ptx/ldmatrix.cuh"
#include "kernels/ptx/mma.cuh"
#include "kernels/ptx/tma.cuh"
#include "kernels/ptx/wgmma.cuh"
#include "kernels/quant_unpack.h"

namespace grove::kernels::testing {
namespace {

__device__ uint32_t Pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ float Lo(uint32_t r) { return __bfloat162float(__ushort_as_bfloat16(r & 0xffff)); }
__device__ float Hi(uint32_t r) { return __bfloat162float(__ushort_as_bfloat16(r >> 16)); }

__global__ void LdmatrixKernel(int matrices, bool trans, float* out) {
  __shared__ __align__(16) __nv_bfloat16 m[32 * 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * 8; i += 32) m[i] = __float2bfloat16(static_cast<float>(i));
  __syncwarp();
  uint32_t r[4] = {0, 0, 0, 0};
  const void* row = &m[lane * 8];
  if (matrices == 1) {
    trans ? ptx::ldmatrix_x1_trans(r[0], row) : ptx::ldmatrix_x1(r[0], row);
  } else if (matrices == 2) {
    trans ? ptx::ldmatrix_x2_trans(r[0], r[1], row) : ptx::ldmatrix_x2(r[0], r[1], row);
  } else {
    trans ? ptx::ldmatrix_x4_trans(r[0], r[1], r[2], r[3], row)
          : ptx::ldmatrix_x4(r[0], r[1], r[2], r[3], row);
  }
  for (int i = 0; i < 4; ++i) {
    out[(lane * 4 + i) * 2] = Lo(r[i]);
    out[(lane * 4 + i) * 2 + 1] = Hi(r[i]);
  }
}

__global__ void StmatrixKernel(int matrices, bool trans, float* out) {
  __shared__ __align__(16) __nv_bfloat16 m[32 * 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * 8; i += 32) m[i] = __float2bfloat16(-1.f);
  __syncwarp();
  uint32_t r[4];
  for (int i = 0; i < 4; ++i)
    r[i] = Pack(static_cast<float>((i * 32 + lane) * 2), static_cast<float>((i * 32 + lane) * 2 + 1));
  void* row = &m[lane * 8];
  if (matrices == 1) {
    ptx::stmatrix_x1(row, r[0]);
  } else if (matrices == 2) {
    ptx::stmatrix_x2(row, r[0], r[1]);
  } else if (trans) {
    ptx::stmatrix_x4_trans(row, r[0], r[1], r[2], r[3]);
  } else {
    ptx::stmatrix_x4(row, r[0], r[1], r[2], r[3]);
  }
  __syncwarp();
  for (int i = lane; i < 32 * 8; i += 32) out[i] = __bfloat162float(m[i]);
}

__global__ void MmaKernel(const float* a, const float* b, float* c) {
  const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
  uint32_t af[4], bf[2];
  af[0] = Pack(a[g * 16 + 2 * q], a[g * 16 + 2 * q + 1]);
  af[1] = Pack(a[(g + 8) * 16 + 2 * q], a[(g + 8) * 16 + 2 * q + 1]);
  af[2] = Pack(a[g * 16 + 2 * q + 8], a[g * 16 + 2 * q + 9]);
  af[3] = Pack(a[(g + 8) * 16 + 2 * q + 8], a[(g + 8) * 16 + 2 * q + 9]);
  bf[0] = Pack(b[g * 16 + 2 * q], b[g * 16 + 2 * q + 1]);
  bf[1] = Pack(b[g * 16 + 2 * q + 8], b[g * 16 + 2 * q + 9]);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  ptx::mma_m16n8k16_bf16_f32(d, af, bf);
  c[g * 8 + 2 * q] = d[0];
  c[g * 8 + 2 * q + 1] = d[1];
  c[(g + 8) * 8 + 2 * q] = d[2];
  c[(g + 8) * 8 + 2 * q + 1] = d[3];
}

__global__ void CpAsyncKernel(const uint8_t* src, uint8_t* out) {
  __shared__ __align__(16) uint8_t s[1024];
  const int t = threadIdx.x;
  for (int i = t; i < 1024; i += 64) s[i] = 0xAB;  // poison
  __syncthreads();
  if (t % 3 == 0) {
    ptx::cp_async_ca_16(s + 16 * t, src + 16 * t);
  } else if (t % 3 == 1) {
    ptx::cp_async_cg_16(s + 16 * t, src + 16 * t);
  } else {
    ptx::cp_async_cg_16_zfill(s + 16 * t, src + 16 * t, t % 17);
  }
  ptx::cp_async_commit_group();
  ptx::cp_async_wait_group<0>();
  __syncthreads();
  for (int i = t; i < 1024; i += 64) out[i] = s[i];
}

// Each thread unpacks one word both ways through the device recipe (lop3,
// hsub2, prmt): 8 int4 columns and 4 int8 columns.
__global__ void QuantUnpackKernel(const uint32_t* words, int count, float* int4_out, float* int8_out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float q4[8], q8[4];
  Int4WordToFloats(words[i], q4);
  Int8WordToFloats(words[i], q8);
  for (int e = 0; e < 8; ++e) int4_out[8 * i + e] = q4[e];
  for (int e = 0; e < 4; ++e) int8_out[4 * i + e] = q8[e];
}

template <typename T>
int Fetch(T* dev, size_t count, std::vector<T>* host) {
  host->resize(count);
  cudaError_t e = cudaMemcpy(host->data(), dev, count * sizeof(T), cudaMemcpyDeviceToHost);
  cudaFree(dev);
  return static_cast<int>(e);
}

// One warpgroup: C[64][128] = A^T B with A stored [32 k][64 m] and B
// [32 k][128 n] (both MN-major), two wgmma m64n128k16 _mn steps along k.
// Tiles in the 128-byte swizzle (chunk c of row k at c ^ (k % 8)); B's two
// 64-wide halves are 4 KB apart (the descriptor's leading byte offset).
__global__ void WgmmaMnKernel(const float* a, const float* b, float* c) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(1024) __nv_bfloat16 sa[32 * 64];
  __shared__ __align__(1024) __nv_bfloat16 sb[2 * 32 * 64];
  for (int i = threadIdx.x; i < 32 * 64; i += 128) {
    const int k = i / 64, m = i % 64;
    sa[k * 64 + ((m / 8) ^ (k % 8)) * 8 + m % 8] = __float2bfloat16(a[i]);
  }
  for (int i = threadIdx.x; i < 32 * 128; i += 128) {
    const int k = i / 128, n = i % 128, half = n / 64, col = n % 64;
    sb[half * 32 * 64 + k * 64 + ((col / 8) ^ (k % 8)) * 8 + col % 8] = __float2bfloat16(b[i]);
  }
  ptx::fence_proxy_async_shared_cta();
  __syncthreads();
  float acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  ptx::wgmma_fence();
  for (int kk = 0; kk < 2; ++kk)
    ptx::wgmma_m64n128k16_f32_bf16_ss_mn(acc, ptx::make_wgmma_desc_mn_sw128(sa + kk * 16 * 64, 0),
                                         ptx::make_wgmma_desc_mn_sw128(sb + kk * 16 * 64, 32 * 64 * 2),
                                         1);
  ptx::wgmma_commit_group();
  ptx::wgmma_wait_group<0>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = 0; i < 64; ++i) {
    const int row = 16 * warp + lane / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    c[row * 128 + col] = acc[i];
  }
#else
  __trap();  // not an sm_90a device: the test skips before launching
#endif
}

}  // namespace

int RunLdmatrix(int matrices, bool trans, std::vector<float>* out) {
  float* d;
  if (cudaMalloc(&d, 32 * 4 * 2 * sizeof(float)) != cudaSuccess) return cudaErrorMemoryAllocation;
  cudaMemset(d, 0, 32 * 4 * 2 * sizeof(float));
  LdmatrixKernel<<<1, 32>>>(matrices, trans, d);
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) return static_cast<int>(e);
  return Fetch(d, 32 * 4 * 2, out);
}

int RunStmatrix(int matrices, bool trans, std::vector<float>* out) {
  float* d;
  if (cudaMalloc(&d, 32 * 8 * sizeof(float)) != cudaSuccess) return cudaErrorMemoryAllocation;
  StmatrixKernel<<<1, 32>>>(matrices, trans, d);
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) return static_cast<int>(e);
  return Fetch(d, 32 * 8, out);
}

int RunMma(const std::vector<float>& a, const std::vector<float>& b, std::vector<float>* c) {
  float *da, *db, *dc;
  cudaMalloc(&da, 256 * 4);
  cudaMalloc(&db, 128 * 4);
  cudaMalloc(&dc, 128 * 4);
  cudaMemcpy(da, a.data(), 256 * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), 128 * 4, cudaMemcpyHostToDevice);
  MmaKernel<<<1, 32>>>(da, db, dc);
  cudaError_t e = cudaDeviceSynchronize();
  cudaFree(da);
  cudaFree(db);
  if (e != cudaSuccess) return static_cast<int>(e);
  return Fetch(dc, 128, c);
}

int RunCpAsync(const std::vector<uint8_t>& src, std::vector<uint8_t>* out) {
  uint8_t *ds, *dout;
  cudaMalloc(&ds, 1024);
  cudaMalloc(&dout, 1024);
  cudaMemcpy(ds, src.data(), 1024, cudaMemcpyHostToDevice);
  CpAsyncKernel<<<1, 64>>>(ds, dout);
  cudaError_t e = cudaDeviceSynchronize();
  cudaFree(ds);
  if (e != cudaSuccess) return static_cast<int>(e);
  return Fetch(dout, 1024, out);
}

int RunQuantUnpack(const std::vector<uint32_t>& words, std::vector<float>* int4_out, std::vector<float>* int8_out) {
  const int count = static_cast<int>(words.size());
  uint32_t* dw = nullptr;
  float *d4 = nullptr, *d8 = nullptr;
  if (cudaMalloc(&dw, count * 4) != cudaSuccess || cudaMalloc(&d4, count * 32) != cudaSuccess ||
      cudaMalloc(&d8, count * 16) != cudaSuccess)
    return cudaErrorMemoryAllocation;
  cudaMemcpy(dw, words.data(), count * 4, cudaMemcpyHostToDevice);
  QuantUnpackKernel<<<(count + 255) / 256, 256>>>(dw, count, d4, d8);
  cudaError_t e = cudaDeviceSynchronize();
  cudaFree(dw);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (const int e4 = Fetch(d4, static_cast<size_t>(count) * 8, int4_out); e4 != 0) return e4;
  return Fetch(d8, static_cast<size_t>(count) * 4, int8_out);
}

}  // namespace grove::kernels::testing

namespace grove::kernels::testing {

int RunWgmmaMn(const std::vector<float>& a, const std::vector<float>& b, std::vector<float>* c) {
  float *da, *db, *dc;
  cudaMalloc(&da, 32 * 64 * 4);
  cudaMalloc(&db, 32 * 128 * 4);
  cudaMalloc(&dc, 64 * 128 * 4);
  cudaMemcpy(da, a.data(), 32 * 64 * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), 32 * 128 * 4, cudaMemcpyHostToDevice);
  WgmmaMnKernel<<<1, 128>>>(da, db, dc);
  cudaError_t e = cudaDeviceSynchronize();
  cudaFree(da);
  cudaFree(db);
  if (e != cudaSuccess) return static_cast<int>(e);
  return Fetch(dc, 64 * 128, c);
}

}  // namespace grove::kernels::testing
