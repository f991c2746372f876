// MoeDecodeForward in five launches, none per expert:
//  1-3. MoeRouteIndex (kernels/moe_permute.h): the routed slots grouped by
//       expert, in slot order inside an expert (deterministic);
//  4.   up: blocks over (row slab of W1/W3, active expert): each block finds
//       its expert among the non-empty ones (blocks past the number of
//       active experts exit at once), streams its slab of W1 and W3 once per
//       16 of the expert's tokens through the shared GEMV core
//       (kernels/quant_gemv.cuh; one warp group owns a W1 row and the W3 row
//       of the same hidden unit), and writes h = silu(g) * u rounded to bf16
//       per routed row; the tensor-core pair's blocks are (tile, expert,
//       16-row chunk) instead, one chunk each;
//  5.   down: the same over row slabs of W2, writing fp32 partial outputs per
//       routed row;
//  6.   combine: out[t] (+)= sum over slots j in order of gate * partial.
// Each expert's weight format is read on the device (QuantWeight.format) and
// chosen per block. One token on the CUDA cores skips 1-3: block y of up and
// down is slot y.
#include "kernels/moe_decode.h"

#include <algorithm>
#include <string>
#include <type_traits>

#include "kernels/launch.cuh"
#include "kernels/moe_decode_internal.h"
#include "kernels/moe_permute.h"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/ptx/prefetch.cuh"
#include "kernels/quant_gemv.cuh"
#include "kernels/quant_mma.cuh"
#include "kernels/rmsnorm_row.cuh"
#include "kernels/swiglu_math.cuh"

namespace grove::kernels {
namespace {

using gemv::kRows;
using gemv::kThreads;

constexpr int kUpSlabUnits = 8;   // hidden units (W1 + W3 row pairs) per up block
constexpr int kDownSlabRows = 16; // W2 rows per down block
constexpr int kMaxTopK = 16;
constexpr int64_t kMaxSmemBytes = 160 * 1024;

size_t AlignUp(size_t x) { return (x + 255) / 256 * 256; }

struct Layout {
  size_t route = 0, offsets = 0, row_of_slot = 0, slot_of_row = 0, h = 0, partial = 0, total = 0;
};

Layout MakeLayout(int m, int hidden, int expert_hidden, int experts, int top_k) {
  const size_t slots = static_cast<size_t>(m) * top_k;
  Layout l;
  size_t at = 0;
  l.route = at;
  at += AlignUp(MoeRouteIndexWorkspaceBytes(m, top_k, experts));
  l.offsets = at;
  at += AlignUp(sizeof(int32_t) * (experts + 1));
  l.row_of_slot = at;
  at += AlignUp(sizeof(int32_t) * slots);
  l.slot_of_row = at;
  at += AlignUp(sizeof(int32_t) * slots);
  l.h = at;
  at += AlignUp(sizeof(__nv_bfloat16) * slots * expert_hidden);
  l.partial = at;
  at += AlignUp(sizeof(float) * slots * hidden);
  l.total = at;
  return l;
}

Status Launched(const char* what, cudaError_t launch = cudaSuccess) {
  const cudaError_t err = launch != cudaSuccess ? launch : cudaGetLastError();
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

// The optional profiling event `i` of MoeDecodeArgs::stage_events.
Status RecordStage(const MoeDecodeArgs& a, int i, cudaStream_t stream) {
  if (!a.stage_events) return Status::OK();
  const cudaError_t err = cudaEventRecord(a.stage_events[i], stream);
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string("MoeDecodeForward: stage event: ") + cudaGetErrorString(err));
}

// The `index`-th expert (in id order) with at least one routed row, or -1.
// Called by the whole block; ends with a barrier.
__device__ int FindActiveExpert(const int32_t* offsets, int experts, int index) {
  __shared__ int found_s;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int target = index, found = -1;
    for (int base = 0; base < experts && found < 0; base += 32) {
      const int e = base + lane;
      const bool busy = e < experts && offsets[e + 1] > offsets[e];
      const unsigned mask = __ballot_sync(0xffffffffu, busy);
      const int busy_count = __popc(mask);
      if (target < busy_count) {
        for (int b = 0; b < 32; ++b)
          if ((mask >> b) & 1u) {
            if (target == 0) {
              found = base + b;
              break;
            }
            --target;
          }
      } else {
        target -= busy_count;
      }
    }
    if (lane == 0) found_s = found;
  }
  __syncthreads();
  return found_s;
}

// The reduction buffer ahead of the activation tile, sized for the most
// rows per warp any slab uses.
constexpr int kMaxSlabRows = 4;
constexpr int kSlabReduceBytes = gemv::ReduceBytes(kMaxSlabRows);

// Rows per warp of a slab pass: with one or two tokens as many as fill the
// slab in one pass (up to kMaxSlabRows: more 16-byte loads in flight per
// lane, the same per-row sums, since a row's sum does not depend on how many
// rows its warp streams); with more tokens the accumulators grow with M, so
// gemv::kRows.
__device__ __forceinline__ int SlabRowsPerWarp(int count, int slab_rows, int groups) {
  if (count > 2) return gemv::kRows;
  return slab_rows / groups >= kMaxSlabRows ? kMaxSlabRows : 2;
}

template <typename Body>
__device__ __forceinline__ void DispatchRows(int rows, Body&& body) {
  if (rows >= 4) body(std::integral_constant<int, 4>{});
  else body(std::integral_constant<int, 2>{});
}

// Units (a W1 row and the W3 row of the same hidden unit) [unit0, unit0 +
// kUpSlabUnits) for the expert's tokens: a warp takes R / 2 units a pass
// (rows[0, R/2) its W1 rows, rows[R/2, R) their W3 rows).
template <QuantFormat F>
__device__ void UpSlab(const MoeDecodeArgs& a, const QuantWeight& w1, const QuantWeight& w3, int begin, int end,
                       const int32_t* slot_of_row, __nv_bfloat16* h, uint4* smem) {
  float* red_s = reinterpret_cast<float*>(smem);
  uint4* x_s = smem + kSlabReduceBytes / 16;
  const gemv::Split split = gemv::MakeSplit(F, a.hidden);
  const int warp = threadIdx.x / 32, g = warp / split.slices, slice = warp % split.slices;
  const int64_t row_bytes = gemv::RowBytes(F, a.hidden), row_scales = gemv::RowScales(F, a.hidden);
  const int unit0 = blockIdx.x * kUpSlabUnits;
  for (int t0 = begin; t0 < end; t0 += gemv::kMaxTokens) {
    const int count = min(gemv::kMaxTokens, end - t0);
    gemv::DispatchTokens(count, [&](auto tokens) {
      constexpr int M = decltype(tokens)::value;
      // One token (no index): every row is token 0's.
      gemv::StageX<F, M>(x_s, a.hidden, count, [&](int i) {
        return a.x + (slot_of_row ? static_cast<int64_t>(slot_of_row[t0 + i] / a.top_k) * a.hidden : 0);
      });
      DispatchRows(SlabRowsPerWarp(M, 2 * kUpSlabUnits, split.groups), [&](auto rows_tag) {
        constexpr int R = M > 2 ? gemv::kRows : decltype(rows_tag)::value;
        constexpr int U = R / 2;
        const int units_per_pass = split.groups * U;
        for (int pass = 0; pass < kUpSlabUnits / units_per_pass; ++pass) {
          const int ubase = unit0 + pass * units_per_pass + g * U;
          const uint8_t* rows[R];
          const float* scales[R];
#pragma unroll
          for (int r = 0; r < U; ++r) {
            rows[r] = static_cast<const uint8_t*>(w1.data) + (ubase + r) * row_bytes;
            rows[U + r] = static_cast<const uint8_t*>(w3.data) + (ubase + r) * row_bytes;
            scales[r] = w1.scales + (ubase + r) * row_scales;
            scales[U + r] = w3.scales + (ubase + r) * row_scales;
          }
          float acc[R][M];
          gemv::WarpDot<F, M, R>(rows, scales, x_s, split, slice, acc);
          gemv::WarpReduceToShared<M, R>(acc, red_s);
          __syncthreads();
          for (int t = threadIdx.x; t < units_per_pass * M; t += blockDim.x) {
            const int uu = t % units_per_pass, i = t / units_per_pass;
            if (i >= count) continue;
            const int gg = uu / U, r = uu % U;
            const float gv = gemv::SliceSum<R>(red_s, split, gg, r, i);
            const float uv = gemv::SliceSum<R>(red_s, split, gg, U + r, i);
            h[static_cast<int64_t>(t0 + i) * a.expert_hidden + unit0 + pass * units_per_pass + uu] =
                __float2bfloat16_rn(SiluExact(gv) * uv);
          }
          __syncthreads();
        }
      });
    });
  }
}

template <QuantFormat F>
__device__ void DownSlab(const MoeDecodeArgs& a, const QuantWeight& w2, int begin, int end,
                         const __nv_bfloat16* h, float* partial, uint4* smem) {
  float* red_s = reinterpret_cast<float*>(smem);
  uint4* x_s = smem + kSlabReduceBytes / 16;
  const gemv::Split split = gemv::MakeSplit(F, a.expert_hidden);
  const int warp = threadIdx.x / 32, g = warp / split.slices, slice = warp % split.slices;
  const int64_t row_bytes = gemv::RowBytes(F, a.expert_hidden), row_scales = gemv::RowScales(F, a.expert_hidden);
  const int slab0 = blockIdx.x * kDownSlabRows;
  for (int t0 = begin; t0 < end; t0 += gemv::kMaxTokens) {
    const int count = min(gemv::kMaxTokens, end - t0);
    gemv::DispatchTokens(count, [&](auto tokens) {
      constexpr int M = decltype(tokens)::value;
      gemv::StageX<F, M>(x_s, a.expert_hidden, count,
                         [&](int i) { return h + static_cast<int64_t>(t0 + i) * a.expert_hidden; });
      DispatchRows(SlabRowsPerWarp(M, kDownSlabRows, split.groups), [&](auto rows_tag) {
        constexpr int R = M > 2 ? gemv::kRows : decltype(rows_tag)::value;
        const int rows_per_pass = R * split.groups;
        for (int pass = 0; pass < kDownSlabRows / rows_per_pass; ++pass) {
          const int row0 = slab0 + pass * rows_per_pass + g * R;
          const uint8_t* rows[R];
          const float* scales[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            rows[r] = static_cast<const uint8_t*>(w2.data) + (row0 + r) * row_bytes;
            scales[r] = w2.scales + (row0 + r) * row_scales;
          }
          float acc[R][M];
          gemv::WarpDot<F, M, R>(rows, scales, x_s, split, slice, acc);
          gemv::WarpReduceToShared<M, R>(acc, red_s);
          __syncthreads();
          for (int t = threadIdx.x; t < rows_per_pass * M; t += blockDim.x) {
            const int rr = t % rows_per_pass, i = t / rows_per_pass;
            if (i >= count) continue;
            partial[static_cast<int64_t>(t0 + i) * a.hidden + slab0 + pass * rows_per_pass + rr] =
                gemv::SliceSum<R>(red_s, split, rr / R, rr % R, i);
          }
          __syncthreads();
        }
      });
    });
  }
}

// This block's expert and its rows [begin, end) of h / partial: from the
// route index (offsets), or with one token and no index (offsets null)
// block y is slot y, its row y (a slot whose id is out of range: none).
__device__ __forceinline__ bool ExpertRows(const MoeDecodeArgs& a, const int32_t* offsets, int* e, int* begin,
                                           int* end) {
  if (offsets == nullptr) {
    *e = a.ids[blockIdx.y];
    *begin = blockIdx.y;
    *end = blockIdx.y + 1;
    return *e < a.experts;
  }
  *e = FindActiveExpert(offsets, a.experts, blockIdx.y);
  if (*e < 0) return false;
  *begin = offsets[*e];
  *end = offsets[*e + 1];
  return true;
}

// The tensor-core pair's unit of work: 16 of an expert's rows
// (kMmaChunkRows; the tile's tokens per pass over its weights).
constexpr int kMmaChunkRows = 16;

// The `index`-th (expert, chunk) pair in (expert id, chunk) order, where
// expert e has ceil(rows_e / kMmaChunkRows) chunks, or false past the last.
// Called by the whole block; ends with a barrier.
__device__ bool FindExpertChunk(const int32_t* offsets, int experts, int index, int* e, int* chunk) {
  __shared__ int found_s[2];
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int target = index, found = -1, found_chunk = 0;
    for (int base = 0; base < experts && found < 0; base += 32) {
      const int ex = base + lane;
      const int chunks = ex < experts ? (offsets[ex + 1] - offsets[ex] + kMmaChunkRows - 1) / kMmaChunkRows : 0;
      int before = chunks;  // inclusive prefix sum over the 32 lanes, then exclusive
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int v = __shfl_up_sync(0xffffffffu, before, d);
        if (lane >= d) before += v;
      }
      const int total = __shfl_sync(0xffffffffu, before, 31);
      before -= chunks;
      const unsigned hit = __ballot_sync(0xffffffffu, target >= before && target < before + chunks);
      if (hit != 0) {
        const int l = __ffs(hit) - 1;
        found = base + l;
        found_chunk = target - __shfl_sync(0xffffffffu, before, l);
      } else {
        target -= total;
      }
    }
    if (lane == 0) {
      found_s[0] = found;
      found_s[1] = found_chunk;
    }
  }
  __syncthreads();
  *e = found_s[0];
  *chunk = found_s[1];
  return *e >= 0;
}

// ExpertRows for the tensor-core pair: block y is the y-th (expert, chunk)
// pair, its rows that chunk's up to kMmaChunkRows. The blocks of one
// expert's chunks are neighbours on the grid, so they read its weight tile
// at about the same time: once from DRAM, the rest from L2. (One block
// walking all of an expert's chunks re-read the tile after every other
// resident block had streamed its own: at batch 256 on gpu-ref the up stage
// read 227 MB of DRAM for 134 MB of weights.) The same rows of 16 in the
// same order, so the same bits.
// chunked false (a grid past its y extent): ExpertRows, the block walking
// all of its expert's chunks.
__device__ __forceinline__ bool ExpertChunkRows(const MoeDecodeArgs& a, const int32_t* offsets, bool chunked, int* e,
                                                int* begin, int* end) {
  if (offsets == nullptr || !chunked) return ExpertRows(a, offsets, e, begin, end);
  int chunk = 0;
  if (!FindExpertChunk(offsets, a.experts, blockIdx.y, e, &chunk)) return false;
  *begin = offsets[*e] + chunk * kMmaChunkRows;
  *end = min(*begin + kMmaChunkRows, offsets[*e + 1]);
  return true;
}

// kBlocksPerSm blocks an SM. One token (no index): 2 (<= 128 registers),
// so its slabs keep up to kMaxSlabRows rows of loads in flight a warp and a
// second block hides the other's reductions. Decode batches (the index):
// each of their thousands of blocks (experts x slabs) streams only 16-32 KB
// between a chain of dependent round trips (its expert, its rows, its
// activations), so more resident blocks hide more of those chains -- where
// the registers lost do not cost more, which depends on the format
// (MoeDecodeArgs::widest_format): bf16 3 (<= 80 registers), int4 4 (<= 64),
// int8 2. H100, gpu-ref, decode_bench ms/step at batches 8 / 16 / 32 against
// 2 an SM: bf16 with 3 0.94x / 0.93x / 0.92x (with 4 1.00x / 0.98x / 0.94x);
// int4 with 4 0.96x / 0.92x / 0.95x (with 3 1.00x / 0.96x / 0.95x); int8
// with 3 1.04x / 1.04x / 1.02x, with 4 1.22x / 1.18x / 1.04x. One token
// loses 4% with 3 or 4, so keeps 2 (docs/kernels.md has the table).
constexpr int kDirectBlocksPerSm = 2;
int IndexedBlocksPerSm(QuantFormat widest) {
  switch (widest) {
    case QuantFormat::kInt4: return 4;
    case QuantFormat::kInt8: return 2;
    case QuantFormat::kBF16: break;
  }
  return 3;
}

template <int kBlocksPerSm>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    MoeUpKernel(MoeDecodeArgs a, const int32_t* offsets, const int32_t* slot_of_row, __nv_bfloat16* h) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  extern __shared__ uint4 smem[];
  int e, begin, end;
  if (!ExpertRows(a, offsets, &e, &begin, &end)) return;
  const QuantWeight w1 = a.w1[e], w3 = a.w3[e];
  switch (w1.format) {
    case QuantFormat::kBF16: UpSlab<QuantFormat::kBF16>(a, w1, w3, begin, end, slot_of_row, h, smem); break;
    case QuantFormat::kInt8: UpSlab<QuantFormat::kInt8>(a, w1, w3, begin, end, slot_of_row, h, smem); break;
    case QuantFormat::kInt4: UpSlab<QuantFormat::kInt4>(a, w1, w3, begin, end, slot_of_row, h, smem); break;
  }
}

template <int kBlocksPerSm>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    MoeDownKernel(MoeDecodeArgs a, const int32_t* offsets, const __nv_bfloat16* h, float* partial) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  extern __shared__ uint4 smem[];
  int e, begin, end;
  if (!ExpertRows(a, offsets, &e, &begin, &end)) return;
  const QuantWeight w2 = a.w2[e];
  switch (w2.format) {
    case QuantFormat::kBF16: DownSlab<QuantFormat::kBF16>(a, w2, begin, end, h, partial, smem); break;
    case QuantFormat::kInt8: DownSlab<QuantFormat::kInt8>(a, w2, begin, end, h, partial, smem); break;
    case QuantFormat::kInt4: DownSlab<QuantFormat::kInt4>(a, w2, begin, end, h, partial, smem); break;
  }
}

// ---- Tensor-core variants: a block owns TB 16-row tiles of its expert's
// W1 and W3 (up) or W2 (down); the 8 warps split into TB groups of 8 / TB,
// one group a tile, whose warps split k ("slices") and are summed in warp
// order through shared memory. More tiles a block: fewer blocks staging the
// same activation rows, more iterations in flight per warp; fewer: more
// blocks. TB changes the fp32 summation order (the slices), so it is one
// fixed setting (MoeDecodeArgs::mma_tiles_per_block), not chosen per batch. ----

constexpr int kMmaWarps = gemv::kWarps;
constexpr int kMmaUpReduceFloats = kMmaWarps * 2 * 2 * 4 * 32;    // [warp][g, u][NT <= 2][4][32]
constexpr int kMmaDownReduceFloats = kMmaWarps * 2 * 4 * 32;      // [warp][NT <= 2][4][32]

// kPaired: MoeDecodeArgs::mma_paired_up_max_tokens's choice (a template
// argument: one loop body per kernel keeps the registers of each).
template <QuantFormat F, int TB, bool kPaired>
__device__ void UpTile(const MoeDecodeArgs& a, const QuantWeight& w1, const QuantWeight& w3, int begin, int end,
                       const int32_t* slot_of_row, __nv_bfloat16* h, uint4* smem) {
  constexpr int kSlices = kMmaWarps / TB;
  float* red_s = reinterpret_cast<float*>(smem);
  uint4* x_s = smem + kMmaUpReduceFloats / 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int u0 = (blockIdx.x * TB + warp / kSlices) * mma::kTileRows;
  for (int t0 = begin; t0 < end; t0 += 16) {
    const int count = min(16, end - t0);
    auto body = [&](auto tiles) {
      constexpr int NT = decltype(tiles)::value;
      mma::StageX<F, NT>(x_s, a.hidden, count, [&](int i) {
        return a.x + (slot_of_row ? static_cast<int64_t>(slot_of_row[t0 + i] / a.top_k) * a.hidden : 0);
      });
      float gu[2][NT][4];
      if constexpr (kPaired) {
        const uint8_t* const data[2] = {static_cast<const uint8_t*>(w1.data), static_cast<const uint8_t*>(w3.data)};
        const float* const scales[2] = {w1.scales, w3.scales};
        mma::WarpTilePair<F, NT>(data, scales, a.expert_hidden, u0, a.hidden, x_s, warp % kSlices, kSlices, gu);
      } else {
        mma::WarpTile<F, NT>(static_cast<const uint8_t*>(w1.data), w1.scales, a.expert_hidden, u0, a.hidden, x_s,
                             warp % kSlices, kSlices, gu[0]);
        mma::WarpTile<F, NT>(static_cast<const uint8_t*>(w3.data), w3.scales, a.expert_hidden, u0, a.hidden, x_s,
                             warp % kSlices, kSlices, gu[1]);
      }
      const auto& g = gu[0];
      const auto& u = gu[1];
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          red_s[(((warp * 2 + 0) * NT + t) * 4 + r) * 32 + lane] = g[t][r];
          red_s[(((warp * 2 + 1) * NT + t) * 4 + r) * 32 + lane] = u[t][r];
        }
      __syncthreads();
      for (int idx = threadIdx.x; idx < TB * NT * 4 * 32; idx += blockDim.x) {
        const int l = idx % 32, r = (idx / 32) % 4, t = (idx / 128) % NT, tile = idx / (128 * NT);
        const int token = mma::TileToken(l, t, r);
        if (token >= count) continue;
        float gv = 0.f, uv = 0.f;
        for (int j = tile * kSlices; j < (tile + 1) * kSlices; ++j) {
          gv += red_s[(((j * 2 + 0) * NT + t) * 4 + r) * 32 + l];
          uv += red_s[(((j * 2 + 1) * NT + t) * 4 + r) * 32 + l];
        }
        const int unit = (blockIdx.x * TB + tile) * mma::kTileRows + mma::TileRow(l, r);
        h[static_cast<int64_t>(t0 + token) * a.expert_hidden + unit] = __float2bfloat16_rn(SiluExact(gv) * uv);
      }
      __syncthreads();
    };
    if (count <= 8) body(std::integral_constant<int, 1>{});
    else body(std::integral_constant<int, 2>{});
  }
}

template <QuantFormat F, int TB>
__device__ void DownTile(const MoeDecodeArgs& a, const QuantWeight& w2, int begin, int end, const __nv_bfloat16* h,
                         float* partial, uint4* smem) {
  constexpr int kSlices = kMmaWarps / TB;
  float* red_s = reinterpret_cast<float*>(smem);
  uint4* x_s = smem + kMmaDownReduceFloats / 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = (blockIdx.x * TB + warp / kSlices) * mma::kTileRows;
  for (int t0 = begin; t0 < end; t0 += 16) {
    const int count = min(16, end - t0);
    auto body = [&](auto tiles) {
      constexpr int NT = decltype(tiles)::value;
      mma::StageX<F, NT>(x_s, a.expert_hidden, count,
                         [&](int i) { return h + static_cast<int64_t>(t0 + i) * a.expert_hidden; });
      float acc[NT][4];
      mma::WarpTile<F, NT>(static_cast<const uint8_t*>(w2.data), w2.scales, a.hidden, r0, a.expert_hidden, x_s,
                           warp % kSlices, kSlices, acc);
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) red_s[((warp * NT + t) * 4 + r) * 32 + lane] = acc[t][r];
      __syncthreads();
      for (int idx = threadIdx.x; idx < TB * NT * 4 * 32; idx += blockDim.x) {
        const int l = idx % 32, r = (idx / 32) % 4, t = (idx / 128) % NT, tile = idx / (128 * NT);
        const int token = mma::TileToken(l, t, r);
        if (token >= count) continue;
        float v = 0.f;
        for (int j = tile * kSlices; j < (tile + 1) * kSlices; ++j) v += red_s[((j * NT + t) * 4 + r) * 32 + l];
        const int row = (blockIdx.x * TB + tile) * mma::kTileRows + mma::TileRow(l, r);
        partial[static_cast<int64_t>(t0 + token) * a.hidden + row] = v;
      }
      __syncthreads();
    };
    if (count <= 8) body(std::integral_constant<int, 1>{});
    else body(std::integral_constant<int, 2>{});
  }
}

// MoeDecodeArgs::mma_prefetch_rows: the block's `rows` weight rows from
// `first` into L2, one 128-byte line a thread at a time, before the block
// stages its activations.
__device__ __forceinline__ void PrefetchRowsL2(const QuantWeight& w, int64_t first, int rows, int k) {
  const int64_t row_bytes = gemv::RowBytes(w.format, k);
  const uint8_t* base = static_cast<const uint8_t*>(w.data) + first * row_bytes;
  for (int64_t at = int64_t{threadIdx.x} * 128; at < rows * row_bytes; at += int64_t{blockDim.x} * 128)
    ptx::prefetch_global_L2(base + at);
}

// Blocks per SM of the tensor-core pair, as for the CUDA-core one (measured
// when a block was one 16-row tile, 32 KB of bf16 weights): up 3 (<= 80 registers; it
// used 111, so 2), down 4 (<= 64; it used 74, so 3). H100, gpu-ref,
// decode_bench, batch 64 / 128, medians of 4 runs in 2 calls: bf16 0.96x /
// 0.96x ms per step, int8 0.94x / 0.96x, int4 0.94x / 0.95x; up 4 and down
// 5 no better.
// The paired loop keeps both weights' next chunks in registers: at the
// 80 registers of 3 blocks an SM it spilled 432 bytes, so it takes 2.
template <int TB, bool kPaired>
__global__ void __launch_bounds__(kThreads, kPaired ? 2 : 3)
    MoeUpMmaKernel(MoeDecodeArgs a, const int32_t* offsets, const int32_t* slot_of_row, __nv_bfloat16* h,
                   bool chunked) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  extern __shared__ uint4 smem[];
  int e, begin, end;
  if (!ExpertChunkRows(a, offsets, chunked, &e, &begin, &end)) return;
  const QuantWeight w1 = a.w1[e], w3 = a.w3[e];
  if (a.mma_prefetch_rows && w1.format != QuantFormat::kBF16) {
    PrefetchRowsL2(w1, int64_t{blockIdx.x} * TB * mma::kTileRows, TB * mma::kTileRows, a.hidden);
    PrefetchRowsL2(w3, int64_t{blockIdx.x} * TB * mma::kTileRows, TB * mma::kTileRows, a.hidden);
  }
  switch (w1.format) {
    case QuantFormat::kBF16: UpTile<QuantFormat::kBF16, TB, kPaired>(a, w1, w3, begin, end, slot_of_row, h, smem); break;
    case QuantFormat::kInt8: UpTile<QuantFormat::kInt8, TB, kPaired>(a, w1, w3, begin, end, slot_of_row, h, smem); break;
    case QuantFormat::kInt4: UpTile<QuantFormat::kInt4, TB, kPaired>(a, w1, w3, begin, end, slot_of_row, h, smem); break;
  }
}

template <int TB>
__global__ void __launch_bounds__(kThreads, 4)
    MoeDownMmaKernel(MoeDecodeArgs a, const int32_t* offsets, const __nv_bfloat16* h, float* partial,
                     bool chunked) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  extern __shared__ uint4 smem[];
  int e, begin, end;
  if (!ExpertChunkRows(a, offsets, chunked, &e, &begin, &end)) return;
  const QuantWeight w2 = a.w2[e];
  if (a.mma_prefetch_rows && w2.format != QuantFormat::kBF16)
    PrefetchRowsL2(w2, int64_t{blockIdx.x} * TB * mma::kTileRows, TB * mma::kTileRows, a.expert_hidden);
  switch (w2.format) {
    case QuantFormat::kBF16: DownTile<QuantFormat::kBF16, TB>(a, w2, begin, end, h, partial, smem); break;
    case QuantFormat::kInt8: DownTile<QuantFormat::kInt8, TB>(a, w2, begin, end, h, partial, smem); break;
    case QuantFormat::kInt4: DownTile<QuantFormat::kInt4, TB>(a, w2, begin, end, h, partial, smem); break;
  }
}

// out[t, c..c+3] (+)= the top_k partials of token t in slot order, each
// times its gate: MoeDecodeCombineKernel's and MoeDecodeCombineNormKernel's
// one definition (the same sums in the same order).
__device__ __forceinline__ void CombineQuad(const float* __restrict__ partial, const float* __restrict__ gates,
                                            const int32_t* __restrict__ row_of_slot,
                                            const uint16_t* __restrict__ ids, int experts, float* out,
                                            Accumulate mode, int t, int c, int hidden, int top_k) {
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int j = 0; j < top_k; ++j) {
    // No index (one token): slot j's row is j, dropped when its id is out of range.
    const int row = row_of_slot ? row_of_slot[t * top_k + j] : (ids[t * top_k + j] < experts ? j : -1);
    if (row < 0) continue;  // dropped slot (id out of range): no contribution
    const float gate = gates[t * top_k + j];
    const float4 p = *reinterpret_cast<const float4*>(partial + static_cast<int64_t>(row) * hidden + c);
    s.x = fmaf(gate, p.x, s.x);
    s.y = fmaf(gate, p.y, s.y);
    s.z = fmaf(gate, p.z, s.z);
    s.w = fmaf(gate, p.w, s.w);
  }
  float4* o = reinterpret_cast<float4*>(out + static_cast<int64_t>(t) * hidden + c);
  if (mode == Accumulate::kAdd) {
    const float4 old = *o;
    s.x += old.x;
    s.y += old.y;
    s.z += old.z;
    s.w += old.w;
  }
  *o = s;
}

// One thread per (token, 4 columns).
__global__ void MoeDecodeCombineKernel(const float* __restrict__ partial, const float* __restrict__ gates,
                                       const int32_t* __restrict__ row_of_slot, const uint16_t* __restrict__ ids,
                                       int experts, float* out, Accumulate mode, int m, int hidden, int top_k) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  const int quads = hidden / 4;
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (idx >= int64_t{m} * quads) return;
  CombineQuad(partial, gates, row_of_slot, ids, experts, out, mode, static_cast<int>(idx / quads),
              static_cast<int>(idx % quads) * 4, hidden, top_k);
}

// MoeDecodeArgs::normed: one block per token, the combine of its row, then
// RmsNormRows's arithmetic on the finished row (BlockRowRstd reads it back:
// this block's own global writes, ordered by the barrier inside).
__global__ void __launch_bounds__(kRmsNormRowThreads)
    MoeDecodeCombineNormKernel(const float* __restrict__ partial, const float* __restrict__ gates,
                               const int32_t* __restrict__ row_of_slot, const uint16_t* __restrict__ ids,
                               int experts, float* out, Accumulate mode, int hidden, int top_k,
                               const float* __restrict__ norm_weight, __nv_bfloat16* normed, float eps) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  __shared__ float part[kRmsNormRowThreads / 32];
  const int t = blockIdx.x;
  for (int q = threadIdx.x; q < hidden / 4; q += kRmsNormRowThreads)
    CombineQuad(partial, gates, row_of_slot, ids, experts, out, mode, t, 4 * q, hidden, top_k);
  __syncthreads();
  const float* xr = out + int64_t{t} * hidden;
  const float rstd = BlockRowRstd<kRmsNormRowThreads>(xr, hidden, eps, part);
  __nv_bfloat16* yr = normed + int64_t{t} * hidden;
  for (int j = threadIdx.x; j < hidden; j += kRmsNormRowThreads) yr[j] = __float2bfloat16(xr[j] * rstd * norm_weight[j]);
}

// Opts in above the default 48 KB per block, which counts the kernels'
// static shared memory (FindActiveExpert's 4 bytes) too.
Status SetSmem(const void* kernel, size_t bytes) {
  if (bytes + 256 <= 48 * 1024) return Status::OK();
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
      cudaSuccess)
    return Launched("MoeDecodeForward: shared memory attribute");
  return Status::OK();
}

bool Aligned16(const void* p) { return p && reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

size_t MoeDecodeWorkspaceBytes(int m, int hidden, int expert_hidden, int experts, int top_k) {
  if (m <= 0 || hidden <= 0 || expert_hidden <= 0 || experts <= 0 || top_k <= 0) return 0;
  return MakeLayout(m, hidden, expert_hidden, experts, top_k).total;
}

namespace detail {

Status MoeDecodeForwardOnPath(const MoeDecodeArgs& a, MoeDecodePath path, cudaStream_t stream,
                              int max_chunk_blocks) {
  if (a.m < 0) return Status::InvalidArgument("MoeDecodeForward: m must be >= 0");
  if (a.hidden <= 0 || a.hidden % 128 != 0 || a.expert_hidden <= 0 || a.expert_hidden % 128 != 0)
    return Status::InvalidArgument("MoeDecodeForward: hidden (" + std::to_string(a.hidden) + ") and expert_hidden (" +
                                   std::to_string(a.expert_hidden) + ") must be positive multiples of 128");
  if (a.experts < 1 || a.experts > kMoeMaxExperts)
    return Status::InvalidArgument("MoeDecodeForward: experts must be in 1.." + std::to_string(kMoeMaxExperts));
  if (!ValidMoeMmaTilesPerBlock(a.mma_tiles_per_block))
    return Status::InvalidArgument("MoeDecodeForward: mma_tiles_per_block must be 1, 2 or 4, got " +
                                   std::to_string(a.mma_tiles_per_block));
  if (a.mma_paired_up_max_tokens < 0)
    return Status::InvalidArgument("MoeDecodeForward: mma_paired_up_max_tokens must be >= 0, got " +
                                   std::to_string(a.mma_paired_up_max_tokens));
  if (a.mma_min_slots_per_expert < 0)
    return Status::InvalidArgument("MoeDecodeForward: mma_min_slots_per_expert must be >= 0, got " +
                                   std::to_string(a.mma_min_slots_per_expert));
  if (a.top_k < 1 || a.top_k > std::min(a.experts, kMaxTopK))
    return Status::InvalidArgument("MoeDecodeForward: top_k must be in 1..min(experts, 16), got " +
                                   std::to_string(a.top_k));
  if (a.m == 0) return Status::OK();
  if ((a.norm_weight == nullptr) != (a.normed == nullptr))
    return Status::InvalidArgument("MoeDecodeForward: norm_weight and normed go together (both set or both null)");
  if (!Aligned16(a.x) || !Aligned16(a.out) || !a.ids || !a.gates || !a.w1 || !a.w3 || !a.w2 || !a.workspace)
    return Status::InvalidArgument("MoeDecodeForward: null pointer, or x / out not 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(a.workspace) % 256 != 0)
    return Status::InvalidArgument("MoeDecodeForward: workspace must be 256-byte aligned");
  const Layout l = MakeLayout(a.m, a.hidden, a.expert_hidden, a.experts, a.top_k);
  if (a.workspace_bytes < l.total)
    return Status::InvalidArgument("MoeDecodeForward: workspace of " + std::to_string(a.workspace_bytes) +
                                   " bytes, needs " + std::to_string(l.total));
  const size_t up_smem = kSlabReduceBytes + gemv::XTileBytes(a.hidden, gemv::kMaxTokens);
  const size_t down_smem = kSlabReduceBytes + gemv::XTileBytes(a.expert_hidden, gemv::kMaxTokens);
  if (static_cast<int64_t>(std::max(up_smem, down_smem)) > kMaxSmemBytes)
    return Status::InvalidArgument("MoeDecodeForward: hidden / expert_hidden too large for the shared activation tile");

  uint8_t* ws = static_cast<uint8_t*>(a.workspace);
  int32_t* offsets = reinterpret_cast<int32_t*>(ws + l.offsets);
  int32_t* row_of_slot = reinterpret_cast<int32_t*>(ws + l.row_of_slot);
  int32_t* slot_of_row = reinterpret_cast<int32_t*>(ws + l.slot_of_row);
  __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(ws + l.h);
  float* partial = reinterpret_cast<float*>(ws + l.partial);
  const size_t up_mma = kMmaUpReduceFloats * 4 + mma::XBytes(a.hidden, 2);
  const size_t down_mma = kMmaDownReduceFloats * 4 + mma::XBytes(a.expert_hidden, 2);
  const bool mma_fits = static_cast<int64_t>(std::max(up_mma, down_mma)) <= kMaxSmemBytes;
  if (path == MoeDecodePath::kAuto)
    path = mma_fits && int64_t{a.m} * a.top_k >= int64_t{a.mma_min_slots_per_expert} * a.experts
               ? MoeDecodePath::kTensorCore
               : MoeDecodePath::kCudaCore;
  // One token needs no index (on either pair): block y of the up and down
  // launches is slot y (its own row of h and of the partials), and the
  // combine reads slot j's row j -- the same sums in the same order, one
  // launch fewer.
  const bool direct = a.m == 1;
  if (direct) {
    offsets = row_of_slot = slot_of_row = nullptr;
  } else if (a.one_launch_index && int64_t{a.m} * a.top_k <= kMoeRouteIndexOneBlockSlots) {
    GROVE_RETURN_IF_ERROR(
        MoeRouteIndexOneBlock(a.ids, a.m, a.top_k, a.experts, offsets, row_of_slot, slot_of_row, nullptr, stream));
  } else {
    GROVE_RETURN_IF_ERROR(MoeRouteIndex(a.ids, a.m, a.top_k, a.experts, ws + l.route, l.offsets - l.route, offsets,
                                        row_of_slot, slot_of_row, nullptr, stream));
  }
  GROVE_RETURN_IF_ERROR(RecordStage(a, 0, stream));

  // At most min(experts, slots) experts are active; blocks past the actual
  // number exit after one look at the offsets.
  const int max_active = static_cast<int>(std::min<int64_t>(a.experts, int64_t{a.m} * a.top_k));
  if (path == MoeDecodePath::kTensorCore) {
    // (expert, chunk) pairs: sum of ceil(rows_e / 16) <= slots / 16 + the
    // active experts, and never more than the slots (one token: the slots).
    const int64_t slots = int64_t{a.m} * a.top_k;
    const int max_chunks =
        direct ? static_cast<int>(slots)
               : static_cast<int>(std::min<int64_t>(slots, (slots + kMmaChunkRows - 1) / kMmaChunkRows + max_active));
    // Past the grid's y extent (prefills of ~170k tokens and more) a block
    // walks all of its expert's chunks instead.
    const bool chunked = max_chunks <= std::min(max_chunk_blocks, kMoeMaxChunkBlocks);
    const int blocks_y = chunked ? max_chunks : max_active;
    if (!mma_fits)
      return Status::InvalidArgument("MoeDecodeForward: hidden / expert_hidden too large for the tensor-core path");
    const int tb = a.mma_tiles_per_block;
    const bool paired = a.m <= a.mma_paired_up_max_tokens;
    auto up_kernel = tb == 4   ? (paired ? MoeUpMmaKernel<4, true> : MoeUpMmaKernel<4, false>)
                     : tb == 2 ? (paired ? MoeUpMmaKernel<2, true> : MoeUpMmaKernel<2, false>)
                               : (paired ? MoeUpMmaKernel<1, true> : MoeUpMmaKernel<1, false>);
    auto down_kernel = tb == 4 ? MoeDownMmaKernel<4> : tb == 2 ? MoeDownMmaKernel<2> : MoeDownMmaKernel<1>;
    const int tile_rows = mma::kTileRows * tb;
    GROVE_RETURN_IF_ERROR(SetSmem(reinterpret_cast<const void*>(up_kernel), up_mma));
    GROVE_RETURN_IF_ERROR(Launched("MoeDecodeForward up (tensor cores)",
                                   LaunchKernel(up_kernel, dim3(a.expert_hidden / tile_rows, blocks_y),
                                                dim3(kThreads), up_mma, stream, a, offsets, slot_of_row, h,
                                                chunked)));
    GROVE_RETURN_IF_ERROR(RecordStage(a, 1, stream));
    GROVE_RETURN_IF_ERROR(SetSmem(reinterpret_cast<const void*>(down_kernel), down_mma));
    GROVE_RETURN_IF_ERROR(Launched("MoeDecodeForward down (tensor cores)",
                                   LaunchKernel(down_kernel, dim3(a.hidden / tile_rows, blocks_y),
                                                dim3(kThreads), down_mma, stream, a, offsets, h, partial,
                                                chunked)));
  } else {
    const int per_sm = direct ? kDirectBlocksPerSm : IndexedBlocksPerSm(a.widest_format);
    auto up_kernel = per_sm == 4 ? MoeUpKernel<4> : per_sm == 3 ? MoeUpKernel<3> : MoeUpKernel<2>;
    auto down_kernel = per_sm == 4 ? MoeDownKernel<4> : per_sm == 3 ? MoeDownKernel<3> : MoeDownKernel<2>;
    GROVE_RETURN_IF_ERROR(SetSmem(reinterpret_cast<const void*>(up_kernel), up_smem));
    GROVE_RETURN_IF_ERROR(
        Launched("MoeDecodeForward up", LaunchKernel(up_kernel, dim3(a.expert_hidden / kUpSlabUnits, max_active),
                                                     dim3(kThreads), up_smem, stream, a, offsets, slot_of_row, h)));
    GROVE_RETURN_IF_ERROR(RecordStage(a, 1, stream));
    GROVE_RETURN_IF_ERROR(SetSmem(reinterpret_cast<const void*>(down_kernel), down_smem));
    GROVE_RETURN_IF_ERROR(
        Launched("MoeDecodeForward down", LaunchKernel(down_kernel, dim3(a.hidden / kDownSlabRows, max_active),
                                                       dim3(kThreads), down_smem, stream, a, offsets, h, partial)));
  }
  GROVE_RETURN_IF_ERROR(RecordStage(a, 2, stream));
  if (a.combine_after != nullptr)
    GROVE_RETURN_IF_ERROR(
        Launched("MoeDecodeForward: waiting for combine_after", cudaStreamWaitEvent(stream, a.combine_after, 0)));
  if (a.normed != nullptr)
    return Launched("MoeDecodeForward combine + norm",
                    LaunchKernel(MoeDecodeCombineNormKernel, dim3(a.m), dim3(kRmsNormRowThreads), 0, stream, partial,
                                 a.gates, row_of_slot, a.ids, a.experts, a.out, a.mode, a.hidden, a.top_k,
                                 a.norm_weight, a.normed, a.norm_eps));
  const int64_t threads = int64_t{a.m} * (a.hidden / 4);
  return Launched("MoeDecodeForward combine",
                  LaunchKernel(MoeDecodeCombineKernel, static_cast<unsigned>((threads + 255) / 256), dim3(256), 0,
                               stream, partial, a.gates, row_of_slot, a.ids, a.experts, a.out, a.mode, a.m, a.hidden,
                               a.top_k));
}

}  // namespace detail

Status MoeDecodeForward(const MoeDecodeArgs& a, cudaStream_t stream) {
  return detail::MoeDecodeForwardOnPath(a, detail::MoeDecodePath::kAuto, stream);
}

}  // namespace grove::kernels
