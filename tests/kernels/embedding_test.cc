// Embedding lookup and gradient against model/transformer.cc's loops on the
// CPU. The forward is a copy (exact). The backward adds, per id, the rows of
// dout in token order in fp32 and then adds that sum to dtable once: an
// n-term fp32 sum is within n * 2^-24 * sum|terms| of the exact one
// (Higham's bound, n = occurrences + 1 for the final add), which is the
// per-element tolerance against the double reference. It must also be
// deterministic: two runs give identical bits.
#include "kernels/embedding.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

using testing::DeviceBuffer;

// hot_fraction of the tokens share id 7 (a long run); bad ids (-1, vocab)
// are mixed in when with_bad_ids.
void CheckEmbedding(int tokens, int vocab, int hidden, double hot_fraction, bool with_bad_ids) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " tokens " + std::to_string(tokens) + " vocab " +
               std::to_string(vocab) + " hidden " + std::to_string(hidden));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, vocab - 1);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<int32_t> ids(tokens);
  for (int32_t& id : ids) {
    id = u(rng) < hot_fraction ? 7 % vocab : pick(rng);
    if (with_bad_ids && u(rng) < 0.02) id = u(rng) < 0.5 ? -1 : vocab;
  }
  std::vector<__nv_bfloat16> table, dout;
  std::vector<double> table_d, dout_d;
  testing::RandomBf16(rng, size_t(vocab) * hidden, &table, &table_d);
  testing::RandomBf16(rng, size_t(tokens) * hidden, &dout, &dout_d);
  std::vector<float> dtable0(size_t(vocab) * hidden);
  std::uniform_real_distribution<float> uf(-1.f, 1.f);
  for (float& x : dtable0) x = uf(rng);

  DeviceBuffer<int32_t> d_ids(tokens);
  DeviceBuffer<__nv_bfloat16> d_table(table.size()), d_out(size_t(tokens) * hidden), d_dout(dout.size());
  DeviceBuffer<float> d_dtable(dtable0.size());
  const size_t ws_bytes = EmbeddingBackwardWorkspaceBytes(tokens, vocab);
  DeviceBuffer<char> d_ws(ws_bytes);
  GROVE_CUDA_OK(d_ids.Upload(ids));
  GROVE_CUDA_OK(d_table.Upload(table));
  GROVE_CUDA_OK(d_dout.Upload(dout));
  GROVE_CUDA_OK(cudaMemset(d_out.get(), 0xFF, d_out.count() * 2));

  Status s = EmbeddingForward(d_ids.get(), d_table.get(), d_out.get(), tokens, vocab, hidden, nullptr);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<__nv_bfloat16> out;
  GROVE_CUDA_OK(d_out.Download(&out));
  size_t bad_fwd = 0;
  for (int t = 0; t < tokens; ++t) {
    const bool valid = ids[t] >= 0 && ids[t] < vocab;
    for (int j = 0; j < hidden; ++j) {
      const float want = valid ? float(table_d[size_t(ids[t]) * hidden + j]) : 0.f;
      if (__bfloat162float(out[size_t(t) * hidden + j]) != want) ++bad_fwd;
    }
  }
  EXPECT_EQ(bad_fwd, 0u);

  std::vector<float> first, second;
  for (int run = 0; run < 2; ++run) {
    GROVE_CUDA_OK(d_dtable.Upload(dtable0));
    s = EmbeddingBackward(d_ids.get(), d_dout.get(), d_dtable.get(), d_ws.get(), ws_bytes, tokens, vocab, hidden,
                          nullptr);
    ASSERT_TRUE(s.ok()) << s;
    GROVE_CUDA_OK(d_dtable.Download(run == 0 ? &first : &second));
  }
  EXPECT_EQ(first, second) << "the backward is not deterministic";

  std::vector<double> ref(dtable0.begin(), dtable0.end()), bound(dtable0.size());
  std::vector<int> occurrences(vocab, 0);
  for (size_t i = 0; i < ref.size(); ++i) bound[i] = std::fabs(ref[i]);
  for (int t = 0; t < tokens; ++t) {
    if (ids[t] < 0 || ids[t] >= vocab) continue;
    ++occurrences[ids[t]];
    for (int j = 0; j < hidden; ++j) {
      ref[size_t(ids[t]) * hidden + j] += dout_d[size_t(t) * hidden + j];
      bound[size_t(ids[t]) * hidden + j] += std::fabs(dout_d[size_t(t) * hidden + j]);
    }
  }
  size_t bad_bwd = 0;
  for (int v = 0; v < vocab; ++v)
    for (int j = 0; j < hidden; ++j) {
      const size_t i = size_t(v) * hidden + j;
      const double tol = (occurrences[v] + 1) * 0x1p-24 * bound[i];
      if (!(std::fabs(first[i] - ref[i]) <= tol)) ++bad_bwd;
    }
  EXPECT_EQ(bad_bwd, 0u);
}

TEST(EmbeddingTest, SmallWithRepeatsAndBadIds) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckEmbedding(1000, 300, 64, 0.1, true);
  CheckEmbedding(37, 5, 8, 0.0, true);
}

TEST(EmbeddingTest, GpuReferenceShape) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckEmbedding(4099, 32768, 1024, 0.05, false);
}

TEST(EmbeddingTest, OneIdForEveryToken) {
  GROVE_SKIP_WITHOUT_GPU();
  CheckEmbedding(3000, 100, 256, 1.0, false);
}

TEST(EmbeddingTest, RejectsBadShapes) {
  EXPECT_EQ(EmbeddingForward(nullptr, nullptr, nullptr, 4, 10, 12, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(EmbeddingForward(nullptr, nullptr, nullptr, 4, 10, 16, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(EmbeddingBackward(nullptr, nullptr, nullptr, nullptr, 0, 4, 10, 16, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(EmbeddingForward(nullptr, nullptr, nullptr, 0, 10, 16, nullptr).ok());
}

}  // namespace
}  // namespace grove::kernels
