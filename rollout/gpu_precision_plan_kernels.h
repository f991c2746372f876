// Device work of the GPU precision plan measurement (gpu_precision_plan.h):
// the formats' round trips, bit-identical to the CPU's RoundTripInPlace, and
// the reductions behind MeasureUnitErrors' error and the exact KL. All
// launches go on `stream` (a cudaStream_t); sizes are element counts.
#pragma once

#include <cstdint>


namespace grove::rollout::gpu_plan {

// w [rows, cols] fp32 := its round trip through a format (int4: groups of
// 128 columns; int8: per row; bf16: round to nearest even), as
// RoundTripInPlace on the CPU computes it, to the bit. (This header stays
// free of precision_format.h, whose capnp headers nvcc cannot compile.)
void RoundTripInt4(float* w, int64_t rows, int64_t cols, void* stream);
void RoundTripInt8(float* w, int64_t rows, int64_t cols, void* stream);
void RoundTripBf16(float* w, int64_t rows, int64_t cols, void* stream);

// out[p, :] = float(x[rows[p], :]) for p in [0, n): x bf16 [*, hidden].
void GatherRowsToF32(const void* x_bf16, const int32_t* rows, float* out, int64_t n, int64_t hidden, void* stream);

// h = a * sigmoid(a) * b, elementwise over n values (fp32, CPU formula).
void SwiGlu(const float* a, const float* b, float* h, int64_t n, void* stream);

// For each row p in [0, n): error[unit[p]] += weight[p] * sum_d (y[p,d] -
// ref[p,d])^2 (y, ref fp32 [n, hidden]; the sums in double).
void AccumulateWeightedSqDiff(const float* y, const float* ref, const int32_t* unit, const double* weight,
                              double* error, int64_t n, int64_t hidden, void* stream);

// *kl += sum over rows of KL(q || p) = sum_v exp(lq_v) (lq_v - lp_v), with
// lq, lp the log-softmax of the fp32 logit rows zq, zp [rows, vocab] (each
// row's KL clamped at 0 as on the CPU; sums in double).
void AccumulateRowKl(const float* zp, const float* zq, double* kl, int64_t rows, int64_t vocab, void* stream);

// The sums behind the replan trigger's ||w - ref|| / ||ref||: sums[0] =
// sum_i (w_i - ref_i)^2 and sums[1] = sum_i ref_i^2 over i in [0, n) (w, ref
// fp32 on the device; `partials`: kRelativeChangeBlocks * 2 doubles of
// scratch). In double, and deterministic: kRelativeChangeBlocks blocks, a
// fixed share of the elements each (grid stride), reduced in a fixed order
// within the block, their partials summed in block order by one thread, so
// the same inputs give the same bits on any GPU. Double costs nothing here:
// the pass is bound by reading 8 bytes per element (two fp64 FMAs per 8
// bytes is ~1 TFLOP/s fp64 at H100 bandwidth, a few % of its fp64 rate).
inline constexpr int kRelativeChangeBlocks = 1024;
void RelativeChangeSums(const float* w, const float* ref, int64_t n, double* partials, double* sums, void* stream);

}  // namespace grove::rollout::gpu_plan
