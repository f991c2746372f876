#include "cluster/work_queue.h"

#include <gtest/gtest.h>

namespace grove {
namespace {

// An in-test source: prompts "p0", "p1", ... up to `limit`.
class CountingSource : public PromptSource {
 public:
  explicit CountingSource(int limit) : limit_(limit) {}
  std::optional<Prompt> Next() override {
    if (next_ >= limit_) return std::nullopt;
    Prompt p;
    p.task = "count";
    p.text = "p" + std::to_string(next_++);
    return p;
  }
  int next_ = 0;

 private:
  int limit_;
};

std::vector<std::string> Texts(const WorkQueue::Grant& g) {
  std::vector<std::string> out;
  for (const auto& p : g.prompts) out.push_back(p.text);
  return out;
}

TEST(WorkQueue, LeasesAndRequeueFirstInLine) {
  CountingSource source(100);
  WorkQueue q(&source, WorkQueueLimits{0, 0});
  auto a = q.Take("a", 3, 0);
  EXPECT_EQ(Texts(a), (std::vector<std::string>{"p0", "p1", "p2"}));
  EXPECT_EQ(a.prompts[0].id, 1u);
  EXPECT_EQ(a.prompts[2].id, 3u);
  auto b = q.Take("b", 2, 0);
  EXPECT_EQ(Texts(b), (std::vector<std::string>{"p3", "p4"}));
  EXPECT_EQ(q.leased(), 5u);
  EXPECT_EQ(q.leased("a"), 3u);
  EXPECT_EQ(q.leased("b"), 2u);
  EXPECT_EQ(q.leased("nobody"), 0u);
  // a finishes one, then dies: its other two go out first, in order.
  EXPECT_EQ(q.Done("a", {a.prompts[1].id, 999}), 1u);
  EXPECT_EQ(q.Done("b", {a.prompts[0].id}), 0u);  // not b's lease
  EXPECT_EQ(q.leased("a"), 2u);
  EXPECT_EQ(q.Requeue("a"), 2u);
  EXPECT_EQ(q.leased("a"), 0u);
  EXPECT_EQ(q.requeued_depth(), 2u);
  auto c = q.Take("c", 3, 0);
  EXPECT_EQ(Texts(c), (std::vector<std::string>{"p0", "p2", "p5"}));
  EXPECT_EQ(c.prompts[0].id, 1u);  // same id: the same prompt, not a new one
  EXPECT_EQ(q.handed_out(), 6u);
  EXPECT_EQ(q.done(), 1u);
  EXPECT_EQ(q.Requeue("nobody"), 0u);
}

TEST(WorkQueue, StalenessGateBoundsPromptsPerLearnerVersion) {
  CountingSource source(1000);
  // 4 prompts per step, at most 1 step ahead: version v allows 4 * (v + 2).
  WorkQueue q(&source, WorkQueueLimits{4, 1});
  EXPECT_EQ(q.Allowance(0), 8);
  EXPECT_EQ(q.Take("a", 5, 0).prompts.size(), 5u);
  auto g = q.Take("a", 5, 0);
  EXPECT_EQ(g.prompts.size(), 3u);
  auto none = q.Take("b", 5, 0);
  EXPECT_TRUE(none.prompts.empty());
  EXPECT_EQ(none.why_empty, WorkQueue::Empty::kStalenessGate);
  EXPECT_EQ(source.next_, 8);  // the gate stops pulling from the source too
  // Re-queued prompts pass the gate: they were counted already.
  q.Requeue("a");
  EXPECT_EQ(q.Take("b", 20, 0).prompts.size(), 8u);
  // The learner advances: 4 more.
  EXPECT_EQ(q.Take("b", 20, 1).prompts.size(), 4u);
  EXPECT_TRUE(q.Take("b", 20, 1).prompts.empty());
  // The learner reports 3 groups it never trained on (dropped stale): their
  // prompts are replaced, and no more than that.
  EXPECT_EQ(q.Take("b", 20, 1, /*wasted=*/3).prompts.size(), 3u);
  EXPECT_EQ(q.Take("b", 20, 1, 3).why_empty, WorkQueue::Empty::kStalenessGate);
  // Synchronous (max_staleness 0): version v allows 4 * (v + 1).
  CountingSource s2(1000);
  WorkQueue sync(&s2, WorkQueueLimits{4, 0});
  EXPECT_EQ(sync.Take("a", 100, 0).prompts.size(), 4u);
  EXPECT_EQ(sync.Take("a", 100, 2).prompts.size(), 8u);
}

TEST(WorkQueue, IdsStartWhereTold) {
  CountingSource source(10);
  WorkQueue q(&source, WorkQueueLimits{}, uint64_t{1} << 60);
  auto g = q.Take("a", 2, 0);
  ASSERT_EQ(g.prompts.size(), 2u);
  EXPECT_EQ(g.prompts[0].id, uint64_t{1} << 60);
  EXPECT_EQ(g.prompts[1].id, (uint64_t{1} << 60) + 1);
}

TEST(WorkQueue, DrySourceAndNoSource) {
  CountingSource source(2);
  WorkQueue q(&source, WorkQueueLimits{});
  EXPECT_EQ(q.Take("a", 5, 0).prompts.size(), 2u);
  auto g = q.Take("a", 5, 0);
  EXPECT_TRUE(g.prompts.empty());
  EXPECT_EQ(g.why_empty, WorkQueue::Empty::kSourceDry);
  WorkQueue empty(nullptr, WorkQueueLimits{});
  EXPECT_EQ(empty.Take("a", 5, 0).why_empty, WorkQueue::Empty::kSourceDry);
}

}  // namespace
}  // namespace grove
