#include "learner/micro_batches.h"

#include <algorithm>

namespace grove::learner {

std::vector<MicroBatchRange> CutMicroBatches(std::span<const int64_t> lengths, int64_t max_sequences,
                                             int64_t max_tokens) {
  const size_t max_seqs = static_cast<size_t>(std::max<int64_t>(max_sequences, 1));
  std::vector<MicroBatchRange> out;
  MicroBatchRange cur;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t len = lengths[i];
    const size_t held = cur.end - cur.begin;
    const bool full = held == max_seqs || (max_tokens > 0 && held > 0 && cur.tokens + len > max_tokens);
    if (full) {
      out.push_back(cur);
      cur = MicroBatchRange{i, i, 0};
    }
    cur.end = i + 1;
    cur.tokens += len;
  }
  if (cur.end > cur.begin) out.push_back(cur);
  return out;
}

}  // namespace grove::learner
