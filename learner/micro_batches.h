// How a step's sequences are cut into micro-batches (one forward and
// backward each): consecutive runs in the batch's order, bounded in
// sequences and, optionally, in tokens. The step's device memory grows with
// the tokens of its largest micro-batch (GpuTransformer's activations), so a
// token bound is what keeps a step's peak fixed when completions get longer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace grove::learner {

struct MicroBatchRange {
  size_t begin = 0;  // first sequence
  size_t end = 0;    // one past the last
  int64_t tokens = 0;  // sum of the sequences' lengths
  bool operator==(const MicroBatchRange&) const = default;
};

// Consecutive ranges that cover [0, lengths.size()) in order, each sequence
// once. Each range holds at most max_sequences sequences (>= 1; smaller is
// taken as 1) and at most max_tokens tokens summed over lengths (<= 0: no
// token bound), but always at least one sequence: a sequence longer than
// max_tokens gets a range of its own. Greedy: a range closes only when the
// next sequence would break a bound. Empty lengths: no ranges.
std::vector<MicroBatchRange> CutMicroBatches(std::span<const int64_t> lengths, int64_t max_sequences,
                                             int64_t max_tokens);

}  // namespace grove::learner
