#include "replay/group_store.h"

#include <map>
#include <random>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "tests/replay/scratch_dir.h"

namespace grove::replay {
namespace {

using testing::ScratchDir;

std::string RandomPayload(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

std::unique_ptr<GroupStore> OpenOrDie(const std::string& path, SyncMode mode = SyncMode::kGroupCommit) {
  GroupStoreOptions o;
  o.path = path;
  o.sync_mode = mode;
  Result<std::unique_ptr<GroupStore>> store = GroupStore::Open(o);
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? std::move(*store) : nullptr;
}

class GroupStoreModes : public ::testing::TestWithParam<SyncMode> {};

TEST_P(GroupStoreModes, StoresReadsAndDedupesAcrossReopen) {
  ScratchDir dir;
  std::mt19937_64 rng(7);
  std::map<std::string, GroupRecord> written;
  std::map<std::string, SampleKey> where;
  {
    auto store = OpenOrDie(dir.Sub("db"), GetParam());
    ASSERT_NE(store, nullptr);
    for (int i = 0; i < 60; ++i) {
      GroupRecord r{"g" + std::to_string(i), static_cast<int64_t>(rng() % 5), RandomPayload(rng, rng() % 3000), 0};
      Result<InsertResult> res = store->Insert(r);
      ASSERT_TRUE(res.ok()) << res.status();
      EXPECT_EQ(res->outcome, InsertOutcome::kStored);
      EXPECT_EQ(res->key.policy_version, r.policy_version);
      where[r.group_id] = res->key;
      written[r.group_id] = r;
    }
    // Re-sending is a duplicate that points at the first copy, even with another payload.
    GroupRecord again = written["g5"];
    again.payload = "different";
    Result<InsertResult> dup = store->Insert(again);
    ASSERT_TRUE(dup.ok());
    EXPECT_EQ(dup->outcome, InsertOutcome::kDuplicate);
    EXPECT_EQ(dup->key, where["g5"]);
    EXPECT_EQ(store->Counters().duplicates, 1u);
    EXPECT_EQ(store->Insert(GroupRecord{"", 1, "x", 0}).status().code(), StatusCode::kInvalidArgument);
  }
  auto store = OpenOrDie(dir.Sub("db"), GetParam());
  ASSERT_NE(store, nullptr);
  StoreCounters c = store->Counters();
  EXPECT_EQ(c.stored, 60u);
  uint64_t bytes = 0;
  for (auto& [id, r] : written) bytes += r.payload.size();
  EXPECT_EQ(c.stored_bytes, bytes);

  std::vector<SampleKey> keys;
  std::vector<std::string> ids;
  for (auto& [id, k] : where) {
    keys.push_back(k);
    ids.push_back(id);
  }
  Result<std::vector<GroupRecord>> read = store->Read(keys);
  ASSERT_TRUE(read.ok()) << read.status();
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ((*read)[i].group_id, ids[i]);
    EXPECT_EQ((*read)[i].payload, written[ids[i]].payload);
    EXPECT_EQ((*read)[i].policy_version, written[ids[i]].policy_version);
  }
  // After reopen the id index still dedupes, and new arrivals do not reuse old ones.
  Result<InsertResult> dup = store->Insert(written["g0"]);
  ASSERT_TRUE(dup.ok());
  EXPECT_EQ(dup->outcome, InsertOutcome::kDuplicate);
  Result<InsertResult> fresh = store->Insert(GroupRecord{"new", 0, "p", 0});
  ASSERT_TRUE(fresh.ok());
  for (auto& [id, k] : where) EXPECT_GT(fresh->key.arrival, k.arrival);

  // Unsettled groups come back oldest (version, arrival) first.
  std::vector<SampleKey> order;
  ASSERT_TRUE(store->ForEachUnsettled([&](const UnsettledGroup& g) { order.push_back(g.key); }).ok());
  EXPECT_EQ(order.size(), 61u);
  EXPECT_TRUE(std::is_sorted(order.begin(), order.end()));
}

TEST_P(GroupStoreModes, ConcurrentWritersOfTheSameIdsStoreEachOnce) {
  ScratchDir dir;
  auto store = OpenOrDie(dir.Sub("db"), GetParam());
  ASSERT_NE(store, nullptr);
  constexpr int kThreads = 6, kIds = 80;
  std::vector<std::thread> threads;
  std::atomic<int> stored{0}, duplicates{0}, errors{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIds; ++i) {
        const int id = (i * 7 + t * 13) % kIds;  // every thread sends every id, in another order
        Result<InsertResult> r = store->Insert(GroupRecord{"id" + std::to_string(id), id % 3, std::string(100, 'x'), 0});
        if (!r.ok()) ++errors;
        else if (r->outcome == InsertOutcome::kStored) ++stored;
        else ++duplicates;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(stored.load(), kIds);
  EXPECT_EQ(duplicates.load(), kIds * (kThreads - 1));
  int unsettled = 0;
  std::set<std::string> seen;
  ASSERT_TRUE(store->ForEachUnsettled([&](const UnsettledGroup& g) {
    ++unsettled;
    seen.insert(g.group_id);
  }).ok());
  EXPECT_EQ(unsettled, kIds);
  EXPECT_EQ(seen.size(), static_cast<size_t>(kIds));
}

INSTANTIATE_TEST_SUITE_P(BothSyncModes, GroupStoreModes,
                         ::testing::Values(SyncMode::kPerWrite, SyncMode::kGroupCommit),
                         [](const auto& info) { return std::string(SyncModeName(info.param)); });

TEST(GroupStoreTest, MarkConsumedMovesCursorAtomicallyAndIdempotently) {
  ScratchDir dir;
  auto store = OpenOrDie(dir.Sub("nested/dirs/db"));  // missing parents are created
  ASSERT_NE(store, nullptr);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(store->Insert({"g" + std::to_string(i), i / 3, "p", 0}).ok());
  EXPECT_EQ(store->Cursor("learner").value().learner_version, -1);

  Result<std::vector<SampleKey>> marked = store->MarkConsumed({"g0", "g1", "g1", "g2"}, 4, "learner");
  ASSERT_TRUE(marked.ok()) << marked.status();
  EXPECT_EQ(marked->size(), 3u);
  DataCursor c = store->Cursor("learner").value();
  EXPECT_EQ(c.learner_version, 4);
  EXPECT_EQ(c.consumed, 3u);

  // A retried mark is harmless: nothing new, the version moves.
  marked = store->MarkConsumed({"g2", "g3"}, 5, "learner");
  ASSERT_TRUE(marked.ok());
  EXPECT_EQ(marked->size(), 1u);
  c = store->Cursor("learner").value();
  EXPECT_EQ(c.learner_version, 5);
  EXPECT_EQ(c.consumed, 4u);

  // An unknown id fails the whole call and writes nothing.
  Result<std::vector<SampleKey>> bad = store->MarkConsumed({"g4", "nope"}, 6, "learner");
  EXPECT_EQ(bad.status().code(), StatusCode::kNotFound);
  c = store->Cursor("learner").value();
  EXPECT_EQ(c.learner_version, 5);
  EXPECT_EQ(c.consumed, 4u);
  EXPECT_EQ(store->Counters().consumed, 4u);

  // Another consumer has its own cursor.
  ASSERT_TRUE(store->MarkConsumed({"g4"}, 1, "other").ok());
  EXPECT_EQ(store->Cursor("other").value().consumed, 1u);
  EXPECT_EQ(store->Cursor("learner").value().consumed, 4u);

  std::set<std::string> unsettled;
  ASSERT_TRUE(store->ForEachUnsettled([&](const UnsettledGroup& g) { unsettled.insert(g.group_id); }).ok());
  EXPECT_EQ(unsettled, (std::set<std::string>{"g5", "g6", "g7", "g8", "g9"}));
  store.reset();
  store = OpenOrDie(dir.Sub("nested/dirs/db"));
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->Cursor("learner").value().consumed, 4u);
  EXPECT_EQ(store->Counters().consumed, 5u);
}

TEST(GroupStoreTest, RetentionFreesTheRetiredRangeAndOnlyIt) {
  ScratchDir dir;
  GroupStoreOptions o;
  o.path = dir.Sub("db");
  o.write_buffer_bytes = 4 << 20;
  auto opened = GroupStore::Open(o);
  ASSERT_TRUE(opened.ok()) << opened.status();
  auto store = std::move(*opened);
  std::mt19937_64 rng(3);
  constexpr int kPerVersion = 40, kVersions = 6;
  constexpr size_t kPayload = 64 << 10;
  std::vector<std::string> old_ids;
  for (int v = 0; v < kVersions; ++v) {
    for (int i = 0; i < kPerVersion; ++i) {
      const std::string id = "v" + std::to_string(v) + "-" + std::to_string(i);
      ASSERT_TRUE(store->Insert({id, v, RandomPayload(rng, kPayload), 0}).ok());
      if (v < 4) old_ids.push_back(id);
    }
  }
  const uint64_t before = store->LiveFileBytes().value();
  EXPECT_GT(before, uint64_t{kVersions * kPerVersion} * kPayload);

  // Versions 0..3 are not all settled yet: refused, nothing deleted.
  ASSERT_TRUE(store->MarkConsumed(std::vector<std::string>(old_ids.begin(), old_ids.end() - 1), 9, "l").ok());
  Status refused = store->RetireBelow(4);
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_NE(refused.message().find(old_ids.back()), std::string::npos) << refused;
  // Dropping the last one as stale settles it.
  std::optional<SampleKey> last = store->Find(old_ids.back()).value();
  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(store->MarkDroppedStale({*last}).value(), 1u);
  // Fewer groups below the bound than asked for: nothing happens yet.
  ASSERT_TRUE(store->RetireBelow(4, 4 * kPerVersion + 1).ok());
  EXPECT_EQ(store->Counters().retention_floor, INT64_MIN);
  EXPECT_TRUE(store->Find(old_ids.front()).value().has_value());
  ASSERT_TRUE(store->RetireBelow(4, 4 * kPerVersion).ok());

  const uint64_t after = store->LiveFileBytes().value();
  const uint64_t retired = uint64_t{4 * kPerVersion} * kPayload;
  const uint64_t kept = uint64_t{2 * kPerVersion} * kPayload;
  // The files shrink by about the retired payload bytes (key and index overhead is small).
  EXPECT_LT(after, before - retired * 95 / 100) << before << " -> " << after;
  EXPECT_GE(after, kept);

  EXPECT_EQ(store->Counters().retention_floor, 4);
  EXPECT_FALSE(store->Find(old_ids.front()).value().has_value());
  Result<InsertResult> late = store->Insert({old_ids.front(), 1, "late", 0});
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(late->outcome, InsertOutcome::kBelowRetentionFloor);
  int remaining = 0;
  ASSERT_TRUE(store->ForEachUnsettled([&](const UnsettledGroup& g) {
    EXPECT_GE(g.key.policy_version, 4);
    ++remaining;
  }).ok());
  EXPECT_EQ(remaining, 2 * kPerVersion);
  // Retiring below the floor again is a no-op; the store reopens with its floor.
  EXPECT_TRUE(store->RetireBelow(2).ok());
  store.reset();
  auto reopened = GroupStore::Open(o);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_EQ((*reopened)->Counters().retention_floor, 4);
  EXPECT_EQ((*reopened)->Counters().stored, uint64_t{kVersions * kPerVersion});
}

TEST(GroupStoreTest, ParsesSyncModes) {
  EXPECT_EQ(ParseSyncMode("per_write").value(), SyncMode::kPerWrite);
  EXPECT_EQ(ParseSyncMode("group_commit").value(), SyncMode::kGroupCommit);
  EXPECT_EQ(ParseSyncMode("fsync").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::replay
