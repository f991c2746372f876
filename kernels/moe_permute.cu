#include "kernels/moe_permute.h"

#include <string>

#include "kernels/launch.cuh"
#include "kernels/ptx/griddepcontrol.cuh"
#include "kernels/vector_io.cuh"

namespace grove::kernels {
namespace {

// MoeRouteIndex: a stable counting sort of the slots by expert in three
// launches. Chunks of kChunk slots, one block each:
//  1. per chunk, the number of slots of each expert -> counts[e][chunk];
//  2. one block scans counts in (expert, chunk) order: the first row of
//     expert e's slots from chunk c; also expert_offsets and expert_load;
//  3. per chunk, each slot's rank among the chunk's earlier slots of its
//     expert (warp match + per-warp counts) gives its row.
constexpr int kChunk = 512;
constexpr int kChunkWarps = kChunk / 32;
constexpr int kScanThreads = 1024;
constexpr int kMaxTopK = 16;
constexpr int kNoExpert = 0xffff;

size_t AlignUp(size_t x) { return (x + 255) / 256 * 256; }

int Chunks(int slots) { return (slots + kChunk - 1) / kChunk; }

__global__ void CountKernel(const uint16_t* ids, int slots, int experts, int chunks, int32_t* counts) {
  __shared__ int hist[kMoeMaxExperts];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int s = blockIdx.x * kChunk + threadIdx.x;
  if (s < slots && ids[s] < experts) atomicAdd(&hist[ids[s]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[static_cast<int64_t>(e) * chunks + blockIdx.x] = hist[e];
}

// Exclusive scan of counts (experts * chunks entries) in place; one block.
__global__ void ScanKernel(int32_t* counts, int n, int chunks, int experts, int32_t* expert_offsets,
                           int32_t* expert_load, int32_t* slot_of_row, int slots) {
  __shared__ int32_t partial[kScanThreads];
  const int per = (n + kScanThreads - 1) / kScanThreads;
  const int begin = threadIdx.x * per;
  const int end = min(n, begin + per);
  int32_t sum = 0;
  for (int i = begin; i < end; ++i) sum += counts[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  // Hillis-Steele inclusive scan of the per-thread sums.
  for (int d = 1; d < kScanThreads; d *= 2) {
    const int32_t v = threadIdx.x >= d ? partial[threadIdx.x - d] : 0;
    __syncthreads();
    partial[threadIdx.x] += v;
    __syncthreads();
  }
  int32_t run = partial[threadIdx.x] - sum;
  for (int i = begin; i < end; ++i) {
    const int32_t c = counts[i];
    counts[i] = run;
    run += c;
  }
  __syncthreads();
  const int32_t total = partial[kScanThreads - 1];
  for (int e = threadIdx.x; e <= experts; e += blockDim.x) {
    const int32_t off = e < experts ? counts[static_cast<int64_t>(e) * chunks] : total;
    expert_offsets[e] = off;
  }
  __syncthreads();
  if (expert_load)
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
      const int32_t next = e + 1 < experts ? counts[static_cast<int64_t>(e + 1) * chunks] : total;
      expert_load[e] = next - counts[static_cast<int64_t>(e) * chunks];
    }
  // Rows past the total belong to dropped slots (id >= experts): no slot.
  for (int r = total + threadIdx.x; r < slots; r += blockDim.x) slot_of_row[r] = -1;
}

__global__ void ScatterKernel(const uint16_t* ids, int slots, int experts, int chunks, const int32_t* base,
                              int32_t* row_of_slot, int32_t* slot_of_row) {
  __shared__ int32_t warp_rows[kChunkWarps][kMoeMaxExperts];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < kChunkWarps * experts; i += blockDim.x) warp_rows[i / experts][i % experts] = 0;
  __syncthreads();
  const int s = blockIdx.x * kChunk + threadIdx.x;
  int key = kNoExpert;
  if (s < slots) {
    key = ids[s];
    if (key >= experts) key = kNoExpert;
  }
  const unsigned peers = __match_any_sync(0xffffffffu, key);
  const int rank = __popc(peers & ((1u << lane) - 1));
  if (key != kNoExpert && rank == 0) warp_rows[warp][key] = __popc(peers);
  __syncthreads();
  // Per expert, turn the warps' counts into their first rows (warp order).
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    int32_t run = base[static_cast<int64_t>(e) * chunks + blockIdx.x];
    for (int w = 0; w < kChunkWarps; ++w) {
      const int32_t c = warp_rows[w][e];
      warp_rows[w][e] = run;
      run += c;
    }
  }
  __syncthreads();
  if (s >= slots) return;
  if (key == kNoExpert) {
    row_of_slot[s] = -1;
    return;
  }
  const int32_t row = warp_rows[warp][key] + rank;
  row_of_slot[s] = row;
  slot_of_row[row] = s;
}

// MoeRouteIndexOneBlock: one thread per slot (blockDim.x =
// kMoeRouteIndexOneBlockSlots). Histogram in shared memory, each expert's
// first row by a serial sum of the counts before it (<= 256 terms), each
// slot's rank by counting the earlier slots of its expert (<= 255 shared
// reads, the same index across a warp: broadcasts). Rows by slot order
// inside an expert, as the three-launch path gives.
__global__ void __launch_bounds__(kMoeRouteIndexOneBlockSlots)
    OneBlockIndexKernel(const uint16_t* ids, int slots, int experts, int32_t* expert_offsets, int32_t* row_of_slot,
                        int32_t* slot_of_row, int32_t* expert_load) {
  ptx::griddepcontrol_wait();  // launched with PDL: predecessors' writes visible from here
  ptx::griddepcontrol_launch_dependents();
  __shared__ int key[kMoeRouteIndexOneBlockSlots];
  __shared__ int32_t count[kMoeMaxExperts];
  __shared__ int32_t first[kMoeMaxExperts + 1];
  const int s = threadIdx.x;
  for (int e = s; e < experts; e += blockDim.x) count[e] = 0;
  int k = kNoExpert;
  if (s < slots) {
    k = ids[s];
    if (k >= experts) k = kNoExpert;
  }
  key[s] = k;
  __syncthreads();
  if (k != kNoExpert) atomicAdd(&count[k], 1);
  __syncthreads();
  for (int e = s; e <= experts; e += blockDim.x) {
    int32_t run = 0;
    for (int i = 0; i < e; ++i) run += count[i];
    first[e] = run;
  }
  __syncthreads();
  for (int e = s; e <= experts; e += blockDim.x) {
    expert_offsets[e] = first[e];
    if (expert_load && e < experts) expert_load[e] = count[e];
  }
  if (s >= slots) return;
  if (k == kNoExpert) {
    row_of_slot[s] = -1;
  } else {
    int32_t rank = 0;
    for (int i = 0; i < s; ++i) rank += key[i] == k;
    const int32_t row = first[k] + rank;
    row_of_slot[s] = row;
    slot_of_row[row] = s;
  }
  // Rows past the total belong to dropped slots: no slot. (Row s here; the
  // scatter above writes only rows below the total.)
  if (s >= first[experts]) slot_of_row[s] = -1;
}

Status Launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string(what) + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

Status CheckRows(const char* what, int tokens, int top_k, int hidden) {
  if (tokens < 0 || top_k < 1 || top_k > kMaxTopK || hidden < 8 || hidden % 8 != 0)
    return Status::InvalidArgument(std::string(what) + ": need tokens >= 0, top_k in 1.." +
                                   std::to_string(kMaxTopK) + ", hidden a positive multiple of 8; got tokens " +
                                   std::to_string(tokens) + ", top_k " + std::to_string(top_k) + ", hidden " +
                                   std::to_string(hidden));
  if (static_cast<int64_t>(tokens) * top_k > INT32_MAX)
    return Status::InvalidArgument(std::string(what) + ": tokens * top_k exceeds int32");
  return Status::OK();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr int kRowThreads = 128;
int Blocks(int rows) { return rows < 65536 ? rows : 65536; }

// a[r] = x[t] for every slot t*k+j with row r = row_of_slot[t*k+j], written
// from the token's side: each x row is read once and stored to its top_k
// rows (reading it once per row instead, in the rows' expert order, missed
// L2 and read x ~5.4 times from memory at gpu-ref's shapes: 252 us a layer
// where the bytes need ~150). Rows no slot points at (slot_of_row < 0)
// are zeroed by the block of the same index; no row is both.
__global__ void PermuteKernel(const __nv_bfloat16* x, const int32_t* row_of_slot, const int32_t* slot_of_row,
                              __nv_bfloat16* a, int tokens, int rows, int top_k, int hidden) {
  const int hv = hidden / 8;
  for (int i = blockIdx.x; i < rows; i += gridDim.x) {
    if (i < tokens) {
      int32_t dst[kMaxTopK];
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j) dst[j] = j < top_k ? row_of_slot[static_cast<int64_t>(i) * top_k + j] : -1;
      const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(i) * hidden);
      for (int c = threadIdx.x; c < hv; c += blockDim.x) {
        const uint4 v = src[c];
#pragma unroll
        for (int j = 0; j < kMaxTopK; ++j)
          if (dst[j] >= 0) reinterpret_cast<uint4*>(a + static_cast<int64_t>(dst[j]) * hidden)[c] = v;
      }
    }
    if (slot_of_row[i] < 0) {
      uint4* dst = reinterpret_cast<uint4*>(a + static_cast<int64_t>(i) * hidden);
      for (int c = threadIdx.x; c < hv; c += blockDim.x) dst[c] = make_uint4(0, 0, 0, 0);
    }
  }
}

// y[t] (+)= sum_j w_j * c[row_of_slot[t*k+j]], w_j = gates[t,j] or 1 (gates
// null: the permutation's backward). fp32 sum, one rounding.
__global__ void CombineKernel(const __nv_bfloat16* c, const float* gates, const int32_t* row_of_slot,
                              __nv_bfloat16* y, bool accumulate, int tokens, int top_k, int hidden) {
  for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
    __nv_bfloat16* out = y + static_cast<int64_t>(t) * hidden;
    for (int col = threadIdx.x * 8; col < hidden; col += blockDim.x * 8) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (accumulate) LoadBf16x8(out + col, acc);
      for (int j = 0; j < top_k; ++j) {
        const int row = row_of_slot[static_cast<int64_t>(t) * top_k + j];
        if (row < 0) continue;
        const float w = gates ? gates[static_cast<int64_t>(t) * top_k + j] : 1.f;
        float v[8];
        LoadBf16x8(c + static_cast<int64_t>(row) * hidden + col, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = fmaf(w, v[i], acc[i]);
      }
      StoreBf16x8(out + col, acc);
    }
  }
}

__global__ void CombineBackwardKernel(const __nv_bfloat16* dy, const __nv_bfloat16* c, const float* gates,
                                      const int32_t* row_of_slot, __nv_bfloat16* dc, float* dgates, int tokens,
                                      int top_k, int hidden) {
  __shared__ float partial[kRowThreads / 32][kMaxTopK];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
    float dot[kMaxTopK];
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) dot[j] = 0.f;
    for (int col = threadIdx.x * 8; col < hidden; col += blockDim.x * 8) {
      float g[8];
      LoadBf16x8(dy + static_cast<int64_t>(t) * hidden + col, g);
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j) {
        if (j >= top_k) break;
        const int row = row_of_slot[static_cast<int64_t>(t) * top_k + j];
        if (row < 0) continue;
        const float w = gates[static_cast<int64_t>(t) * top_k + j];
        float v[8], d[8];
        LoadBf16x8(c + static_cast<int64_t>(row) * hidden + col, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          dot[j] = fmaf(g[i], v[i], dot[j]);
          d[i] = w * g[i];
        }
        StoreBf16x8(dc + static_cast<int64_t>(row) * hidden + col, d);
      }
    }
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      float v = dot[j];
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) partial[warp][j] = v;
    }
    __syncthreads();
    if (threadIdx.x < top_k) {
      float sum = 0.f;
      for (int w = 0; w < kRowThreads / 32; ++w) sum += partial[w][threadIdx.x];
      dgates[static_cast<int64_t>(t) * top_k + threadIdx.x] = sum;
    }
    __syncthreads();
  }
}

}  // namespace

size_t MoeRouteIndexWorkspaceBytes(int tokens, int top_k, int experts) {
  if (tokens <= 0 || top_k <= 0 || experts <= 0) return 0;
  return AlignUp(sizeof(int32_t) * static_cast<size_t>(experts) * Chunks(tokens * top_k));
}

Status MoeRouteIndex(const uint16_t* ids, int tokens, int top_k, int experts, void* workspace,
                     size_t workspace_bytes, int32_t* expert_offsets, int32_t* row_of_slot, int32_t* slot_of_row,
                     int32_t* expert_load, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckRows("MoeRouteIndex", tokens, top_k, 8));
  if (experts < 1 || experts > kMoeMaxExperts)
    return Status::InvalidArgument("MoeRouteIndex: experts must be in 1.." + std::to_string(kMoeMaxExperts) +
                                   ", got " + std::to_string(experts));
  if (!expert_offsets) return Status::InvalidArgument("MoeRouteIndex: null expert_offsets");
  const int slots = tokens * top_k;
  if (slots == 0) {
    // No rows: every expert starts (and ends) at 0.
    if (cudaMemsetAsync(expert_offsets, 0, sizeof(int32_t) * (experts + 1), stream) != cudaSuccess ||
        (expert_load && cudaMemsetAsync(expert_load, 0, sizeof(int32_t) * experts, stream) != cudaSuccess))
      return Status::Internal("MoeRouteIndex: memset failed");
    return Status::OK();
  }
  if (!ids || !row_of_slot || !slot_of_row || !workspace)
    return Status::InvalidArgument("MoeRouteIndex: null pointer");
  const size_t need = MoeRouteIndexWorkspaceBytes(tokens, top_k, experts);
  if (workspace_bytes < need)
    return Status::InvalidArgument("MoeRouteIndex: workspace of " + std::to_string(workspace_bytes) +
                                   " bytes, needs " + std::to_string(need));
  const int chunks = Chunks(slots);
  int32_t* counts = static_cast<int32_t*>(workspace);
  CountKernel<<<chunks, kChunk, 0, stream>>>(ids, slots, experts, chunks, counts);
  GROVE_RETURN_IF_ERROR(Launched("MoeRouteIndex count"));
  ScanKernel<<<1, kScanThreads, 0, stream>>>(counts, experts * chunks, chunks, experts, expert_offsets,
                                             expert_load, slot_of_row, slots);
  GROVE_RETURN_IF_ERROR(Launched("MoeRouteIndex scan"));
  ScatterKernel<<<chunks, kChunk, 0, stream>>>(ids, slots, experts, chunks, counts, row_of_slot, slot_of_row);
  return Launched("MoeRouteIndex scatter");
}

Status MoeRouteIndexOneBlock(const uint16_t* ids, int tokens, int top_k, int experts, int32_t* expert_offsets,
                             int32_t* row_of_slot, int32_t* slot_of_row, int32_t* expert_load, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckRows("MoeRouteIndexOneBlock", tokens, top_k, 8));
  if (experts < 1 || experts > kMoeMaxExperts)
    return Status::InvalidArgument("MoeRouteIndexOneBlock: experts must be in 1.." + std::to_string(kMoeMaxExperts) +
                                   ", got " + std::to_string(experts));
  const int64_t slots = static_cast<int64_t>(tokens) * top_k;
  if (slots > kMoeRouteIndexOneBlockSlots)
    return Status::InvalidArgument("MoeRouteIndexOneBlock: " + std::to_string(slots) + " slots, at most " +
                                   std::to_string(kMoeRouteIndexOneBlockSlots));
  if (!expert_offsets || (slots > 0 && (!ids || !row_of_slot || !slot_of_row)))
    return Status::InvalidArgument("MoeRouteIndexOneBlock: null pointer");
  const cudaError_t err = LaunchKernel(OneBlockIndexKernel, dim3(1), dim3(kMoeRouteIndexOneBlockSlots), 0, stream,
                                       ids, static_cast<int>(slots), experts, expert_offsets, row_of_slot,
                                       slot_of_row, expert_load);
  if (err != cudaSuccess) return Status::Internal(std::string("MoeRouteIndexOneBlock: ") + cudaGetErrorString(err));
  return Launched("MoeRouteIndexOneBlock");
}

Status MoePermute(const __nv_bfloat16* x, const int32_t* row_of_slot, const int32_t* slot_of_row, __nv_bfloat16* a,
                  int rows, int top_k, int hidden, cudaStream_t stream) {
  if (top_k < 1 || rows < 0 || rows % top_k != 0)
    return Status::InvalidArgument("MoePermute: rows (" + std::to_string(rows) + ") must be a multiple of top_k (" +
                                   std::to_string(top_k) + ")");
  GROVE_RETURN_IF_ERROR(CheckRows("MoePermute", rows / top_k, top_k, hidden));
  if (rows == 0) return Status::OK();
  if (!x || !row_of_slot || !slot_of_row || !a) return Status::InvalidArgument("MoePermute: null pointer");
  if (!Aligned16(x) || !Aligned16(a)) return Status::InvalidArgument("MoePermute: x and a must be 16-byte aligned");
  PermuteKernel<<<Blocks(rows), kRowThreads, 0, stream>>>(x, row_of_slot, slot_of_row, a, rows / top_k, rows, top_k,
                                                          hidden);
  return Launched("MoePermute");
}

Status MoeCombine(const __nv_bfloat16* c, const float* gates, const int32_t* row_of_slot, __nv_bfloat16* y,
                  bool accumulate, int tokens, int top_k, int hidden, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckRows("MoeCombine", tokens, top_k, hidden));
  if (tokens == 0) return Status::OK();
  if (!c || !gates || !row_of_slot || !y) return Status::InvalidArgument("MoeCombine: null pointer");
  if (!Aligned16(c) || !Aligned16(y)) return Status::InvalidArgument("MoeCombine: c and y must be 16-byte aligned");
  CombineKernel<<<Blocks(tokens), kRowThreads, 0, stream>>>(c, gates, row_of_slot, y, accumulate, tokens, top_k,
                                                            hidden);
  return Launched("MoeCombine");
}

Status MoeCombineBackward(const __nv_bfloat16* dy, const __nv_bfloat16* c, const float* gates,
                          const int32_t* row_of_slot, __nv_bfloat16* dc, float* dgates, int tokens, int top_k,
                          int hidden, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckRows("MoeCombineBackward", tokens, top_k, hidden));
  if (tokens == 0) return Status::OK();
  if (!dy || !c || !gates || !row_of_slot || !dc || !dgates)
    return Status::InvalidArgument("MoeCombineBackward: null pointer");
  if (!Aligned16(dy) || !Aligned16(c) || !Aligned16(dc))
    return Status::InvalidArgument("MoeCombineBackward: dy, c and dc must be 16-byte aligned");
  CombineBackwardKernel<<<Blocks(tokens), kRowThreads, 0, stream>>>(dy, c, gates, row_of_slot, dc, dgates, tokens,
                                                                    top_k, hidden);
  return Launched("MoeCombineBackward");
}

Status MoePermuteBackward(const __nv_bfloat16* da, const int32_t* row_of_slot, __nv_bfloat16* dx, bool accumulate,
                          int tokens, int top_k, int hidden, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckRows("MoePermuteBackward", tokens, top_k, hidden));
  if (tokens == 0) return Status::OK();
  if (!da || !row_of_slot || !dx) return Status::InvalidArgument("MoePermuteBackward: null pointer");
  if (!Aligned16(da) || !Aligned16(dx))
    return Status::InvalidArgument("MoePermuteBackward: da and dx must be 16-byte aligned");
  CombineKernel<<<Blocks(tokens), kRowThreads, 0, stream>>>(da, nullptr, row_of_slot, dx, accumulate, tokens, top_k,
                                                            hidden);
  return Launched("MoePermuteBackward");
}

}  // namespace grove::kernels
