// The host side of the rollout engine's paged KV cache: which slot (running
// sequence) holds which pages. A sequence is admitted with all the pages its
// budget needs (prompt + capped new tokens), so a running sequence never
// waits for memory and nothing is ever preempted; its pages and slot return
// to the free lists when it finishes. table() is what the device page table
// (kernels/paged_kv.h) mirrors: [slots, max_pages_per_seq] page ids, -1 where
// a slot holds no page.
//
// No CUDA: unit-tested on the CPU. Not thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace grove::rollout {

class KvPageTable {
 public:
  KvPageTable(int slots, int num_pages, int page_tokens, int max_pages_per_seq);

  // Pages that hold `tokens` positions.
  int PagesFor(int64_t tokens) const { return int((tokens + page_tokens_ - 1) / page_tokens_); }

  // A free slot with `pages` pages (1 <= pages <= max_pages_per_seq), or
  // nullopt when no slot or too few pages are free.
  std::optional<int> Admit(int pages);
  // Returns the slot's pages and the slot (a slot not admitted: no-op).
  void Release(int slot);

  const std::vector<int32_t>& table() const { return table_; }
  int max_pages_per_seq() const { return max_pages_per_seq_; }
  int num_pages() const { return num_pages_; }
  int free_pages() const { return int(free_pages_.size()); }
  int free_slots() const { return int(free_slots_.size()); }
  int peak_pages() const { return peak_; }

 private:
  int page_tokens_, max_pages_per_seq_, num_pages_;
  std::vector<int32_t> table_;
  std::vector<int> free_slots_;        // popped from the back: slot 0 first
  std::vector<int32_t> free_pages_;    // popped from the back: page 0 first
  std::vector<int> pages_of_slot_;     // 0 for a free slot
  int peak_ = 0;
};

}  // namespace grove::rollout
