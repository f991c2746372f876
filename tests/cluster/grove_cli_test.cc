// `grove up` / `status` / `scale` / `down` end to end, with the test actor
// program standing in for rollout workers via [launcher.programs].
#include <signal.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support/proc_util.h"

namespace grove {
namespace {

using testing::GroveBinary;
using testing::RunCapture;
using testing::WaitFor;

class GroveCli : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir(); }
  void TearDown() override {
    // Whatever a failed test left running.
    auto info = nlohmann::json::parse(testing::ReadFile(dir_ + "/runs/latest/cluster.json"),
                                      nullptr, false);
    if (info.is_object()) {
      for (const auto& [id, pid] : info["pids"].items()) kill(pid.get<int>(), SIGKILL);
      kill(info.value("launcher_pid", 0), SIGKILL);
    }
    std::filesystem::remove_all(dir_);
  }

  std::string WriteConfig(const std::string& text) {
    const std::string path = dir_ + "/cluster-test.toml";
    std::ofstream(path) << text;
    return path;
  }

  nlohmann::json Status() {
    int code = -1;
    std::string out = RunCapture(
        {GroveBinary(), "status", "--json", "--run_dir", dir_ + "/runs/latest"}, &code);
    return code == 0 ? nlohmann::json::parse(out, nullptr, false) : nlohmann::json();
  }

  static const nlohmann::json* Find(const nlohmann::json& status, const std::string& id) {
    if (!status.is_object()) return nullptr;
    for (const auto& a : status["actors"]) {
      if (a.value("id", "") == id) return &a;
    }
    return nullptr;
  }
  static std::string State(const nlohmann::json& status, const std::string& id) {
    const auto* a = Find(status, id);
    return a ? a->value("state", "") : "absent";
  }

  std::string dir_;
};

TEST_F(GroveCli, UpStatusRestartScaleDown) {
  const std::string config = WriteConfig(
      "[cluster]\nrollout = 2\n"
      "[coordinator]\nheartbeat_interval_ms = 50\nliveness_misses = 10\n"
      "[launcher]\nname = \"clitest\"\nrestart_backoff_ms = 3000\nstop_timeout_ms = 3000\n"
      "[launcher.programs]\nrollout = \"" + testing::TestActorBinary() + "\"\n");
  int code = -1;
  std::string out = RunCapture({GroveBinary(), "up", "--config", config, "--detach", "--runs_dir",
                                dir_ + "/runs"},
                               &code, true);
  ASSERT_EQ(code, 0) << out;
  // The run directory: cluster.json, the effective config, one log per actor.
  const std::string run = std::filesystem::canonical(dir_ + "/runs/latest").string();
  EXPECT_NE(run.find("clitest-"), std::string::npos);
  EXPECT_TRUE(std::filesystem::exists(run + "/config.toml"));
  auto info = nlohmann::json::parse(testing::ReadFile(run + "/cluster.json"));
  EXPECT_EQ(info["coordinator"].get<std::string>().rfind("tcp://", 0), 0u);

  nlohmann::json status;
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status();
        return State(status, "rollout-0") == "healthy" && State(status, "rollout-1") == "healthy";
      },
      15000))
      << status.dump(2);
  EXPECT_TRUE(std::filesystem::exists(run + "/logs/rollout-0.log"));
  EXPECT_TRUE(std::filesystem::exists(run + "/logs/coordinator.log"));

  // The table: a cluster line, then a row per actor.
  std::string table = RunCapture({GroveBinary(), "status", "--run_dir", run}, &code);
  EXPECT_EQ(code, 0);
  EXPECT_EQ(table.rfind("cluster  2/2 up", 0), 0u) << table;
  EXPECT_NE(table.find("rollout-1"), std::string::npos);

  // A crashed worker is reported ("signal 9") and restarted with its count.
  const int old_pid = (*Find(status, "rollout-0"))["pid"];
  ASSERT_EQ(kill(old_pid, SIGKILL), 0);
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status();
        return State(status, "rollout-0") == "dead";
      },
      5000));
  EXPECT_EQ((*Find(status, "rollout-0"))["exit_reason"], "signal 9");
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status();
        return State(status, "rollout-0") == "healthy";
      },
      15000))
      << status.dump(2);
  EXPECT_EQ((*Find(status, "rollout-0"))["restarts"], 1);
  EXPECT_NE((*Find(status, "rollout-0"))["pid"], old_pid);

  // Scale up, then down (the highest-numbered drain and stop cleanly).
  out = RunCapture({GroveBinary(), "scale", "rollout=3", "--run_dir", run}, &code, true);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("2 -> 3"), std::string::npos) << out;
  ASSERT_TRUE(WaitFor([&] { return State(status = Status(), "rollout-2") == "healthy"; }, 10000));
  out = RunCapture({GroveBinary(), "scale", "rollout=1", "--run_dir", run}, &code, true);
  ASSERT_EQ(code, 0) << out;
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status();
        return State(status, "rollout-2") == "stopped" && State(status, "rollout-1") == "stopped";
      },
      10000))
      << status.dump(2);
  EXPECT_EQ(State(status, "rollout-0"), "healthy");
  out = RunCapture({GroveBinary(), "scale", "bogus=2", "--run_dir", run}, &code, true);
  EXPECT_NE(code, 0);

  // Down: every process of the run ends.
  info = nlohmann::json::parse(testing::ReadFile(run + "/cluster.json"));
  std::vector<int> pids = {info["launcher_pid"].get<int>()};
  for (const auto& [id, pid] : info["pids"].items()) pids.push_back(pid.get<int>());
  out = RunCapture({GroveBinary(), "down", "--run_dir", run}, &code, true);
  ASSERT_EQ(code, 0) << out;
  EXPECT_EQ(out.find("SIGKILL"), std::string::npos) << out;  // stopped politely
  for (int pid : pids) EXPECT_NE(kill(pid, 0), 0) << "pid " << pid << " still running";
}

TEST_F(GroveCli, ForegroundUpEndsWithTheLearnersExitCode) {
  const std::string actor = testing::TestActorBinary();
  const std::string config = WriteConfig(
      "[cluster]\nlearner = 1\nrollout = 1\n"
      "[coordinator]\nheartbeat_interval_ms = 50\n"
      "[launcher.programs]\nlearner = \"" + actor + "\"\nrollout = \"" + actor + "\"\n");
  setenv("GROVE_TEST_LEARNER_EXIT", "1500:3", 1);
  int code = -1;
  const auto start = std::chrono::steady_clock::now();
  std::string out = RunCapture({GroveBinary(), "up", "--config", config, "--runs_dir",
                                dir_ + "/runs"},
                               &code, true);
  unsetenv("GROVE_TEST_LEARNER_EXIT");
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(code, 3) << out;
  EXPECT_LT(took, std::chrono::seconds(12));
  // Everything it started is gone, and the logs say how each ended.
  auto info = nlohmann::json::parse(testing::ReadFile(dir_ + "/runs/latest/cluster.json"));
  EXPECT_TRUE(info["pids"].empty()) << info.dump();
  const std::string launcher_log = out;
  EXPECT_NE(launcher_log.find("learner-0 exited: exit 3"), std::string::npos) << out;
  EXPECT_NE(launcher_log.find("rollout-0 exited: exit 0"), std::string::npos) << out;
  // The learner's last error line is on the terminal, not only in its log.
  EXPECT_NE(out.find("grove up: the learner exited with code 3"), std::string::npos) << out;
  EXPECT_NE(out.find("planned failure: exit 3"), std::string::npos) << out;
}

TEST_F(GroveCli, UpRefusesARoleThisBuildCannotStart) {
  const std::string config = WriteConfig("[cluster]\ntrainer = 2\n");
  int code = -1;
  std::string out = RunCapture({GroveBinary(), "up", "--config", config, "--runs_dir",
                                dir_ + "/runs"},
                               &code, true);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("cannot start role 'trainer'"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/runs"));  // nothing was started or created
}

TEST_F(GroveCli, EverySubcommandHasHelpAndStatusWithoutClusterFailsClearly) {
  int code = -1;
  for (const char* sub : {"up", "status", "scale", "down", "run", "eval"}) {
    std::string out = RunCapture({GroveBinary(), sub, "--help"}, &code);
    EXPECT_EQ(code, 0) << sub;
    EXPECT_EQ(out.rfind(std::string("usage: grove ") + sub, 0), 0u) << out;
  }
  std::string out = RunCapture({GroveBinary(), "status", "--run_dir", dir_ + "/nothing"}, &code, true);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("no cluster found"), std::string::npos) << out;
  out = RunCapture({GroveBinary(), "run", "trainer"}, &code, true);
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("no role 'trainer'"), std::string::npos) << out;
  out = RunCapture({GroveBinary(), "run", "rollout"}, &code, true);
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("needs --coordinator"), std::string::npos) << out;
  for (const char* sub : {"verify", "plot"}) {  // these print their own usage
    out = RunCapture({GroveBinary(), sub, "--help"}, &code);
    EXPECT_EQ(code, 0) << sub;
    EXPECT_NE(out.find(std::string("grove ") + sub), std::string::npos) << out;
  }
  out = RunCapture({GroveBinary(), "frobnicate"}, &code, true);
  EXPECT_EQ(code, 2);
}

}  // namespace
}  // namespace grove
