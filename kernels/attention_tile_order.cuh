// The 1-D grid order the attention kernels share (attention.cu's mma.sync
// kernels, attention_wgmma.cu's forward).
#pragma once

namespace grove::kernels::detail {

// About how many CTAs an H100 runs at once (132 SMs x 2): the chunk size of OrderTiles.
constexpr int kAttentionResidentCtas = 256;

// CTAs are numbered chunk by chunk, a chunk being `chunk_pairs` (sequence,
// head) pairs and all their tiles, tile-major inside it: the CTAs resident
// at once (about one chunk: ~256 of them) share a few pairs, whose K/V
// (forward) or Q/dO/dQ (backward) then stay in L2, and the heaviest tiles
// (tile 0) of a chunk start first, so the short ones fill the tail.
// (Heaviest-first over the whole grid, tried first, helped the GQA backward
// but made the MHA backward 1.5x slower; the suspected cause, not profiled:
// every resident CTA then reads a different pair's Q/dO and adds into a
// different pair's dQ, a working set far beyond L2.)
struct TileOrder {
  int tile, pair;
};
__device__ __forceinline__ TileOrder OrderTiles(int idx, int tiles, int pairs, int chunk_pairs) {
  const int chunk = idx / (chunk_pairs * tiles);
  const int first = chunk * chunk_pairs;
  const int in_chunk = min(chunk_pairs, pairs - first);
  const int within = idx - chunk * chunk_pairs * tiles;
  return {within / in_chunk, first + within % in_chunk};
}

}  // namespace grove::kernels::detail
