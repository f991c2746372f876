// The launcher's restart back-off and limit count crashes in a row: an actor
// that ran for launcher.restart_reset_ms before it was killed is restarted
// promptly however often that happens (a long chaos run kills each actor
// many times), while one that keeps crashing right after its start is given
// up after restart_limit tries. Before this, both counted every restart
// ever, so a long run's tenth kill of an id waited 2^10 back-offs and the
// sixth was never restarted.
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support/proc_util.h"

namespace grove {
namespace {

using nlohmann::json;
using testing::GroveBinary;
using testing::RunCapture;
using testing::WaitFor;

class RestartStreak : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir(); }
  void TearDown() override {
    json info = json::parse(testing::ReadFile(dir_ + "/runs/latest/cluster.json"), nullptr, false);
    if (info.is_object()) {
      for (const auto& [id, pid] : info["pids"].items()) kill(pid.get<int>(), SIGKILL);
      kill(info.value("launcher_pid", 0), SIGKILL);
    }
    std::filesystem::remove_all(dir_);
  }
  json Status() {
    int code = -1;
    std::string out = RunCapture({GroveBinary(), "status", "--json", "--run_dir", dir_ + "/runs/latest"}, &code);
    return code == 0 ? json::parse(out, nullptr, false) : json();
  }
  const json* Rollout(const json& s) {
    if (!s.is_object()) return nullptr;
    for (const json& a : s["actors"])
      if (a.value("id", "") == "rollout-0") return &a;
    return nullptr;
  }
  // Waits until rollout-0 is healthy with `restarts`; returns its pid (0: not).
  int WaitHealthy(int restarts, int timeout_ms) {
    int pid = 0;
    WaitFor(
        [&] {
          json s = Status();
          const json* a = Rollout(s);
          if (a == nullptr || a->value("state", "") != "healthy" || a->value("restarts", -1) != restarts) return false;
          pid = a->value("pid", 0);
          return true;
        },
        timeout_ms);
    return pid;
  }
  std::string dir_;
};

TEST_F(RestartStreak, StableRunsResetTheBackOffAndQuickCrashesHitTheLimit) {
  const std::string config = dir_ + "/streak.toml";
  std::ofstream(config) << "[cluster]\nrollout = 1\n"
                           "[coordinator]\nheartbeat_interval_ms = 50\nliveness_misses = 10\n"
                           "[launcher]\nrestart_limit = 2\nrestart_backoff_ms = 500\nrestart_reset_ms = 3000\n"
                           "stop_timeout_ms = 3000\n"
                           "[launcher.programs]\nrollout = \""
                        << testing::TestActorBinary() << "\"\n";
  int code = -1;
  std::string out =
      RunCapture({GroveBinary(), "up", "--config", config, "--detach", "--runs_dir", dir_ + "/runs"}, &code, true);
  ASSERT_EQ(code, 0) << out;
  int pid = WaitHealthy(0, 15000);
  ASSERT_GT(pid, 0);
  // Four kills, each after more than restart_reset_ms of running: twice the
  // limit, and each restart comes after the first back-off step (500 ms),
  // not 500 << n.
  for (int restarts = 1; restarts <= 4; ++restarts) {
    usleep(3200 * 1000);
    ASSERT_EQ(kill(pid, SIGKILL), 0);
    const auto killed = std::chrono::steady_clock::now();
    pid = WaitHealthy(restarts, 10000);
    ASSERT_GT(pid, 0) << "kill " << restarts << " was not followed by a restart: " << Status().dump(1);
    // Doubling would have made the fourth wait 4 s before the start alone.
    if (restarts == 4) {
      EXPECT_LT(std::chrono::steady_clock::now() - killed, std::chrono::milliseconds(3500));
    }
  }
  // Now crashes in a row, each well within restart_reset_ms of its start:
  // the fourth kill's restart was the streak's first, so one more restart,
  // then the launcher gives up and the actor stays dead.
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  pid = WaitHealthy(5, 10000);
  ASSERT_GT(pid, 0) << Status().dump(1);
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  usleep(3000 * 1000);  // well past the next back-off step (2 s)
  json s = Status();
  ASSERT_NE(Rollout(s), nullptr) << s.dump(1);
  EXPECT_EQ(Rollout(s)->value("state", ""), "dead") << s.dump(1);
  EXPECT_EQ(Rollout(s)->value("restarts", -1), 5);
  EXPECT_NE(testing::ReadFile(dir_ + "/runs/latest/logs/launcher.log").find("3 times in a row; not restarting"),
            std::string::npos);
  RunCapture({GroveBinary(), "down", "--run_dir", dir_ + "/runs/latest"}, &code, true);
}

}  // namespace
}  // namespace grove
