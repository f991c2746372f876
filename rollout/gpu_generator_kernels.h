// Glue kernels of GpuGenerator (internal to rollout/gpu_generator.cc): the
// fp32 residual stream's embedding, RMSNorm and SwiGLU steps and the row
// gather before the lm_head -- what is specific to how the engine lays its
// buffers out (the real work is in kernels/). Each launcher only enqueues
// work on `stream` and reports the launch error; shapes are checked by the
// caller. Device pointers; bf16 rows 16-byte aligned (widths multiples of 8).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "base/status.h"

namespace grove::rollout::gpu {

using bf16 = __nv_bfloat16;

// x[r, :] = table[tokens[r], :] (fp32); a token outside [0, vocab) gives zeros.
Status EmbedRows(const int32_t* tokens, const float* table, float* x, int rows, int vocab, int hidden,
                 cudaStream_t stream);

// y = bf16(x * rstd * w), rstd = 1 / sqrt(mean(x^2) + eps), as
// model/layers.h's RmsNormForward (sum of squares in fp32 here, double there).
Status RmsNormRows(const float* x, const float* w, bf16* y, int rows, int hidden, float eps, cudaStream_t stream);

// h[r, j] = bf16(a * sigmoid(a) * b) with a = ab[r, j], b = ab[r, width + j]
// (ab [rows, 2 * width]: the stacked W1|W3 projection), h [rows, width].
Status SwiGluRows(const float* ab, int rows, int width, bf16* h, cudaStream_t stream);

// dst[i, :] = src[index[i], :].
Status GatherRows(const bf16* src, const int32_t* index, bf16* dst, int rows, int hidden, cudaStream_t stream);

}  // namespace grove::rollout::gpu
