#include "rollout/kv_page_table.h"

#include <algorithm>

namespace grove::rollout {

KvPageTable::KvPageTable(int slots, int num_pages, int page_tokens, int max_pages_per_seq)
    : page_tokens_(std::max(1, page_tokens)),
      max_pages_per_seq_(max_pages_per_seq),
      num_pages_(num_pages),
      table_(size_t(std::max(0, slots)) * std::max(0, max_pages_per_seq), -1),
      pages_of_slot_(std::max(0, slots), 0) {
  for (int s = slots - 1; s >= 0; --s) free_slots_.push_back(s);
  for (int p = num_pages - 1; p >= 0; --p) free_pages_.push_back(p);
}

std::optional<int> KvPageTable::Admit(int pages) {
  if (pages < 1 || pages > max_pages_per_seq_ || free_slots_.empty() || int(free_pages_.size()) < pages)
    return std::nullopt;
  const int slot = free_slots_.back();
  free_slots_.pop_back();
  for (int i = 0; i < pages; ++i) {
    table_[size_t(slot) * max_pages_per_seq_ + i] = free_pages_.back();
    free_pages_.pop_back();
  }
  pages_of_slot_[slot] = pages;
  peak_ = std::max(peak_, num_pages_ - int(free_pages_.size()));
  return slot;
}

void KvPageTable::Release(int slot) {
  if (slot < 0 || slot >= int(pages_of_slot_.size()) || pages_of_slot_[slot] == 0) return;  // not admitted
  int32_t* row = table_.data() + size_t(slot) * max_pages_per_seq_;
  for (int i = 0; i < pages_of_slot_[slot]; ++i) {
    free_pages_.push_back(row[i]);
    row[i] = -1;
  }
  pages_of_slot_[slot] = 0;
  free_slots_.push_back(slot);
}

}  // namespace grove::rollout
