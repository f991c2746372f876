// The process loop's signal contract: first SIGTERM/SIGINT drains, the
// second forces stop; the handler only sets a flag.
#include "actors/process.h"

#include <csignal>

#include <gtest/gtest.h>

namespace grove::actors {
namespace {

TEST(ProcessSignals, FirstSignalDrainsSecondStops) {
  InstallDrainSignalHandlers();
  EXPECT_FALSE(DrainSignalled());
  EXPECT_FALSE(StopSignalled());
  ASSERT_EQ(std::raise(SIGTERM), 0);  // the process survives: handled, not fatal
  EXPECT_TRUE(DrainSignalled());
  EXPECT_FALSE(StopSignalled());
  ASSERT_EQ(std::raise(SIGINT), 0);
  EXPECT_TRUE(StopSignalled());
  ASSERT_EQ(std::raise(SIGTERM), 0);  // further signals change nothing
  EXPECT_TRUE(StopSignalled());
}

TEST(ProcessStart, NeedsACoordinatorAndFailsCleanlyWhenNoneAnswers) {
  RoleArgs args;
  args.role = "rollout";
  args.id = "r0";
  auto missing = ActorProcess::Start(args, wire::Role::ROLLOUT, "");
  EXPECT_EQ(missing.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::actors
