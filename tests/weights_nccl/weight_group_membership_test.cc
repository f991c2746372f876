// The coordinator's plan of the weight-broadcast group: epochs, joins,
// deaths, failures and the rules that keep a dead worker out of the next
// epoch. Pure logic with a driven clock, plus one round trip over the
// coordinator's real socket.
#include "cluster/weight_group_membership.h"

#include <atomic>
#include <random>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "actors/actor_client.h"
#include "actors/weight_group_client.h"
#include "cluster/coordinator.h"

namespace grove {
namespace {

constexpr int64_t kTtl = 1000;
const std::function<bool(const std::string&)> kAllAlive = [](const std::string&) { return true; };

TEST(WeightGroupMembership, FirstEpochWaitsForAWorker) {
  WeightGroupMembership g(kTtl);
  WeightGroupView v = g.PollLearner("learner", 0);
  EXPECT_EQ(v.epoch, 0u);
  EXPECT_FALSE(v.reform_needed) << "nobody to send to: no group";
  g.PollWorker("rollout-1", 10);
  v = g.PollLearner("learner", 20);
  EXPECT_TRUE(v.reform_needed);
  ASSERT_TRUE(g.Propose("learner", 1, "id-1", 30, kAllAlive).ok());
  v = g.PollLearner("learner", 40);
  EXPECT_EQ(v.epoch, 1u);
  EXPECT_EQ(v.rank, 0);
  EXPECT_EQ(v.size, 2);
  EXPECT_EQ(v.unique_id, "id-1");
  EXPECT_FALSE(v.reform_needed);
  WeightGroupView w = g.PollWorker("rollout-1", 50);
  EXPECT_EQ(w.epoch, 1u);
  EXPECT_EQ(w.rank, 1);
  EXPECT_EQ(w.size, 2);
  EXPECT_EQ(w.members, (std::vector<std::string>{"learner", "rollout-1"}));
}

TEST(WeightGroupMembership, ProposeChecksItsEpochAndId) {
  WeightGroupMembership g(kTtl);
  g.PollWorker("w", 0);
  EXPECT_FALSE(g.Propose("learner", 2, "id", 1, kAllAlive).ok()) << "must be current + 1";
  EXPECT_FALSE(g.Propose("learner", 1, "", 1, kAllAlive).ok()) << "empty unique id";
  EXPECT_FALSE(g.Propose("", 1, "id", 1, kAllAlive).ok());
  ASSERT_TRUE(g.Propose("learner", 1, "id", 1, kAllAlive).ok());
  EXPECT_FALSE(g.Propose("learner", 1, "id", 2, kAllAlive).ok()) << "epoch 1 exists";
  EXPECT_FALSE(g.Propose("other-learner", 2, "id2", 2, kAllAlive).ok())
      << "a second live learner must not take over a healthy group";
  EXPECT_FALSE(g.Fail("other-learner", 1, 3).ok());
}

TEST(WeightGroupMembership, LateWorkerEntersAtTheNextEpoch) {
  WeightGroupMembership g(kTtl);
  g.PollWorker("rollout-a", 0);
  ASSERT_TRUE(g.Propose("learner", 1, "e1", 1, kAllAlive).ok());
  WeightGroupView late = g.PollWorker("rollout-b", 100);
  EXPECT_EQ(late.epoch, 1u);
  EXPECT_EQ(late.rank, -1) << "not a member until the next epoch";
  g.PollWorker("rollout-a", 100);
  EXPECT_TRUE(g.PollLearner("learner", 110).reform_needed);
  ASSERT_TRUE(g.Propose("learner", 2, "e2", 120, kAllAlive).ok());
  EXPECT_EQ(g.members(), (std::vector<std::string>{"learner", "rollout-a", "rollout-b"}));
  EXPECT_EQ(g.PollWorker("rollout-b", 130).rank, 2);
  EXPECT_EQ(g.PollWorker("rollout-a", 130).rank, 1);
  EXPECT_FALSE(g.PollLearner("learner", 140).reform_needed);
}

TEST(WeightGroupMembership, FailedEpochAdmitsOnlyWorkersThatPolledAfterIt) {
  WeightGroupMembership g(kTtl);
  g.PollWorker("alive", 0);
  g.PollWorker("killed", 0);
  ASSERT_TRUE(g.Propose("learner", 1, "e1", 1, kAllAlive).ok());
  // "killed" dies mid-broadcast; the learner's deadline fires, it reports.
  ASSERT_TRUE(g.Fail("learner", 1, 200).ok());
  WeightGroupView v = g.PollLearner("learner", 201);
  EXPECT_TRUE(v.failed);
  EXPECT_TRUE(v.reform_needed);
  // The survivor sees the failure on its next poll (and aborts its comm).
  WeightGroupView s = g.PollWorker("alive", 250);
  EXPECT_TRUE(s.failed);
  EXPECT_EQ(s.epoch, 1u);
  // Although the registry still thinks "killed" is alive, it never polled
  // again, so it is left out.
  ASSERT_TRUE(g.Propose("learner", 2, "e2", 300, kAllAlive).ok());
  EXPECT_EQ(g.members(), (std::vector<std::string>{"learner", "alive"}));
  EXPECT_FALSE(g.PollLearner("learner", 310).failed);
  EXPECT_FALSE(g.PollLearner("learner", 310).reform_needed);
  // A failure report for the old epoch changes nothing.
  ASSERT_TRUE(g.Fail("learner", 1, 320).ok());
  EXPECT_FALSE(g.PollLearner("learner", 330).failed);
}

TEST(WeightGroupMembership, DeadOrSilentWorkersLeaveAtTheNextEpoch) {
  WeightGroupMembership g(kTtl);
  g.PollWorker("a", 0);
  g.PollWorker("b", 0);
  g.PollWorker("c", 0);
  ASSERT_TRUE(g.Propose("learner", 1, "e1", 1, kAllAlive).ok());
  EXPECT_EQ(g.members().size(), 4u);
  g.Forget("b");  // the registry declared it dead
  EXPECT_TRUE(g.PollLearner("learner", 10).reform_needed);
  // "c" stops polling: after the ttl it is no candidate either.
  g.PollWorker("a", kTtl + 5);
  auto registry_alive = [](const std::string& id) { return id != "a-dead"; };
  ASSERT_TRUE(g.Propose("learner", 2, "e2", kTtl + 10, registry_alive).ok());
  EXPECT_EQ(g.members(), (std::vector<std::string>{"learner", "a"}));
  // The last worker dies: the learner forms an epoch of itself alone.
  g.Forget("a");
  EXPECT_TRUE(g.PollLearner("learner", kTtl + 20).reform_needed);
  ASSERT_TRUE(g.Propose("learner", 3, "e3", kTtl + 30, kAllAlive).ok());
  EXPECT_EQ(g.members(), (std::vector<std::string>{"learner"}));
  EXPECT_FALSE(g.PollLearner("learner", kTtl + 40).reform_needed);
}

TEST(WeightGroupMembership, RegistryDeathKeepsAWorkerOut) {
  WeightGroupMembership g(kTtl);
  g.PollWorker("a", 0);
  g.PollWorker("b", 0);
  ASSERT_TRUE(g.Propose("learner", 1, "e1", 1, [](const std::string& id) { return id != "b"; }).ok());
  EXPECT_EQ(g.members(), (std::vector<std::string>{"learner", "a"}));
}

TEST(WeightGroupMembership, RestartedLearnerReformsTheGroup) {
  WeightGroupMembership g(kTtl);
  g.PollWorker("a", 0);
  ASSERT_TRUE(g.Propose("learner", 1, "e1", 1, kAllAlive).ok());
  g.Forget("learner");
  g.PollWorker("a", 10);
  EXPECT_TRUE(g.PollWorker("a", 11).failed) << "a learner that is gone fails its epoch";
  WeightGroupView v = g.PollLearner("learner-2", 12);
  EXPECT_TRUE(v.reform_needed);
  EXPECT_EQ(v.rank, -1);
  ASSERT_TRUE(g.Propose("learner-2", 2, "e2", 20, kAllAlive).ok());
  EXPECT_EQ(g.members(), (std::vector<std::string>{"learner-2", "a"}));
}

// Randomized: whatever order of joins, deaths and failures, a new epoch
// holds exactly the learner plus the live workers that polled recently
// (and after the last failure), each once, in a stable order.
TEST(WeightGroupMembership, RandomHistoriesFormConsistentEpochs) {
  std::mt19937_64 rng(std::random_device{}());
  for (int trial = 0; trial < 50; ++trial) {
    WeightGroupMembership g(kTtl);
    std::map<std::string, int64_t> polled;
    std::set<std::string> dead;
    int64_t now = 0, failed_at = -1;
    uint64_t epoch = 0;
    for (int step = 0; step < 200; ++step) {
      now += static_cast<int64_t>(rng() % 100);
      const std::string w = "w" + std::to_string(rng() % 6);
      switch (rng() % 5) {
        case 0: case 1:
          if (!dead.count(w)) {
            g.PollWorker(w, now);
            polled[w] = now;
          }
          break;
        case 2:
          dead.insert(w);
          if (rng() % 2) g.Forget(w);
          break;
        case 3:
          if (epoch > 0 && g.Fail("L", epoch, now).ok() && failed_at < 0) failed_at = now;
          break;
        case 4: {
          auto alive = [&](const std::string& id) { return !dead.count(id); };
          ++epoch;
          ASSERT_TRUE(g.Propose("L", epoch, "id" + std::to_string(epoch), now, alive).ok());
          std::vector<std::string> expect{"L"};
          for (const auto& [id, t] : polled) {
            if (!dead.count(id) && now - t <= kTtl && t > failed_at) expect.push_back(id);
          }
          ASSERT_EQ(g.members(), expect) << "trial " << trial << " step " << step;
          if (failed_at >= 0) {
            // Silent since the failure: dropped until it polls again.
            for (auto it = polled.begin(); it != polled.end();) {
              it = it->second <= failed_at ? polled.erase(it) : std::next(it);
            }
          }
          failed_at = -1;
          EXPECT_FALSE(g.PollLearner("L", now, alive).reform_needed);
          break;
        }
      }
    }
  }
}

// Over the coordinator's socket: a worker registers and polls, the learner
// proposes, both see the same epoch; a rollout worker may not propose.
TEST(WeightGroupCoordinator, ProposeAndPollOverTheWire) {
  CoordinatorOptions o;
  o.timing = HealthTiming{50, 2, 6};
  o.first_prompt_id = 1;
  Coordinator coordinator(o, nullptr);
  auto ep = coordinator.Bind();
  ASSERT_TRUE(ep.ok()) << ep.status();
  std::atomic<bool> stop{false};
  std::thread serve([&] { coordinator.Serve([&] { return stop.load(); }); });
  auto client = [&](const std::string& id, wire::Role role) {
    actors::ActorClientOptions co;
    co.id = id;
    co.role = role;
    co.coordinator = *ep;
    auto c = std::make_unique<actors::ActorClient>(co);
    EXPECT_TRUE(c->Start().ok());
    return c;
  };
  auto learner = client("learner", wire::Role::LEARNER);
  auto worker = client("rollout-0", wire::Role::ROLLOUT);
  actors::RpcClient lrpc("learner"), wrpc("rollout-0"), stranger("nobody");
  ASSERT_TRUE(lrpc.Connect(*ep).ok());
  ASSERT_TRUE(wrpc.Connect(*ep).ok());
  ASSERT_TRUE(stranger.Connect(*ep).ok());
  using A = wire::WeightGroupAction;
  auto w0 = actors::CallWeightGroup(wrpc, A::POLL, 0, "", 2000);
  ASSERT_TRUE(w0.ok()) << w0.status();
  EXPECT_EQ(w0->epoch, 0u);
  auto l0 = actors::CallWeightGroup(lrpc, A::POLL, 0, "", 2000);
  ASSERT_TRUE(l0.ok()) << l0.status();
  EXPECT_TRUE(l0->reform_needed);
  std::string id(128, '\0');
  for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<char>(i * 7);
  auto l1 = actors::CallWeightGroup(lrpc, A::PROPOSE, 1, id, 2000);
  ASSERT_TRUE(l1.ok()) << l1.status();
  EXPECT_EQ(l1->epoch, 1u);
  EXPECT_EQ(l1->rank, 0);
  EXPECT_EQ(l1->size, 2);
  auto w1 = actors::CallWeightGroup(wrpc, A::POLL, 0, "", 2000);
  ASSERT_TRUE(w1.ok()) << w1.status();
  EXPECT_EQ(w1->rank, 1);
  EXPECT_EQ(w1->unique_id, id) << "the id bytes arrive intact, zeros included";
  EXPECT_FALSE(actors::CallWeightGroup(wrpc, A::PROPOSE, 2, id, 2000).ok());
  EXPECT_FALSE(actors::CallWeightGroup(stranger, A::POLL, 0, "", 2000).ok());
  auto lf = actors::CallWeightGroup(lrpc, A::FAILED, 1, "", 2000);
  ASSERT_TRUE(lf.ok()) << lf.status();
  EXPECT_TRUE(lf->failed);
  stop = true;
  serve.join();
}

}  // namespace
}  // namespace grove
