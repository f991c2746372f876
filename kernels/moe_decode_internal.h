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

// The most (expert, 16-row chunk) blocks a tensor-core launch spreads over
// its grid's y extent; past it each block walks all of its expert's chunks.
constexpr int kMoeMaxChunkBlocks = 65535;

// max_chunk_blocks: kMoeMaxChunkBlocks, or less so that a test can reach the
// walking blocks with a small batch (the same bits either way).
Status MoeDecodeForwardOnPath(const MoeDecodeArgs& args, MoeDecodePath path, cudaStream_t stream,
                              int max_chunk_blocks = kMoeMaxChunkBlocks);

}  // namespace grove::kernels::detail
