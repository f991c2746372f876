// The coordinator in-process, driven over real sockets by ActorClients: the
// pull-based work API, leases re-queued on death, the staleness gate fed by
// the learner's heartbeats, lookup and command routing.
#include "cluster/coordinator.h"

#include <atomic>
#include <thread>

#include <gtest/gtest.h>

#include "actors/actor_client.h"
#include "actors/rpc_client.h"
#include "actors/weight_group_client.h"
#include "cluster/status_view.h"
#include "tests/support/proc_util.h"

namespace grove {
namespace {

using actors::ActorClient;
using actors::ActorClientOptions;

class CountingSource : public PromptSource {
 public:
  std::optional<Prompt> Next() override {
    Prompt p;
    p.task = "count";
    p.text = "p" + std::to_string(next_++);
    return p;
  }

 private:
  int next_ = 0;
};

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CoordinatorOptions o;
    o.timing = HealthTiming{50, 2, 6};
    o.work = WorkQueueLimits{4, 0};  // synchronous: 4 prompts per learner step
    o.first_prompt_id = 1;
    coordinator_ = std::make_unique<Coordinator>(o, std::make_unique<CountingSource>());
    auto ep = coordinator_->Bind();
    ASSERT_TRUE(ep.ok()) << ep.status();
    endpoint_ = *ep;
    thread_ = std::thread([this] { coordinator_->Serve([this] { return stop_.load(); }); });
  }
  void TearDown() override {
    stop_ = true;
    thread_.join();
  }
  std::unique_ptr<ActorClient> Client(const std::string& id, wire::Role role) {
    ActorClientOptions o;
    o.id = id;
    o.role = role;
    o.coordinator = endpoint_;
    o.data_endpoint = "tcp://" + id + ":1";
    auto c = std::make_unique<ActorClient>(o);
    EXPECT_TRUE(c->Start().ok());
    return c;
  }

  std::unique_ptr<Coordinator> coordinator_;
  std::string endpoint_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

std::vector<uint64_t> Ids(const actors::WorkBatch& b) {
  std::vector<uint64_t> ids;
  for (const auto& p : b.prompts) ids.push_back(p.id);
  return ids;
}

TEST_F(CoordinatorTest, WorkLeasesStalenessGateLookupAndCommands) {
  auto r0 = Client("r0", wire::Role::ROLLOUT);
  auto r1 = Client("r1", wire::Role::ROLLOUT);
  auto learner = Client("learner-0", wire::Role::LEARNER);

  auto a = r0->RequestWork(3, 0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(Ids(*a), (std::vector<uint64_t>{1, 2, 3}));
  EXPECT_EQ(a->prompts[0].text, "p0");
  EXPECT_EQ(a->prompts[0].task, "count");
  auto b = r1->RequestWork(3, 0);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(Ids(*b), (std::vector<uint64_t>{4}));  // step 0 allows 4 prompts in all
  auto gated = r0->RequestWork(3, 0);
  ASSERT_TRUE(gated.ok());
  EXPECT_TRUE(gated->prompts.empty());
  EXPECT_EQ(gated->retry_after_ms, 50u);
  // Status shows each worker's leases as the coordinator holds them.
  auto status = FetchStatus(endpoint_, 2000);
  ASSERT_TRUE(status.ok()) << status.status();
  std::map<std::string, double> leased;
  for (const auto& actor : (*status)["actors"])
    if (actor["role"] == "rollout") leased[actor["id"]] = actor["counters"].value("prompts_leased", -1.0);
  EXPECT_EQ(leased, (std::map<std::string, double>{{"r0", 3}, {"r1", 1}}));

  // The learner publishes version 1 in its heartbeats; the gate opens and
  // the version reaches the workers through their heartbeat acks.
  learner->SetPolicyVersion(1);
  ASSERT_TRUE(testing::WaitFor([&] { return r0->coordinator_policy_version() == 1; }, 3000));
  auto c = r0->RequestWork(10, 1);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(Ids(*c), (std::vector<uint64_t>{5, 6, 7, 8}));
  EXPECT_EQ(c->policy_version, 1);
  ASSERT_TRUE(r0->PromptDone({1, 2, 3}).ok());

  // r1 dies silently (no exit report): after the liveness window its leased
  // prompt goes out first, under the same id.
  r1.reset();
  std::vector<uint64_t> got;
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        auto d = r0->RequestWork(1, 1);
        if (d.ok() && !d->prompts.empty()) got = Ids(*d);
        return !got.empty();
      },
      3000));
  EXPECT_EQ(got, (std::vector<uint64_t>{4}));

  // Lookup: healthy actors of a role with their data endpoints.
  auto rollouts = r0->Lookup(wire::Role::ROLLOUT);
  ASSERT_TRUE(rollouts.ok());
  ASSERT_EQ(rollouts->size(), 1u);  // r1 is dead
  EXPECT_EQ((*rollouts)[0].id, "r0");
  EXPECT_EQ((*rollouts)[0].address, "tcp://r0:1");

  // A drain command for every rollout reaches r0 on a heartbeat ack.
  actors::RpcClient admin("admin");
  ASSERT_TRUE(admin.Connect(endpoint_).ok());
  capnp::MallocMessageBuilder msg;
  auto cmd = actors::InitEnvelope(msg, "admin", 0).getBody().initCommand();
  cmd.setKind(wire::CommandKind::DRAIN);
  cmd.setTarget("rollout");
  auto reply = admin.Call(msg, {actors::BodyKind::COMMAND_REPLY}, 1000);
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ(reply->envelope().getBody().getCommandReply().getMatched(), 1u);
  ASSERT_TRUE(testing::WaitFor([&] { return r0->command() == wire::CommandKind::DRAIN; }, 3000));
  EXPECT_EQ(learner->command(), wire::CommandKind::NONE);

  // A clean exit releases r0's leases back to the queue for others.
  r0->Shutdown(wire::ActorState::STOPPED, "exit 0", true);
  auto r2 = Client("r2", wire::Role::ROLLOUT);
  auto e = r2->RequestWork(10, 1);
  ASSERT_TRUE(e.ok());
  // r0 held 4 (taken over from r1) and 5..8; 1..3 were done.
  EXPECT_EQ(Ids(*e), (std::vector<uint64_t>{4, 5, 6, 7, 8}));

  // Work requests from an actor the coordinator does not know are refused
  // with an error reply (not silence).
  actors::RpcClient stranger("stranger");
  ASSERT_TRUE(stranger.Connect(endpoint_).ok());
  capnp::MallocMessageBuilder work;
  actors::InitEnvelope(work, "stranger", 0).getBody().initWorkRequest().setMaxPrompts(1);
  auto refused = stranger.Call(work, {actors::BodyKind::PROMPT_BATCH}, 1000);
  EXPECT_EQ(refused.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("register first"), std::string::npos);
}

// A coordinator restarted mid-run meets a learner at version 10 with 6
// groups wasted. Its gate must not open for all eleven steps since the start
// (4 * (10 + 1) + 6 = 50 prompts, which would only go stale): it assumes its
// predecessor handed out all but one step's worth.
TEST_F(CoordinatorTest, RestartedCoordinatorDoesNotReopenTheGateForPastSteps) {
  auto r0 = Client("r0", wire::Role::ROLLOUT);
  ActorClientOptions o;
  o.id = "learner-0";
  o.role = wire::Role::LEARNER;
  o.coordinator = endpoint_;
  o.data_endpoint = "tcp://learner-0:1";
  ActorClient learner(o);
  learner.SetPolicyVersion(10);
  learner.SetCounter("groups_wasted", 6);
  ASSERT_TRUE(learner.Start().ok());
  ASSERT_TRUE(testing::WaitFor([&] { return r0->coordinator_policy_version() == 10; }, 3000));
  // A heartbeat of the learner's (the one with groups_wasted) has arrived once
  // the version reached r0 through its own heartbeat ack; wait for another
  // learner beat to be sure.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto a = r0->RequestWork(100, 10);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->prompts.size(), 4u);  // one step (max_staleness 0 here)
  auto gated = r0->RequestWork(100, 10);
  ASSERT_TRUE(gated.ok());
  EXPECT_TRUE(gated->prompts.empty());
  // The gate moves with the learner as before.
  learner.SetPolicyVersion(11);
  ASSERT_TRUE(testing::WaitFor([&] { return r0->coordinator_policy_version() == 11; }, 3000));
  auto b = r0->RequestWork(100, 11);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->prompts.size(), 4u);
  learner.Shutdown(wire::ActorState::STOPPED, "exit 0", true);
}

// A fresh run's learner registers at version 0: nothing is assumed, and the
// first step's prompts go out.
TEST_F(CoordinatorTest, FreshLearnerLeavesTheGateAsItIs) {
  auto r0 = Client("r0", wire::Role::ROLLOUT);
  auto learner = Client("learner-0", wire::Role::LEARNER);
  learner->SetCounter("groups_wasted", 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto a = r0->RequestWork(100, 0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->prompts.size(), 4u);
}

// A learner's new policy version reaches the coordinator at once, not at
// its next heartbeat (the beat is sent when the version changes), and the
// weight-group reply carries it to a polling worker: with a 3 s heartbeat
// interval the version is seen within a fraction of it, twice in a row.
TEST(CoordinatorVersionTest, NewVersionBeatsAtOnceAndTheWeightGroupReplyCarriesIt) {
  CoordinatorOptions o;
  o.timing = HealthTiming{3000, 2, 6};
  o.work = WorkQueueLimits{4, 0};
  Coordinator coordinator(o, std::make_unique<CountingSource>());
  auto ep = coordinator.Bind();
  ASSERT_TRUE(ep.ok()) << ep.status();
  std::atomic<bool> stop{false};
  std::thread serving([&] { coordinator.Serve([&] { return stop.load(); }); });
  struct Join {
    std::atomic<bool>& stop;
    std::thread& t;
    ~Join() {
      stop = true;
      t.join();
    }
  } join{stop, serving};
  auto client = [&](const std::string& id, wire::Role role) {
    ActorClientOptions co;
    co.id = id;
    co.role = role;
    co.coordinator = *ep;
    co.data_endpoint = "tcp://" + id + ":1";
    return std::make_unique<ActorClient>(co);
  };
  auto learner_client = client("learner-0", wire::Role::LEARNER);
  auto worker_client = client("rollout-0", wire::Role::ROLLOUT);
  ActorClient& learner = *learner_client;
  ASSERT_TRUE(learner.Start().ok());
  ASSERT_TRUE(worker_client->Start().ok());
  actors::RpcClient worker("rollout-0");
  ASSERT_TRUE(worker.Connect(*ep).ok());
  for (int64_t version : {1, 2}) {
    // Past the beat that Start() or the previous round sent.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const auto t0 = std::chrono::steady_clock::now();
    learner.SetPolicyVersion(version);
    int64_t seen = -1;
    ASSERT_TRUE(testing::WaitFor(
        [&] {
          auto v = actors::CallWeightGroup(worker, wire::WeightGroupAction::POLL, 0, "", 1000);
          if (v.ok()) seen = v->policy_version;
          return seen == version;
        },
        2500))
        << "version " << version << " not seen; last " << seen;
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_LT(ms, 1000) << "version " << version << " waited for the 3 s beat";
  }
  learner.Shutdown(wire::ActorState::STOPPED, "done", false);
  worker_client->Shutdown(wire::ActorState::STOPPED, "done", false);
}

}  // namespace
}  // namespace grove
