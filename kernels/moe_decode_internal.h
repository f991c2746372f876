// Internal to MoeDecodeForward: its two kernel pairs by name, for the tests
// and the benchmark. MoeDecodeForward is MoeDecodeForwardOnPath(kAuto, ...).
#pragma once

#include "kernels/moe_decode.h"

namespace grove::kernels::detail {

enum class MoeDecodePath {
  kAuto,        // kTensorCore when m * top_k >= args.mma_min_slots_per_expert * experts (default: always)
  kCudaCore,    // kernels/quant_gemv.cuh: fp32 FMAs, up to 16 rows per pass
  kTensorCore,  // kernels/quant_mma.cuh: mma.sync 16-row tiles, up to 16 rows per pass
};

Status MoeDecodeForwardOnPath(const MoeDecodeArgs& args, MoeDecodePath path, cudaStream_t stream);

}  // namespace grove::kernels::detail
