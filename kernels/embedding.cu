#include "kernels/embedding.h"

#include <cub/device/device_radix_sort.cuh>

#include <string>

#include "kernels/vector_io.cuh"

namespace grove::kernels {
namespace {

constexpr int kThreads = 128;

size_t AlignUp(size_t x) { return (x + 255) / 256 * 256; }

Status CheckShape(const char* what, int tokens, int vocab, int hidden) {
  if (tokens < 0 || vocab < 1 || hidden < 8 || hidden % 8 != 0)
    return Status::InvalidArgument(std::string(what) + ": need tokens >= 0, vocab >= 1, hidden a positive multiple "
                                   "of 8; got tokens " + std::to_string(tokens) + ", vocab " +
                                   std::to_string(vocab) + ", hidden " + std::to_string(hidden));
  return Status::OK();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Status LaunchStatus(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Internal(std::string(what) + " launch: " + cudaGetErrorString(err));
  return Status::OK();
}

// One block per token row (grid-stride over rows), 8 columns per thread.
__global__ void EmbeddingForwardKernel(const int32_t* ids, const __nv_bfloat16* table, __nv_bfloat16* out,
                                       int tokens, int vocab, int hidden) {
  for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int id = ids[t];
    const bool valid = id >= 0 && id < vocab;
    const uint4* src = reinterpret_cast<const uint4*>(table + static_cast<int64_t>(valid ? id : 0) * hidden);
    uint4* dst = reinterpret_cast<uint4*>(out + static_cast<int64_t>(t) * hidden);
    for (int c = threadIdx.x; c < hidden / 8; c += blockDim.x) dst[c] = valid ? src[c] : make_uint4(0, 0, 0, 0);
  }
}

// Keys: the ids (out-of-range ones mapped to vocab, sorted last and
// skipped); values: token indices 0..tokens-1.
__global__ void PrepareSortKernel(const int32_t* ids, int32_t* keys, int32_t* values, int tokens, int vocab) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int id = ids[t];
  keys[t] = (id >= 0 && id < vocab) ? id : vocab;
  values[t] = t;
}

// Block b owns sorted position b if it starts a run of equal ids: it sums
// the run's dout rows in token order (fp32) and adds the sum to dtable once.
// Only this block writes that dtable row, so the result is deterministic.
__global__ void EmbeddingBackwardKernel(const int32_t* sorted_ids, const int32_t* sorted_tokens,
                                        const __nv_bfloat16* dout, float* dtable, int tokens, int vocab,
                                        int hidden) {
  for (int p = blockIdx.x; p < tokens; p += gridDim.x) {
    const int id = sorted_ids[p];
    if (id >= vocab || (p > 0 && sorted_ids[p - 1] == id)) continue;
    int end = p + 1;
    while (end < tokens && sorted_ids[end] == id) ++end;
    float* row = dtable + static_cast<int64_t>(id) * hidden;
    for (int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int q = p; q < end; ++q) {
        float v[8];
        LoadBf16x8(dout + static_cast<int64_t>(sorted_tokens[q]) * hidden + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += v[i];
      }
      float old[8];
      LoadF32x8(row + c, old);
#pragma unroll
      for (int i = 0; i < 8; ++i) old[i] += acc[i];
      StoreF32x8(row + c, old);
    }
  }
}

int EndBit(int vocab) {  // keys are in [0, vocab]
  int bits = 1;
  while ((int64_t{1} << bits) <= vocab) ++bits;
  return bits;
}

size_t SortTempBytes(int tokens, int vocab) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), tokens, 0, EndBit(vocab));
  return bytes;
}

int Blocks(int rows) { return rows < 65536 ? rows : 65536; }

}  // namespace

Status EmbeddingForward(const int32_t* ids, const __nv_bfloat16* table, __nv_bfloat16* out, int tokens, int vocab,
                        int hidden, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape("EmbeddingForward", tokens, vocab, hidden));
  if (tokens == 0) return Status::OK();
  if (!ids || !table || !out) return Status::InvalidArgument("EmbeddingForward: null pointer");
  if (!Aligned16(table) || !Aligned16(out))
    return Status::InvalidArgument("EmbeddingForward: table and out must be 16-byte aligned");
  EmbeddingForwardKernel<<<Blocks(tokens), kThreads, 0, stream>>>(ids, table, out, tokens, vocab, hidden);
  return LaunchStatus("EmbeddingForward");
}

size_t EmbeddingBackwardWorkspaceBytes(int tokens, int vocab) {
  if (tokens <= 0 || vocab <= 0) return 0;
  return 4 * AlignUp(sizeof(int32_t) * size_t(tokens)) + AlignUp(SortTempBytes(tokens, vocab));
}

Status EmbeddingBackward(const int32_t* ids, const __nv_bfloat16* dout, float* dtable, void* workspace,
                         size_t workspace_bytes, int tokens, int vocab, int hidden, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckShape("EmbeddingBackward", tokens, vocab, hidden));
  if (tokens == 0) return Status::OK();
  if (!ids || !dout || !dtable || !workspace) return Status::InvalidArgument("EmbeddingBackward: null pointer");
  if (!Aligned16(dout) || !Aligned16(dtable))
    return Status::InvalidArgument("EmbeddingBackward: dout and dtable must be 16-byte aligned");
  const size_t need = EmbeddingBackwardWorkspaceBytes(tokens, vocab);
  if (workspace_bytes < need)
    return Status::InvalidArgument("EmbeddingBackward: workspace of " + std::to_string(workspace_bytes) +
                                   " bytes, needs " + std::to_string(need));
  char* w = static_cast<char*>(workspace);
  const size_t slab = AlignUp(sizeof(int32_t) * size_t(tokens));
  int32_t* keys_in = reinterpret_cast<int32_t*>(w);
  int32_t* values_in = reinterpret_cast<int32_t*>(w + slab);
  int32_t* keys_out = reinterpret_cast<int32_t*>(w + 2 * slab);
  int32_t* values_out = reinterpret_cast<int32_t*>(w + 3 * slab);
  void* temp = w + 4 * slab;
  size_t temp_bytes = need - 4 * slab;
  PrepareSortKernel<<<(tokens + 255) / 256, 256, 0, stream>>>(ids, keys_in, values_in, tokens, vocab);
  GROVE_RETURN_IF_ERROR(LaunchStatus("EmbeddingBackward prepare"));
  // LSD radix sort: stable, so equal ids keep token order.
  const cudaError_t err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in,
                                                          values_out, tokens, 0, EndBit(vocab), stream);
  if (err != cudaSuccess) return Status::Internal(std::string("EmbeddingBackward sort: ") + cudaGetErrorString(err));
  EmbeddingBackwardKernel<<<Blocks(tokens), kThreads, 0, stream>>>(keys_out, values_out, dout, dtable, tokens,
                                                                   vocab, hidden);
  return LaunchStatus("EmbeddingBackward");
}

}  // namespace grove::kernels
