// CurveZMQ across processes: `grove keygen` makes the keys, a coordinator
// (`grove run coordinator`) with [security] curve = true admits a test actor
// holding an authorized key, refuses one without keys and one with an
// unlisted key, and says so in its log and in `grove status`; `grove up`
// with the same section runs end to end.
#include <signal.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support/proc_util.h"

namespace grove {
namespace {

using testing::GroveBinary;
using testing::RunCapture;
using testing::Spawn;
using testing::TestActorBinary;
using testing::WaitExit;
using testing::WaitFor;

class CurveCluster : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir();
    keys_ = dir_ + "/keys";
    int code = -1;
    const std::string out =
        RunCapture({GroveBinary(), "keygen", "--out", keys_, "--cluster"}, &code, true);
    ASSERT_EQ(code, 0) << out;
  }
  void TearDown() override {
    for (int pid : pids_) {
      kill(pid, SIGKILL);
      WaitExit(pid, 2000);
    }
    std::filesystem::remove_all(dir_);
  }

  std::string WriteFile(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }
  std::string SecurityConfig() {
    return "[security]\ncurve = true\nkeys_dir = \"" + keys_ + "\"\n";
  }

  int StartActor(const std::string& id, const std::string& coordinator, const std::string& config) {
    std::vector<std::string> argv = {TestActorBinary(), "--id=" + id, "--coordinator=" + coordinator,
                                     "--role=rollout"};
    if (!config.empty()) argv.push_back("--config=" + config);
    const int pid = Spawn(argv, dir_ + "/" + id + ".log");
    pids_.push_back(pid);
    return pid;
  }

  // `grove status --json` with `extra` flags; null on failure.
  nlohmann::json Status(const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {GroveBinary(), "status", "--json", "--timeout_ms", "1000"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    int code = -1;
    const std::string out = RunCapture(argv, &code);
    if (code != 0) return nullptr;
    return nlohmann::json::parse(out, nullptr, false);
  }
  static std::string State(const nlohmann::json& status, const std::string& id) {
    if (status.is_null()) return "no status";
    for (const auto& a : status["actors"]) {
      if (a.value("id", "") == id) return a.value("state", "");
    }
    return "absent";
  }

  std::string dir_, keys_;
  std::vector<int> pids_;
};

TEST_F(CurveCluster, KeygenWritesZ85KeysWithPrivateSecrets) {
  for (const char* name : {"server", "client"}) {
    const std::string stem = keys_ + "/" + name;
    struct stat st;
    ASSERT_EQ(stat((stem + ".key").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << name;
    for (const char* ext : {".key", ".pub"}) {
      const std::string text = testing::ReadFile(stem + ext);
      ASSERT_EQ(text.size(), 41u) << stem << ext;  // 40 Z85 characters and a newline
      EXPECT_EQ(text.back(), '\n');
      EXPECT_EQ(text.find_first_not_of(
                    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"),
                40u)
          << text;
    }
  }
  EXPECT_EQ(testing::ReadFile(keys_ + "/authorized/client.pub"), testing::ReadFile(keys_ + "/client.pub"));
  EXPECT_NE(testing::ReadFile(keys_ + "/server.pub"), testing::ReadFile(keys_ + "/client.pub"));
  // Never overwrites; --out is required.
  int code = -1;
  std::string out = RunCapture({GroveBinary(), "keygen", "--out", keys_, "--name", "client"}, &code, true);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("not overwriting"), std::string::npos) << out;
  out = RunCapture({GroveBinary(), "keygen"}, &code, true);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("--out"), std::string::npos) << out;
}

TEST_F(CurveCluster, KeyedActorRegistersStrangersAreRefusedAndCounted) {
  const std::string config = WriteFile("secure.toml", SecurityConfig());
  // A second client key pair that nobody authorized.
  int code = -1;
  std::string out = RunCapture({GroveBinary(), "keygen", "--out", dir_ + "/other", "--name", "client"},
                               &code, true);
  ASSERT_EQ(code, 0) << out;
  const std::string unlisted = WriteFile(
      "unlisted.toml", SecurityConfig() + "client_key = \"" + dir_ + "/other/client\"\n");

  const std::string ep_file = dir_ + "/coordinator.ep";
  pids_.push_back(Spawn({GroveBinary(), "run", "coordinator", "--config", config, "--bind",
                         "tcp://127.0.0.1:0", "--endpoint_file", ep_file, "--set",
                         "coordinator.heartbeat_interval_ms=100"},
                        dir_ + "/coordinator.log"));
  std::string coordinator;
  ASSERT_TRUE(WaitFor(
      [&] {
        coordinator = testing::ReadFile(ep_file);
        return !coordinator.empty() && coordinator.back() == '\n';
      },
      10000))
      << testing::ReadFile(dir_ + "/coordinator.log");
  coordinator.pop_back();
  const std::vector<std::string> with_keys = {"--coordinator", coordinator, "--keys", keys_};

  StartActor("trusted", coordinator, config);
  StartActor("intruder", coordinator, "");  // no keys at all: plain TCP
  StartActor("unlisted", coordinator, unlisted);
  nlohmann::json status;
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(with_keys);
        return State(status, "trusted") == "healthy" &&
               status["cluster"].value("auth_refusals", 0.0) >= 2;
      },
      15000))
      << status.dump(2) << testing::ReadFile(dir_ + "/coordinator.log");
  EXPECT_EQ(status["cluster"].value("curve", 0.0), 1.0);
  // Neither stranger ever got a message through.
  EXPECT_EQ(State(status, "intruder"), "absent");
  EXPECT_EQ(State(status, "unlisted"), "absent");
  EXPECT_FALSE(status["cluster"].value("auth_last_refused", "").empty());

  // The coordinator's log names both kinds of refusal.
  ASSERT_TRUE(WaitFor(
      [&] {
        const std::string log = testing::ReadFile(dir_ + "/coordinator.log");
        return log.find("does not use CurveZMQ") != std::string::npos &&
               log.find("is not authorized") != std::string::npos;
      },
      5000))
      << testing::ReadFile(dir_ + "/coordinator.log");

  // The table's security line.
  const std::string table = RunCapture(
      {GroveBinary(), "status", "--coordinator", coordinator, "--keys", keys_}, &code);
  EXPECT_EQ(code, 0);
  EXPECT_NE(table.find("\nsecurity CurveZMQ on  refused "), std::string::npos) << table;
  // Which refusal was last depends on the strangers' reconnect timing. A
  // plain-TCP peer may have closed before its address could be read (the
  // refusal then names no peer); a ZAP refusal always carries the address.
  EXPECT_NE(table.find("connections from unauthorized actors (last: "), std::string::npos) << table;
  const std::string log = testing::ReadFile(dir_ + "/coordinator.log");
  EXPECT_NE(log.find("refused a connection from 127.0.0.1:"), std::string::npos) << log;

  // The CLI without keys gets no reply and says why it may be.
  out = RunCapture({GroveBinary(), "status", "--coordinator", coordinator, "--timeout_ms", "500"},
                   &code, true);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("pass --keys"), std::string::npos) << out;
  // With keys that are not authorized, it knows the cluster uses CurveZMQ.
  std::filesystem::copy_file(keys_ + "/server.pub", dir_ + "/other/server.pub");
  out = RunCapture({GroveBinary(), "status", "--coordinator", coordinator, "--timeout_ms", "500",
                    "--keys", dir_ + "/other"},
                   &code, true);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("no reply: authentication may have failed (cluster uses CurveZMQ"),
            std::string::npos)
      << out;
  // A keys directory without keys is a clear error, not a hang.
  out = RunCapture({GroveBinary(), "status", "--coordinator", coordinator, "--keys", dir_ + "/none"},
                   &code, true);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("client.key"), std::string::npos) << out;
}

TEST_F(CurveCluster, GroveUpWithKeysRunsEndToEnd) {
  // Relative keys_dir: grove up makes it absolute for every child.
  const std::string config = WriteFile(
      "up.toml",
      "[security]\ncurve = true\nkeys_dir = \"keys\"\n"
      "[cluster]\nrollout = 1\n"
      "[coordinator]\nheartbeat_interval_ms = 100\n"
      "[launcher]\nname = \"curve\"\nstop_timeout_ms = 3000\n"
      "[launcher.programs]\nrollout = \"" + TestActorBinary() + "\"\n");
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(dir_);
  int code = -1;
  std::string out = RunCapture({GroveBinary(), "up", "--config", config, "--detach", "--runs_dir",
                                dir_ + "/runs"},
                               &code, true);
  std::filesystem::current_path(cwd);
  ASSERT_EQ(code, 0) << out;
  const std::string run = std::filesystem::canonical(dir_ + "/runs/latest").string();
  auto info = nlohmann::json::parse(testing::ReadFile(run + "/cluster.json"));
  pids_.push_back(info.value("launcher_pid", 0));

  // The CLI finds the keys through the run directory's config.
  nlohmann::json status;
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status({"--run_dir", run});
        return State(status, "rollout-0") == "healthy";
      },
      15000))
      << status.dump(2) << testing::ReadFile(run + "/logs/rollout-0.log")
      << testing::ReadFile(run + "/logs/launcher.log");
  EXPECT_EQ(status["cluster"].value("curve", 0.0), 1.0);
  EXPECT_EQ(status["cluster"].value("auth_refusals", -1.0), 0.0);
  EXPECT_NE(testing::ReadFile(run + "/config.toml").find(dir_ + "/keys/server"), std::string::npos);
  const std::string table = RunCapture({GroveBinary(), "status", "--run_dir", run}, &code);
  EXPECT_NE(table.find("\nsecurity CurveZMQ on  refused 0 connections"), std::string::npos) << table;

  // Scale and down go through the launcher's secured control socket.
  out = RunCapture({GroveBinary(), "scale", "rollout=2", "--run_dir", run}, &code, true);
  EXPECT_EQ(code, 0) << out;
  ASSERT_TRUE(WaitFor([&] { return State(Status({"--run_dir", run}), "rollout-1") == "healthy"; },
                      15000));
  out = RunCapture({GroveBinary(), "down", "--run_dir", run, "--timeout_ms", "8000"}, &code, true);
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(out.find("launcher not answering"), std::string::npos) << out;
}

}  // namespace
}  // namespace grove
