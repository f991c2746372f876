// The operating tools against a running cluster (`grove up` with the test
// actor standing in for workers): `grove status --json` against what the
// actors report, /metrics against `grove status --json`, and `grove logs`.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "actors/rpc_client.h"
#include "tests/support/proc_util.h"
#include "tests/ops/http_get.h"
#include "tests/ops/prometheus_parse.h"

namespace grove {
namespace {

using testing::GroveBinary;
using testing::RunCapture;
using testing::WaitFor;

class OpsCluster : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir();
    const std::string actor = testing::TestActorBinary();
    const std::string config = dir_ + "/ops-test.toml";
    std::ofstream(config) << "[cluster]\nrollout = 2\nverifier = 1\n"
                             "[coordinator]\nheartbeat_interval_ms = 50\nliveness_misses = 20\n"
                             "[launcher]\nname = \"opstest\"\nrestart_backoff_ms = 200\n"
                             "stop_timeout_ms = 3000\n"
                             "[launcher.programs]\nrollout = \"" + actor + "\"\nverifier = \"" +
                                 actor + "\"\n";
    int code = -1;
    std::string out = RunCapture(
        {GroveBinary(), "up", "--config", config, "--detach", "--runs_dir", dir_ + "/runs"}, &code,
        true);
    ASSERT_EQ(code, 0) << out;
    run_ = std::filesystem::canonical(dir_ + "/runs/latest").string();
  }
  void TearDown() override {
    int code = -1;
    if (!run_.empty()) RunCapture({GroveBinary(), "down", "--run_dir", run_}, &code, true);
    auto info = nlohmann::json::parse(testing::ReadFile(run_ + "/cluster.json"), nullptr, false);
    if (info.is_object()) {  // whatever a failed test left running
      for (const auto& [id, pid] : info["pids"].items()) kill(pid.get<int>(), SIGKILL);
      kill(info.value("launcher_pid", 0), SIGKILL);
    }
    std::filesystem::remove_all(dir_);
  }

  nlohmann::json Status() {
    int code = -1;
    std::string out = RunCapture({GroveBinary(), "status", "--json", "--run_dir", run_}, &code);
    return code == 0 ? nlohmann::json::parse(out, nullptr, false) : nlohmann::json();
  }
  static const nlohmann::json* Find(const nlohmann::json& status, const std::string& id) {
    if (!status.is_object()) return nullptr;
    for (const auto& a : status["actors"]) {
      if (a.value("id", "") == id) return &a;
    }
    return nullptr;
  }
  static double Counter(const nlohmann::json& status, const std::string& id, const char* name) {
    const auto* a = Find(status, id);
    return a && (*a)["counters"].contains(name) ? (*a)["counters"][name].get<double>() : -1;
  }
  bool AllHealthy(nlohmann::json* status) {
    *status = Status();
    for (const char* id : {"rollout-0", "rollout-1", "verifier-0"}) {
      const auto* a = Find(*status, id);
      if (!a || (*a)["state"] != "healthy" || !(*a)["counters"].contains("served")) return false;
    }
    return true;
  }

  std::string dir_, run_;
};

// Asks a test actor's data socket for status `n` times; it counts them as
// "served" and heartbeats that count.
void Poke(const std::string& endpoint, int n) {
  actors::RpcClient rpc("ops-test");
  ASSERT_TRUE(rpc.Connect(endpoint).ok());
  for (int i = 0; i < n; ++i) {
    capnp::MallocMessageBuilder msg;
    actors::InitEnvelope(msg, "ops-test", 0).getBody().initStatusRequest();
    auto reply = rpc.Call(msg, {actors::BodyKind::COMMAND_REPLY}, 5000);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->envelope().getBody().getCommandReply().getMatched(), static_cast<uint32_t>(i + 1));
  }
}

TEST_F(OpsCluster, StatusJsonAndMetricsMatchWhatActorsReport) {
  nlohmann::json status;
  ASSERT_TRUE(WaitFor([&] { return AllHealthy(&status); }, 20000)) << status.dump(2);
  auto info = nlohmann::json::parse(testing::ReadFile(run_ + "/cluster.json"));
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);

  // Each actor as status shows it: the launcher's pid, this host, its role.
  for (const char* id : {"rollout-0", "rollout-1", "verifier-0"}) {
    const auto& a = *Find(status, id);
    EXPECT_EQ(a["pid"], info["pids"][id]) << id;
    EXPECT_EQ(kill(a["pid"].get<int>(), 0), 0) << id;
    EXPECT_EQ(a["host"], host);
    EXPECT_EQ(a["role"], std::string(id).substr(0, std::string(id).find('-')));
    EXPECT_EQ(a["restarts"], 0);
    EXPECT_EQ(Counter(status, id, "registrations"), 1) << id;
    EXPECT_GT(a["rss_bytes"].get<double>(), 1e5) << id;
    EXPECT_EQ(a["data_endpoint"].get<std::string>().rfind("tcp://127.0.0.1:", 0), 0u);
  }
  EXPECT_EQ(status["cluster"]["actors_healthy"], 3);

  // A figure the actors count themselves: different per actor, so a mix-up
  // of ids or roles shows.
  Poke((*Find(status, "rollout-0"))["data_endpoint"], 3);
  Poke((*Find(status, "verifier-0"))["data_endpoint"], 5);
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status();
        return Counter(status, "rollout-0", "served") == 3 &&
               Counter(status, "verifier-0", "served") == 5;
      },
      10000))
      << status.dump(2);
  EXPECT_EQ(Counter(status, "rollout-1", "served"), 0);

  // /metrics: valid exposition whose figures equal status's. Counters and
  // pids are stable now; ages, uptime and RSS move between the two reads.
  const std::string url = info.value("metrics", "");
  ASSERT_EQ(url.rfind("http://127.0.0.1:", 0), 0u) << info.dump();
  const std::string response = testing::HttpGet(url);
  ASSERT_EQ(testing::HttpCode(response), 200) << response;
  status = Status();
  auto samples = testing::ParseExposition(testing::HttpBody(response));
  ASSERT_TRUE(samples.ok()) << samples.status();
  auto at = [&](const std::string& key) {
    auto it = samples->find(key);
    EXPECT_NE(it, samples->end()) << key;
    return it == samples->end() ? -12345.0 : it->second;
  };
  for (const char* id : {"rollout-0", "rollout-1", "verifier-0"}) {
    const auto& a = *Find(status, id);
    const std::string role = a["role"];
    const std::string l = "{role=\"" + role + "\",id=\"" + id + "\"}";
    EXPECT_EQ(at("grove_actor_pid" + l), a["pid"].get<double>()) << id;
    EXPECT_EQ(at("grove_actor_restarts" + l), 0) << id;
    EXPECT_EQ(at("grove_" + role + "_served" + l), Counter(status, id, "served")) << id;
    EXPECT_EQ(at("grove_" + role + "_registrations" + l), 1) << id;
    EXPECT_EQ(at("grove_actor_state{role=\"" + role + "\",id=\"" + id + "\",state=\"healthy\"}"), 1);
    // Heartbeats every 50 ms: an age above 2 s would mean stale figures.
    EXPECT_LT(at("grove_actor_heartbeat_age_seconds" + l), 2.0) << id;
    EXPECT_GE(at("grove_actor_heartbeat_age_seconds" + l), 0.0) << id;
    // RSS of an idle process moves by far less than half between heartbeats.
    EXPECT_NEAR(at("grove_actor_rss_bytes" + l), a["rss_bytes"].get<double>(),
                0.5 * a["rss_bytes"].get<double>());
  }
  EXPECT_EQ(at("grove_cluster_actors{state=\"healthy\"}"), 3);
  EXPECT_EQ(at("grove_cluster_prompts_done"), status["cluster"]["prompts_done"].get<double>());
  EXPECT_EQ(at("grove_cluster_staleness"), status["cluster"]["staleness"].get<double>());
  EXPECT_GT(at("grove_coordinator_uptime_seconds"), 0);

  // A worker killed with SIGKILL: restarted, and both views count it.
  const int old_pid = (*Find(status, "rollout-1"))["pid"];
  ASSERT_EQ(kill(old_pid, SIGKILL), 0);
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status();
        const auto* a = Find(status, "rollout-1");
        return a && (*a)["state"] == "healthy" && (*a)["restarts"] == 1;
      },
      15000))
      << status.dump(2);
  EXPECT_NE((*Find(status, "rollout-1"))["pid"], old_pid);
  samples = testing::ParseExposition(testing::HttpBody(testing::HttpGet(url)));
  ASSERT_TRUE(samples.ok()) << samples.status();
  EXPECT_EQ(at("grove_actor_restarts{role=\"rollout\",id=\"rollout-1\"}"), 1);
  EXPECT_EQ(at("grove_actor_pid{role=\"rollout\",id=\"rollout-1\"}"),
            (*Find(status, "rollout-1"))["pid"].get<double>());
}

TEST_F(OpsCluster, LogsPrintsAndFollowsAnActorsLog) {
  nlohmann::json status;
  ASSERT_TRUE(WaitFor([&] { return AllHealthy(&status); }, 20000)) << status.dump(2);
  int code = -1;
  // A bare role with one actor; the output is the whole file.
  std::string out = RunCapture({GroveBinary(), "logs", "verifier", "--run_dir", run_}, &code);
  EXPECT_EQ(code, 0);
  const std::string verifier_log = testing::ReadFile(run_ + "/logs/verifier-0.log");
  EXPECT_FALSE(verifier_log.empty());
  EXPECT_EQ(out.substr(0, verifier_log.size()), verifier_log);
  out = RunCapture({GroveBinary(), "logs", "rollout/1", "--tail", "1", "--run_dir", run_}, &code);
  EXPECT_EQ(code, 0);
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  EXPECT_NE(testing::ReadFile(run_ + "/logs/rollout-1.log").find(out), std::string::npos);

  // Several rollouts: name one. Unknown ids: a clear error and exit 1.
  out = RunCapture({GroveBinary(), "logs", "rollout", "--run_dir", run_}, &code, true);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("rollout has 2 actors; name one: rollout-0, rollout-1"), std::string::npos)
      << out;
  out = RunCapture({GroveBinary(), "logs", "rollout/7", "--run_dir", run_}, &code, true);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("no log for rollout/7"), std::string::npos) << out;
  EXPECT_NE(out.find("rollout-0, rollout-1"), std::string::npos) << out;
  // Found like `grove status` finds the cluster: $GROVE_RUN_DIR.
  setenv("GROVE_RUN_DIR", run_.c_str(), 1);
  out = RunCapture({GroveBinary(), "logs", "coordinator"}, &code);
  unsetenv("GROVE_RUN_DIR");
  EXPECT_EQ(code, 0);
  EXPECT_NE(out.find("coordinator serving at"), std::string::npos) << out;

  // -f: prints what is appended later, and ends cleanly on SIGTERM.
  const std::string followed = dir_ + "/followed.txt";
  const int pid = testing::Spawn(
      {GroveBinary(), "logs", "rollout-0", "-f", "--poll_ms", "20", "--run_dir", run_}, followed);
  const std::string marker = "ops-test marker " + std::to_string(getpid());
  ASSERT_TRUE(WaitFor([&] { return !testing::ReadFile(followed).empty(); }, 10000));
  std::ofstream(run_ + "/logs/rollout-0.log", std::ios::app) << marker << "\n";
  EXPECT_TRUE(WaitFor(
      [&] { return testing::ReadFile(followed).find(marker) != std::string::npos; }, 10000))
      << testing::ReadFile(followed);
  kill(pid, SIGTERM);
  int wait_status = 0;
  ASSERT_TRUE(testing::WaitExit(pid, 5000, &wait_status));
  EXPECT_TRUE(WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0) << wait_status;
}

TEST(OpsCli, LogsHelpAndErrorsWithoutACluster) {
  int code = -1;
  std::string out = RunCapture({GroveBinary(), "logs", "--help"}, &code);
  EXPECT_EQ(code, 0);
  EXPECT_EQ(out.rfind("usage: grove logs ROLE[/ID] [-f]", 0), 0u) << out;
  const std::string dir = testing::MakeTempDir();
  out = RunCapture({GroveBinary(), "logs", "learner", "--run_dir", dir + "/none"}, &code, true);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("no cluster found"), std::string::npos) << out;
  out = RunCapture({GroveBinary(), "logs", "--run_dir", dir}, &code, true);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("name exactly one actor"), std::string::npos) << out;
  out = RunCapture({GroveBinary(), "logs", "a", "--tail", "-3"}, &code, true);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("--tail must be >= 0"), std::string::npos) << out;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace grove
