#include "replay/replay_service.h"

#include <atomic>
#include <map>
#include <random>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "replay/replay_config.h"
#include "tests/replay/scratch_dir.h"

namespace grove::replay {
namespace {

using namespace std::chrono_literals;
using testing::ScratchDir;

ReplayOptions BaseOptions(const ScratchDir& dir) {
  ReplayOptions o;
  o.store.path = dir.Sub("db");
  o.store.sync_mode = SyncMode::kGroupCommit;
  return o;
}

std::unique_ptr<ReplayService> OpenOrDie(const ReplayOptions& o) {
  auto r = ReplayService::Open(o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : nullptr;
}

std::vector<std::string> IdsOf(const std::vector<GroupRecord>& groups) {
  std::vector<std::string> ids;
  for (const auto& g : groups) ids.push_back(g.group_id);
  return ids;
}

// A model of the store: the unsettled groups in (version, arrival) order. The
// service must drop exactly the model's stale groups and serve its oldest.
TEST(ReplayServiceTest, StalenessBoundHoldsAndDroppedCountIsExact) {
  ScratchDir dir;
  ReplayOptions o = BaseOptions(dir);
  o.max_unconsumed = 100000;
  auto replay = OpenOrDie(o);
  ASSERT_NE(replay, nullptr);
  std::mt19937_64 rng(2024);
  std::map<std::pair<int64_t, uint64_t>, std::string> model;  // (version, insert order) -> id
  uint64_t order = 0, total_dropped = 0;
  int64_t learner = 0;
  for (int step = 0; step < 60; ++step) {
    // Writers produce groups under versions a little behind the learner.
    const int inserts = static_cast<int>(rng() % 12);
    for (int i = 0; i < inserts; ++i) {
      const int64_t version = std::max<int64_t>(0, learner - static_cast<int64_t>(rng() % 7));
      const std::string id = "s" + std::to_string(step) + "-" + std::to_string(i);
      Result<InsertOutcome> r = replay->Insert({id, version, "payload-" + id, 0});
      ASSERT_TRUE(r.ok()) << r.status();
      if (*r == InsertOutcome::kStored) model.emplace(std::make_pair(version, order++), id);
      else ASSERT_EQ(*r, InsertOutcome::kBelowRetentionFloor);  // counted as dropped below
      if (*r == InsertOutcome::kBelowRetentionFloor) ++total_dropped;
    }
    const int64_t k = static_cast<int64_t>(rng() % 4);
    const size_t batch_size = 1 + rng() % 8;
    uint64_t expected_dropped = 0;
    for (auto it = model.begin(); it != model.end();) {
      if (learner - it->first.first > k) {
        ++expected_dropped;
        it = model.erase(it);
      } else {
        ++it;
      }
    }
    Result<SampledBatch> batch = replay->SampleBatch(batch_size, learner, k, "learner");
    ASSERT_TRUE(batch.ok()) << batch.status();
    EXPECT_EQ(batch->dropped_stale, expected_dropped) << "step " << step;
    total_dropped += batch->dropped_stale;
    std::vector<std::string> expected_ids;
    for (auto it = model.begin(); it != model.end() && expected_ids.size() < batch_size; ++it) {
      expected_ids.push_back(it->second);
    }
    EXPECT_EQ(IdsOf(batch->groups), expected_ids) << "step " << step;
    EXPECT_EQ(batch->ready, !expected_ids.empty());
    for (const GroupRecord& g : batch->groups) {
      EXPECT_LE(learner - g.policy_version, k) << g.group_id;
      EXPECT_EQ(g.payload, "payload-" + g.group_id);
    }
    for (size_t i = 0; i < batch->groups.size(); ++i) model.erase(model.begin());
    ASSERT_TRUE(replay->MarkConsumed(IdsOf(batch->groups), learner + 1, "learner").ok());
    learner += static_cast<int64_t>(rng() % 3);
  }
  ReplayCounters c = replay->Counters();
  EXPECT_EQ(c.dropped_stale, total_dropped);
  EXPECT_EQ(c.queue_depth, model.size());
  EXPECT_GT(total_dropped, 0u);  // the random schedule did exercise dropping
}

TEST(ReplayServiceTest, StoppedConsumerMakesWritersWaitAndTheyResume) {
  ScratchDir dir;
  ReplayOptions o = BaseOptions(dir);
  o.max_unconsumed = 20;
  auto replay = OpenOrDie(o);
  ASSERT_NE(replay, nullptr);
  std::atomic<int> stored{0};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> max_depth{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 3; ++t) {
    writers.emplace_back([&, t] {
      for (int i = 0; !stop; ++i) {
        Result<InsertOutcome> r = replay->InsertWait({"w" + std::to_string(t) + "-" + std::to_string(i), 1,
                                                      std::string(1000, 'p'), 0}, 50ms);
        if (r.ok() && *r == InsertOutcome::kStored) ++stored;
        else if (r.ok() || r.status().code() != StatusCode::kResourceExhausted) ADD_FAILURE() << r.status();
        else --i;  // refused: retry the same group, as a sender would
        const uint64_t depth = replay->Counters().queue_depth;
        uint64_t seen = max_depth.load();
        while (depth > seen && !max_depth.compare_exchange_weak(seen, depth)) {
        }
      }
    });
  }
  // With no consumer, the writers fill the queue and then wait.
  for (int i = 0; i < 1000 && stored < 20; ++i) std::this_thread::sleep_for(10ms);
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(stored.load(), 20);
  EXPECT_EQ(replay->Counters().queue_depth, 20u);
  Result<InsertOutcome> refused = replay->Insert({"extra", 1, "x", 0});
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("queue full"), std::string::npos);
  EXPECT_GT(replay->Counters().refused_full, 0u);

  // The consumer takes 15: the writers resume and fill the queue again.
  Result<SampledBatch> batch = replay->SampleBatch(15, 1, 0, "learner");
  ASSERT_TRUE(batch.ok());
  ASSERT_EQ(batch->groups.size(), 15u);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(stored.load(), 20);  // served but leased groups still count against the bound
  ASSERT_TRUE(replay->MarkConsumed(IdsOf(batch->groups), 2, "learner").ok());
  for (int i = 0; i < 1000 && stored < 35; ++i) std::this_thread::sleep_for(10ms);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(stored.load(), 35);
  stop = true;
  for (auto& w : writers) w.join();
  EXPECT_LE(max_depth.load(), 20u);
  EXPECT_EQ(replay->Counters().queue_depth, 20u);
}

TEST(ReplayServiceTest, CloseWakesWaitingWriters) {
  ScratchDir dir;
  ReplayOptions o = BaseOptions(dir);
  o.max_unconsumed = 1;
  auto replay = OpenOrDie(o);
  ASSERT_NE(replay, nullptr);
  ASSERT_TRUE(replay->Insert({"a", 0, "x", 0}).ok());
  std::thread waiter([&] {
    Result<InsertOutcome> r = replay->InsertWait({"b", 0, "x", 0}, 30s);
    EXPECT_EQ(r.status().code(), StatusCode::kAborted) << r.status();
  });
  std::this_thread::sleep_for(50ms);
  replay->Close();
  waiter.join();
  EXPECT_EQ(replay->SampleBatch(1, 0, 0, "l").status().code(), StatusCode::kAborted);
}

TEST(ReplayServiceTest, MinSizeAndSamplesPerInsertLimitServing) {
  ScratchDir dir;
  ReplayOptions o = BaseOptions(dir);
  o.min_size_to_serve = 3;
  o.samples_per_insert = 1.0;
  o.samples_per_insert_error_buffer = 1.0;
  o.lease_timeout = 300ms;  // long enough that a loaded machine does not expire it early
  auto replay = OpenOrDie(o);
  ASSERT_NE(replay, nullptr);
  ASSERT_TRUE(replay->Insert({"a", 0, "x", 0}).ok());
  ASSERT_TRUE(replay->Insert({"b", 0, "x", 0}).ok());
  SampledBatch b = replay->SampleBatch(8, 0, 5, "l").value();
  EXPECT_FALSE(b.ready);
  EXPECT_TRUE(b.groups.empty());
  EXPECT_NE(b.wait_reason.find("min_size_to_serve"), std::string::npos) << b.wait_reason;
  ASSERT_TRUE(replay->Insert({"c", 0, "x", 0}).ok());
  b = replay->SampleBatch(8, 0, 5, "l").value();
  EXPECT_TRUE(b.ready);
  EXPECT_EQ(IdsOf(b.groups), (std::vector<std::string>{"a", "b", "c"}));
  // Leases still held: nothing else to serve.
  b = replay->SampleBatch(8, 0, 5, "l").value();
  EXPECT_FALSE(b.ready);
  // Leases expire; the ratio allows floor(1 * 3 + 1) - 3 = 1 more sample.
  std::this_thread::sleep_for(400ms);
  b = replay->SampleBatch(8, 0, 5, "l").value();
  EXPECT_EQ(IdsOf(b.groups), (std::vector<std::string>{"a"}));
  std::this_thread::sleep_for(400ms);
  b = replay->SampleBatch(8, 0, 5, "l").value();
  EXPECT_FALSE(b.ready);
  EXPECT_NE(b.wait_reason.find("samples_per_insert"), std::string::npos) << b.wait_reason;
  EXPECT_EQ(replay->Counters().served, 4u);
}

TEST(ReplayServiceTest, LeasedGroupsAreNotServedTwiceButComeBackAfterRestart) {
  ScratchDir dir;
  ReplayOptions o = BaseOptions(dir);
  {
    auto replay = OpenOrDie(o);
    ASSERT_NE(replay, nullptr);
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(replay->Insert({"g" + std::to_string(i), 3, "x", 0}).ok());
    SampledBatch first = replay->SampleBatch(4, 3, 1, "l").value();
    SampledBatch second = replay->SampleBatch(4, 3, 1, "l").value();
    EXPECT_EQ(IdsOf(first.groups), (std::vector<std::string>{"g0", "g1", "g2", "g3"}));
    EXPECT_EQ(IdsOf(second.groups), (std::vector<std::string>{"g4", "g5"}));
    EXPECT_FALSE(replay->SampleBatch(4, 3, 1, "l").value().ready);
    EXPECT_EQ(replay->Counters().leased, 6u);
    // Only the first batch is marked before the "crash".
    ASSERT_EQ(replay->MarkConsumed(IdsOf(first.groups), 4, "l").value(), 4u);
  }
  auto replay = OpenOrDie(o);
  ASSERT_NE(replay, nullptr);
  EXPECT_EQ(replay->Cursor("l").value().learner_version, 4);
  EXPECT_EQ(replay->Cursor("l").value().consumed, 4u);
  SampledBatch again = replay->SampleBatch(10, 4, 1, "l").value();
  EXPECT_EQ(IdsOf(again.groups), (std::vector<std::string>{"g4", "g5"}));
  ReplayCounters c = replay->Counters();
  EXPECT_EQ(c.consumed, 4u);
  EXPECT_EQ(c.queue_depth, 2u);
  // Re-sent groups, consumed or not, are duplicates.
  EXPECT_EQ(replay->Insert({"g0", 3, "x", 0}).value(), InsertOutcome::kDuplicate);
  EXPECT_EQ(replay->Insert({"g5", 3, "x", 0}).value(), InsertOutcome::kDuplicate);
}

// A learner killed between taking a batch and marking it comes back with
// the same consumer id and reads its cursor: the batch it held must be served
// again, not stay leased to the dead process forever (lease_timeout 0).
TEST(ReplayServiceTest, RestartedConsumerGetsItsUnmarkedBatchAgain) {
  ScratchDir dir;
  auto replay = OpenOrDie(BaseOptions(dir));
  ASSERT_NE(replay, nullptr);
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(replay->Insert({"g" + std::to_string(i), 3, "x", 0}).ok());
  SampledBatch held = replay->SampleBatch(4, 3, 1, "learner-0").value();
  ASSERT_EQ(IdsOf(held.groups), (std::vector<std::string>{"g0", "g1", "g2", "g3"}));
  SampledBatch other = replay->SampleBatch(1, 3, 1, "learner-1").value();
  ASSERT_EQ(IdsOf(other.groups), (std::vector<std::string>{"g4"}));
  // "Crash": nothing marked. Only learner-0's leases end.
  EXPECT_EQ(replay->ReleaseLeases("learner-0"), 4u);
  EXPECT_EQ(replay->ReleaseLeases("learner-0"), 0u);
  EXPECT_EQ(replay->Counters().leased, 1u);
  SampledBatch again = replay->SampleBatch(8, 3, 1, "learner-0").value();
  EXPECT_EQ(IdsOf(again.groups), (std::vector<std::string>{"g0", "g1", "g2", "g3", "g5"}));
  // Released leases are stale-droppable again too: nothing is stranded.
  ASSERT_EQ(replay->ReleaseLeases("learner-0"), 5u);
  SampledBatch later = replay->SampleBatch(8, 10, 1, "learner-0").value();
  EXPECT_EQ(later.dropped_stale, 5u);  // g4 is still leased to learner-1
  EXPECT_EQ(replay->Counters().queue_depth, 1u);
}

TEST(ReplayServiceTest, ConsumedVersionsAreRetired) {
  ScratchDir dir;
  ReplayOptions o = BaseOptions(dir);
  o.retire_min_groups = 8;  // the 8 groups of versions 0 and 1
  auto replay = OpenOrDie(o);
  ASSERT_NE(replay, nullptr);
  for (int v = 0; v < 5; ++v) {
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(replay->Insert({std::to_string(v) + "-" + std::to_string(i), v, "x", 0}).ok());
  }
  // Learner at 4 with bound 2: versions 0 and 1 are dropped, 2.. served.
  SampledBatch b = replay->SampleBatch(4, 4, 2, "l").value();
  EXPECT_EQ(b.dropped_stale, 8u);
  ASSERT_EQ(b.groups.size(), 4u);
  EXPECT_EQ(b.groups[0].policy_version, 2);
  ASSERT_TRUE(replay->MarkConsumed(IdsOf(b.groups), 5, "l").ok());
  // Everything below version 2 (threshold) and below the oldest unsettled (3) may go: floor 2.
  EXPECT_EQ(replay->Counters().retention_floor, 2);
  EXPECT_FALSE(replay->store().Find("0-0").value().has_value());
  EXPECT_TRUE(replay->store().Find("2-0").value().has_value());  // consumed, but not below the floor
  EXPECT_EQ(replay->Insert({"late", 1, "x", 0}).value(), InsertOutcome::kBelowRetentionFloor);
  EXPECT_EQ(replay->Counters().dropped_stale, 9u);
}

TEST(ReplayServiceTest, RejectsBadArguments) {
  ScratchDir dir;
  ReplayOptions o = BaseOptions(dir);
  o.min_size_to_serve = 10;
  o.max_unconsumed = 5;
  EXPECT_EQ(ReplayService::Open(o).status().code(), StatusCode::kInvalidArgument);
  auto replay = OpenOrDie(BaseOptions(dir));
  ASSERT_NE(replay, nullptr);
  EXPECT_EQ(replay->SampleBatch(4, 1, -1, "l").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(replay->SampleBatch(0, 1, 1, "l").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(replay->SampleBatch(4, 1, 1, "").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(replay->Insert({"", 1, "x", 0}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(replay->MarkConsumed({"unknown"}, 1, "l").status().code(), StatusCode::kNotFound);
  // Extreme versions do not overflow the staleness arithmetic.
  ASSERT_TRUE(replay->Insert({"min", INT64_MIN, "x", 0}).ok());
  SampledBatch b = replay->SampleBatch(4, INT64_MAX, INT64_MAX, "l").value();
  EXPECT_EQ(b.dropped_stale, 1u);
}

TEST(ReplayConfigTest, ReadsOptionsAndRejectsTypos) {
  Config c = Config::Parse(R"(
    [replay]
    path = "/tmp/x"
    sync_mode = "per_write"
    max_unconsumed = 100
    min_size_to_serve = 8
    samples_per_insert = 1.5
    samples_per_insert_error_buffer = 16
    lease_timeout_ms = 2500
  )").value();
  Result<ReplayOptions> o = ReplayOptionsFromConfig(c.Section("replay"));
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->store.path, "/tmp/x");
  EXPECT_EQ(o->store.sync_mode, SyncMode::kPerWrite);
  EXPECT_EQ(o->max_unconsumed, 100u);
  EXPECT_EQ(o->min_size_to_serve, 8u);
  EXPECT_DOUBLE_EQ(o->samples_per_insert, 1.5);
  EXPECT_EQ(o->lease_timeout, std::chrono::milliseconds(2500));
  EXPECT_TRUE(o->retire_on_consume);

  Config typo = Config::Parse("[replay]\npath = \"/x\"\nmax_unconsumd = 3\n").value();
  Result<ReplayOptions> bad = ReplayOptionsFromConfig(typo.Section("replay"));
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("max_unconsumd"), std::string::npos) << bad.status();
  Config mode = Config::Parse("[replay]\npath = \"/x\"\nsync_mode = \"sometimes\"\n").value();
  EXPECT_EQ(ReplayOptionsFromConfig(mode.Section("replay")).status().code(), StatusCode::kInvalidArgument);
  Config neg = Config::Parse("[replay]\npath = \"/x\"\nmax_unconsumed = -1\n").value();
  EXPECT_EQ(ReplayOptionsFromConfig(neg.Section("replay")).status().code(), StatusCode::kInvalidArgument);
  Config missing = Config::Parse("[replay]\n").value();
  EXPECT_FALSE(ReplayOptionsFromConfig(missing.Section("replay")).ok());
}

}  // namespace
}  // namespace grove::replay
