#include "cluster/registry.h"

#include <gtest/gtest.h>

namespace grove {
namespace {

ActorRecord Rec(const std::string& id, wire::Role role, uint64_t incarnation = 1) {
  ActorRecord r;
  r.id = id;
  r.role = role;
  r.incarnation = incarnation;
  return r;
}

TEST(Registry, StatesFollowHeartbeatsAndSilence) {
  Registry reg(HealthTiming{100, 2, 5});
  reg.Register(Rec("r0", wire::Role::ROLLOUT), 0);
  EXPECT_EQ(reg.Find("r0")->state, wire::ActorState::STARTING);
  ASSERT_NE(reg.Heartbeat("r0", wire::ActorState::HEALTHY, 3, {{"tok", 1.5}}, 99, "d", 50), nullptr);
  EXPECT_EQ(reg.Find("r0")->state, wire::ActorState::HEALTHY);
  EXPECT_EQ(reg.Find("r0")->policy_version, 3);
  EXPECT_EQ(reg.Find("r0")->counters.at("tok"), 1.5);
  EXPECT_TRUE(reg.Sweep(250).empty());  // 200 ms silent: exactly 2 intervals, not more
  EXPECT_EQ(reg.Find("r0")->state, wire::ActorState::HEALTHY);
  EXPECT_TRUE(reg.Sweep(251).empty());
  EXPECT_EQ(reg.Find("r0")->state, wire::ActorState::SUSPECT);
  // A heartbeat clears suspicion.
  reg.Heartbeat("r0", wire::ActorState::HEALTHY, 3, {}, 0, "", 300);
  EXPECT_EQ(reg.Find("r0")->state, wire::ActorState::HEALTHY);
  EXPECT_TRUE(reg.Sweep(800).empty());
  auto died = reg.Sweep(801);
  ASSERT_EQ(died.size(), 1u);
  EXPECT_EQ(died[0], "r0");
  EXPECT_EQ(reg.Find("r0")->state, wire::ActorState::DEAD);
  EXPECT_NE(reg.Find("r0")->exit_reason.find("no heartbeat"), std::string::npos);
  // The dead stay listed; their heartbeats are refused (must re-register).
  EXPECT_EQ(reg.Heartbeat("r0", wire::ActorState::HEALTHY, 3, {}, 0, "", 900), nullptr);
  EXPECT_EQ(reg.actors().size(), 1u);
  EXPECT_EQ(reg.Heartbeat("nobody", wire::ActorState::HEALTHY, 0, {}, 0, "", 900), nullptr);
}

TEST(Registry, ExitReportsAndCommands) {
  Registry reg(HealthTiming{100, 2, 5});
  reg.Register(Rec("r0", wire::Role::ROLLOUT), 0);
  reg.Register(Rec("r1", wire::Role::ROLLOUT), 0);
  reg.Register(Rec("v0", wire::Role::VERIFIER), 0);
  EXPECT_EQ(reg.Command(wire::CommandKind::DRAIN, "rollout"), 2u);
  EXPECT_EQ(reg.Find("r0")->command, wire::CommandKind::DRAIN);
  EXPECT_EQ(reg.Find("v0")->command, wire::CommandKind::NONE);
  EXPECT_EQ(reg.Command(wire::CommandKind::STOP, "v0"), 1u);
  EXPECT_EQ(reg.Command(wire::CommandKind::DRAIN, "*"), 3u);
  EXPECT_EQ(reg.Find("v0")->command, wire::CommandKind::STOP);  // never weakened

  reg.Exit("r0", "exit 0", true);
  EXPECT_EQ(reg.Find("r0")->state, wire::ActorState::STOPPED);
  reg.Exit("r0", "exit 0", true);  // the supervisor's echo changes nothing
  EXPECT_EQ(reg.Find("r0")->exit_reason, "exit 0");
  reg.Exit("r1", "signal 9", false);
  EXPECT_EQ(reg.Find("r1")->state, wire::ActorState::DEAD);
  EXPECT_EQ(reg.Find("r1")->exit_reason, "signal 9");
  EXPECT_EQ(reg.Command(wire::CommandKind::STOP, "*"), 1u);  // only v0 is live
  EXPECT_EQ(reg.Exit("ghost", "exit 1", false), nullptr);

  // Re-registration replaces a dead record and reports a live replacement.
  EXPECT_FALSE(reg.Register(Rec("r1", wire::Role::ROLLOUT, 2), 1000));
  EXPECT_EQ(reg.Find("r1")->state, wire::ActorState::STARTING);
  EXPECT_EQ(reg.Find("r1")->exit_reason, "");
  EXPECT_TRUE(reg.Register(Rec("r1", wire::Role::ROLLOUT, 3), 1100));
  EXPECT_FALSE(reg.Register(Rec("r1", wire::Role::ROLLOUT, 3), 1200));  // same process again
}

TEST(Registry, RoleAndStateNames) {
  for (auto r : {wire::Role::ROLLOUT, wire::Role::VERIFIER, wire::Role::REPLAY,
                 wire::Role::LEARNER, wire::Role::COORDINATOR}) {
    EXPECT_EQ(RoleFromName(RoleName(r)), r);
  }
  EXPECT_EQ(RoleFromName("nonsense"), wire::Role::UNKNOWN);
  EXPECT_EQ(StateName(wire::ActorState::SUSPECT), "suspect");
}

}  // namespace
}  // namespace grove
