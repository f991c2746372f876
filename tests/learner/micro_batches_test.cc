// CutMicroBatches: the bounds hold, order is kept, every sequence is in
// exactly one micro-batch, a sequence longer than the token bound is alone,
// and a token bound of 0 cuts by sequences only.
#include "learner/micro_batches.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace grove::learner {
namespace {

using Ranges = std::vector<MicroBatchRange>;

TEST(CutMicroBatches, NoTokenBoundCutsBySequencesOnly) {
  const std::vector<int64_t> lengths = {100, 200, 300, 400, 500, 600, 700};
  EXPECT_EQ(CutMicroBatches(lengths, 3, 0), (Ranges{{0, 3, 600}, {3, 6, 1500}, {6, 7, 700}}));
  EXPECT_EQ(CutMicroBatches(lengths, 32, 0), (Ranges{{0, 7, 2800}}));
  EXPECT_EQ(CutMicroBatches(lengths, 1, 0).size(), 7u);
}

TEST(CutMicroBatches, TokenBoundClosesARangeBeforeItIsExceeded) {
  const std::vector<int64_t> lengths = {40, 50, 30, 80, 20, 20, 60};
  // 40+50 = 90 <= 100, +30 would be 120; 30 alone, +80 = 110; 80+20 = 100
  // exactly (the bound is inclusive); 20+60 = 80.
  EXPECT_EQ(CutMicroBatches(lengths, 32, 100), (Ranges{{0, 2, 90}, {2, 3, 30}, {3, 5, 100}, {5, 7, 80}}));
  // Both bounds at once: the sequence bound cuts first here.
  EXPECT_EQ(CutMicroBatches(lengths, 2, 1000), (Ranges{{0, 2, 90}, {2, 4, 110}, {4, 6, 40}, {6, 7, 60}}));
}

TEST(CutMicroBatches, ASequenceLongerThanTheBoundIsAlone) {
  const std::vector<int64_t> lengths = {10, 500, 10, 10, 999, 5};
  EXPECT_EQ(CutMicroBatches(lengths, 32, 100),
            (Ranges{{0, 1, 10}, {1, 2, 500}, {2, 4, 20}, {4, 5, 999}, {5, 6, 5}}));
  // A bound below every length: one sequence each, none dropped.
  EXPECT_EQ(CutMicroBatches(lengths, 32, 1).size(), lengths.size());
}

TEST(CutMicroBatches, EmptyBatchHasNoRanges) {
  EXPECT_TRUE(CutMicroBatches({}, 4, 100).empty());
  EXPECT_TRUE(CutMicroBatches({}, 4, 0).empty());
}

// Random batches and bounds: the ranges tile [0, n) in order, each within
// both bounds unless it holds a single sequence, and greedy (the next
// range's first sequence would have broken a bound of the one before).
TEST(CutMicroBatches, RandomBatchesKeepEveryInvariant) {
  std::mt19937_64 rng(12345);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<int64_t> lengths(rng() % 40);
    for (int64_t& l : lengths) l = 1 + int64_t(rng() % 300);
    const int64_t max_seqs = 1 + int64_t(rng() % 10);
    const int64_t max_tokens = trial % 4 == 0 ? 0 : 1 + int64_t(rng() % 600);
    SCOPED_TRACE("trial " + std::to_string(trial));
    const Ranges r = CutMicroBatches(lengths, max_seqs, max_tokens);
    size_t next = 0;
    for (size_t k = 0; k < r.size(); ++k) {
      ASSERT_EQ(r[k].begin, next);
      ASSERT_GT(r[k].end, r[k].begin);
      int64_t tokens = 0;
      for (size_t i = r[k].begin; i < r[k].end; ++i) tokens += lengths[i];
      ASSERT_EQ(r[k].tokens, tokens);
      const size_t n = r[k].end - r[k].begin;
      ASSERT_LE(int64_t(n), max_seqs);
      if (max_tokens > 0 && n > 1) {
        ASSERT_LE(tokens, max_tokens);
      }
      if (k + 1 < r.size()) {
        const bool seq_full = int64_t(n) == max_seqs;
        const bool tok_full = max_tokens > 0 && tokens + lengths[r[k].end] > max_tokens;
        ASSERT_TRUE(seq_full || tok_full) << "range " << k << " closed early";
      }
      next = r[k].end;
    }
    ASSERT_EQ(next, lengths.size());
  }
}

}  // namespace
}  // namespace grove::learner
