// KvPageTable: random admissions and releases keep every page owned by at
// most one slot, the table rows equal what each admission got, and the
// counts add up; admission refuses exactly when slots or pages are short.
#include "rollout/kv_page_table.h"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <vector>

namespace grove::rollout {
namespace {

TEST(KvPageTable, PagesFor) {
  KvPageTable t(2, 10, 16, 4);
  EXPECT_EQ(t.PagesFor(1), 1);
  EXPECT_EQ(t.PagesFor(16), 1);
  EXPECT_EQ(t.PagesFor(17), 2);
  EXPECT_EQ(t.PagesFor(64), 4);
}

TEST(KvPageTable, RandomAdmitReleaseKeepsPagesExclusive) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int slots = 8, pages = 40, per_seq = 9;
  KvPageTable t(slots, pages, 16, per_seq);
  std::map<int, std::vector<int32_t>> live;  // slot -> its pages
  int peak = 0;
  for (int step = 0; step < 5000; ++step) {
    if (!live.empty() && (rng() % 2 == 0)) {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      t.Release(it->first);
      live.erase(it);
    } else {
      const int want = 1 + int(rng() % per_seq);
      int used = 0;
      for (auto& [s, p] : live) used += int(p.size());
      const bool can = int(live.size()) < slots && pages - used >= want;
      const std::optional<int> slot = t.Admit(want);
      ASSERT_EQ(slot.has_value(), can) << "step " << step;
      if (slot) {
        ASSERT_EQ(live.count(*slot), 0u) << "slot handed out twice";
        std::vector<int32_t> got(t.table().begin() + *slot * per_seq, t.table().begin() + *slot * per_seq + want);
        live[*slot] = got;
        peak = std::max(peak, used + want);
      }
    }
    // Invariants: pages exclusive and in range, table rows -1 past each
    // sequence's pages and for free slots, counts consistent.
    std::set<int32_t> owned;
    int used = 0;
    for (int s = 0; s < slots; ++s) {
      auto it = live.find(s);
      const int n = it == live.end() ? 0 : int(it->second.size());
      for (int i = 0; i < per_seq; ++i) {
        const int32_t p = t.table()[s * per_seq + i];
        if (i < n) {
          ASSERT_EQ(p, it->second[i]);
          ASSERT_TRUE(p >= 0 && p < pages);
          ASSERT_TRUE(owned.insert(p).second) << "page " << p << " owned twice";
        } else {
          ASSERT_EQ(p, -1);
        }
      }
      used += n;
    }
    ASSERT_EQ(t.free_pages(), pages - used);
    ASSERT_EQ(t.free_slots(), slots - int(live.size()));
    ASSERT_EQ(t.peak_pages(), peak);
  }
}

TEST(KvPageTable, RefusesBadRequestsAndIgnoresFreeSlots) {
  KvPageTable t(1, 4, 16, 3);
  EXPECT_FALSE(t.Admit(0));
  EXPECT_FALSE(t.Admit(4));  // more than max_pages_per_seq
  auto s = t.Admit(3);
  ASSERT_TRUE(s);
  EXPECT_FALSE(t.Admit(1));  // no slot left
  t.Release(*s);
  t.Release(*s);  // twice: no-op
  t.Release(7);   // out of range: no-op
  EXPECT_EQ(t.free_pages(), 4);
  EXPECT_EQ(t.free_slots(), 1);
}

}  // namespace
}  // namespace grove::rollout
