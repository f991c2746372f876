// Weight-only quantized linear layers for the rollout engine's decode and
// prefill: y = x W^T with W [n, k] held on the device in one of three
// formats, x bf16 [m, k], fp32 accumulation, fp32 out.
//
// Formats (the layouts of rollout/int8_quantizer.h and int4_quantizer.h, so
// the CPU reference and the GPU read the same bytes):
//   kBF16: data = bf16 [n, k] row-major; scales unused (null).
//   kInt8: data = int8 [n, k] row-major; scales = fp32 [n] (one per row).
//   kInt4: data = uint32 [n, k / 8] (8 columns per word, nibbles
//          offset-binary and interleaved {0,2,4,6,1,3,5,7}); scales = fp32
//          [n, k / 128] (one per row and 128 columns).
// Shapes: k a multiple of 128 (int4 groups start and end on word and group
// boundaries), n a multiple of 8. Every pointer 16-byte aligned.
//
// Host header, no device code: callers built by the host compiler include it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"
#include "kernels/router.h"

namespace grove::kernels {

enum class QuantFormat : int32_t { kBF16 = 0, kInt8 = 1, kInt4 = 2 };

// One weight on the device (a plain struct: arrays of them are copied to the
// device for the fused MoE kernels).
struct QuantWeight {
  QuantFormat format = QuantFormat::kBF16;
  int32_t n = 0, k = 0;
  const void* data = nullptr;
  const float* scales = nullptr;
};

// Bytes of `data` and number of fp32 scales for a [n, k] weight in format f.
size_t QuantDataBytes(QuantFormat f, int64_t n, int64_t k);
int64_t QuantScaleCount(QuantFormat f, int64_t n, int64_t k);

// Quantizes fp32 w [n, k] (device) into data/scales (device, sized as
// above). Bit-identical to the CPU quantizers (QuantizeInt8PerRow,
// QuantizeInt4Grouped, RoundToBf16): the same fp32 operations in the same
// order, so a worker's GPU weights equal what the CPU planner measured.
Status QuantizeWeight(const float* w, int64_t n, int64_t k, QuantFormat f, void* data, float* scales,
                      cudaStream_t stream);

// out [n, k] (bf16, device, row-major) = the weight's values rounded to
// bf16: int8 q * row scale, int4 q * group scale (each product in fp32, as
// the CPU's dequantization, then rounded to nearest even); bf16 copied.
// For callers that run a quantized weight through a bf16 GEMM (cuBLAS) where
// a call has enough rows that weight bytes no longer set its time.
Status DequantizeToBf16(const QuantWeight& w, __nv_bfloat16* out, cudaStream_t stream);

// How y is written: overwritten, or added to (residual adds fused).
enum class Accumulate : int32_t { kOverwrite = 0, kAdd = 1 };

// Scratch QuantLinear may use for large m (e.g. a bf16 copy of W for a
// tensor-core path); QuantLinearWorkspaceBytes(f, n, k, m) bytes, 0 when the
// path needs none (today always 0: workspace may be null). Callers size one
// workspace for their largest weight.
size_t QuantLinearWorkspaceBytes(QuantFormat f, int64_t n, int64_t k, int64_t m);

// y [m, n] (fp32, row stride ldy >= n) (+)= x [m, k] (bf16, row stride ldx
// >= k) W^T. Any m >= 1; small m (decode batches) reads each weight byte once
// per call. Graph-capturable (no host sync, no allocation).
//
// How: one launch per pass of up to 16 rows of x (fewer when k is so long
// that they would not fit in shared memory); each pass streams W once with
// 16-byte loads and dequantizes in registers. m == 1: fp32 FMAs on the CUDA
// cores with w = q * scale (the CPU dequantizer's exact fp32 values;
// kernels/quant_gemv.cuh, shared with the MoE). m >= 2: mma.sync tensor
// cores on bf16 q (exact) and x, fp32 sums scaled per row (int8) or per
// group (int4): at 16 tokens the CUDA cores would need ~4x more FMAs per
// int4 byte than the H100 issues while streaming HBM, so they, not memory,
// would bound the time. m > 16 costs ceil(m / 16) passes over W; chosen over
// a dequantize-to-bf16 + cuBLAS path because it needs no workspace, keeps the
// weights' values (a bf16 copy would round int8 weights and int4 scales
// again) and, on each path, gives a row of y the same bits whatever m is.
// Slow for long prefills (no large-tile GEMM). ldx must be a multiple of 8.
// Returns InvalidArgument on a bad shape, stride, format or pointer.
Status QuantLinear(const __nv_bfloat16* x, int64_t ldx, int64_t m, const QuantWeight& w, float* y,
                   int64_t ldy, Accumulate mode, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream);

// One fp32 row and its RMSNorm, the input of QuantLinearRmsNormed.
struct RmsNormedRow {
  const float* x = nullptr;       // [k] fp32 (the residual stream)
  const float* weight = nullptr;  // [k] fp32 norm weight
  float eps = 0.f;
  // Optional [k] bf16, 16-byte aligned: receives the normalized row (for
  // later kernels that read it, e.g. the MoE after a fused router).
  __nv_bfloat16* normed = nullptr;
};

// y [1, n] (+)= bf16(x * rstd * weight) W^T with rstd = 1 / sqrt(mean(x^2) +
// eps): the RMSNorm fused into the m = 1 GEMV, which computes the row's rstd
// itself (every block re-reads the row: 4 KB at k = 1024) while staging its
// input. Bit for bit rollout's RmsNormRows followed by QuantLinear at m = 1
// (both take rstd from kernels/rmsnorm_row.cuh and the products in the same
// order; QuantLinear's CUDA-core GEMV). Decode at batch 1 only; prefill and
// larger batches keep the separate norm. Graph-capturable.
//
// route (optional): the linear is the MoE router and the row is routed in
// the same launch -- the block that finishes last (a device counter) runs
// RouterTopK's per-token work (kernels/router_topk.cuh, the same bits) on
// the n logits it reads back from y. route->args as for RouterTopK with
// logits == y, tokens == 1, experts == n; route->counter a device unsigned
// that is 0 before the first call (each call leaves it 0; calls using one
// counter must not run concurrently).
struct RouterTail {
  RouterArgs args;
  unsigned* counter = nullptr;
};
Status QuantLinearRmsNormed(const RmsNormedRow& in, const QuantWeight& w, float* y, Accumulate mode,
                            cudaStream_t stream, const RouterTail* route = nullptr);

}  // namespace grove::kernels
