// Multi-process tests on loopback: a real coordinator (`grove run
// coordinator`) and test actors as separate processes, observed only through
// `grove status --json`, the way a person or a script would.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "actors/codec.h"
#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "tests/support/proc_util.h"

namespace grove {
namespace {

using testing::GroveBinary;
using testing::RunCapture;
using testing::Spawn;
using testing::TestActorBinary;
using testing::WaitExit;
using testing::WaitFor;

constexpr int kHeartbeatMs = 50;
constexpr int kSuspectMisses = 2;
// Liveness window 1500 ms: the suspect state (100..1500 ms after the last
// heartbeat) must last longer than one `grove status` call on a loaded box.
constexpr int kLivenessMisses = 30;

class Cluster : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir(); }
  void TearDown() override {
    for (int pid : pids_) {
      kill(pid, SIGKILL);
      WaitExit(pid, 2000);
    }
    std::filesystem::remove_all(dir_);
  }

  // Starts a coordinator on `bind`; returns its endpoint.
  std::string StartCoordinator(const std::string& bind, const std::string& extra_set = "") {
    const std::string ep_file = dir_ + "/coordinator.ep";
    std::filesystem::remove(ep_file);
    std::vector<std::string> argv = {
        GroveBinary(), "run", "coordinator", "--bind", bind, "--endpoint_file", ep_file,
        "--set", "coordinator.heartbeat_interval_ms=" + std::to_string(kHeartbeatMs),
        "--set", "coordinator.suspect_misses=" + std::to_string(kSuspectMisses),
        "--set", "coordinator.liveness_misses=" + std::to_string(kLivenessMisses)};
    if (!extra_set.empty()) {
      argv.push_back("--set");
      argv.push_back(extra_set);
    }
    coordinator_pid_ = Spawn(argv, dir_ + "/coordinator.log");
    pids_.push_back(coordinator_pid_);
    std::string endpoint;
    EXPECT_TRUE(WaitFor(
        [&] {
          endpoint = testing::ReadFile(ep_file);
          return !endpoint.empty() && endpoint.back() == '\n';
        },
        10000))
        << testing::ReadFile(dir_ + "/coordinator.log");
    if (!endpoint.empty()) endpoint.pop_back();
    return endpoint;
  }

  int StartActor(const std::string& id, const std::string& coordinator) {
    int pid = Spawn({TestActorBinary(), "--id=" + id, "--coordinator=" + coordinator,
                     "--role=rollout", "--max_frame_bytes=65536"},
                    dir_ + "/" + id + ".log");
    pids_.push_back(pid);
    return pid;
  }

  nlohmann::json Status(const std::string& coordinator) {
    int code = -1;
    std::string out = RunCapture({GroveBinary(), "status", "--json", "--coordinator", coordinator,
                                  "--timeout_ms", "1000"},
                                 &code);
    if (code != 0) return nlohmann::json();
    return nlohmann::json::parse(out, nullptr, false);
  }

  static const nlohmann::json* FindActor(const nlohmann::json& status, const std::string& id) {
    if (!status.is_object() || !status.contains("actors")) return nullptr;
    for (const auto& a : status["actors"]) {
      if (a.value("id", "") == id) return &a;
    }
    return nullptr;
  }

  static std::string StateOf(const nlohmann::json& status, const std::string& id) {
    const auto* a = FindActor(status, id);
    return a != nullptr ? a->value("state", "") : "absent";
  }

  std::string dir_;
  std::vector<int> pids_;
  int coordinator_pid_ = 0;
};

TEST_F(Cluster, HealthyThenKilledActorIsSuspectThenDeadAndRestartedCoordinatorRelearnsSurvivors) {
  const std::string coordinator = StartCoordinator("tcp://127.0.0.1:0");
  ASSERT_FALSE(coordinator.empty());
  std::map<std::string, int> actor_pids;
  for (const char* id : {"actor-0", "actor-1", "actor-2"}) actor_pids[id] = StartActor(id, coordinator);

  nlohmann::json status;
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(coordinator);
        for (const char* id : {"actor-0", "actor-1", "actor-2"}) {
          // Healthy, and the role's own counters have arrived.
          if (StateOf(status, id) != "healthy" ||
              !(*FindActor(status, id))["counters"].contains("registrations")) {
            return false;
          }
        }
        return true;
      },
      15000))
      << status.dump(2);
  for (const auto& [id, pid] : actor_pids) {
    const auto* a = FindActor(status, id);
    ASSERT_NE(a, nullptr);
    EXPECT_EQ((*a)["role"], "rollout");
    EXPECT_EQ((*a)["pid"], pid);
    EXPECT_LT((*a)["heartbeat_age_ms"].get<int64_t>(), kHeartbeatMs * kLivenessMisses);
    EXPECT_GT((*a)["rss_bytes"].get<uint64_t>(), 0u);
    EXPECT_EQ((*a)["counters"].value("registrations", -1.0), 1.0);
    EXPECT_EQ((*a)["exit_reason"], "");
  }
  const uint64_t first_epoch = status["cluster"]["epoch"].get<uint64_t>();

  // kill -9: suspect first, then dead within the liveness window (plus the
  // sweep tick and the time `grove status` takes to start).
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(actor_pids["actor-1"], SIGKILL), 0);
  bool saw_suspect = false;
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(coordinator);
        const std::string s = StateOf(status, "actor-1");
        saw_suspect = saw_suspect || s == "suspect";
        return s == "dead";
      },
      5000))
      << status.dump(2);
  const auto dead_after_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                 std::chrono::steady_clock::now() - killed_at)
                                 .count();
  EXPECT_TRUE(saw_suspect) << "never observed the suspect state";
  EXPECT_LE(dead_after_ms, kHeartbeatMs * kLivenessMisses + 1000);
  EXPECT_GE(dead_after_ms, kHeartbeatMs * kLivenessMisses - kHeartbeatMs);
  EXPECT_NE(FindActor(status, "actor-1")->value("exit_reason", "").find("no heartbeat"),
            std::string::npos);
  EXPECT_EQ(StateOf(status, "actor-0"), "healthy");
  EXPECT_EQ(StateOf(status, "actor-2"), "healthy");

  // Restart the coordinator on the same port: the survivors register again.
  kill(coordinator_pid_, SIGKILL);
  ASSERT_TRUE(WaitExit(coordinator_pid_, 5000));
  const std::string again = StartCoordinator(coordinator);
  ASSERT_EQ(again, coordinator);
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(coordinator);
        return StateOf(status, "actor-0") == "healthy" && StateOf(status, "actor-2") == "healthy";
      },
      15000))
      << status.dump(2);
  EXPECT_NE(status["cluster"]["epoch"].get<uint64_t>(), first_epoch);
  EXPECT_EQ(StateOf(status, "actor-1"), "absent");  // the new coordinator never knew it
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(coordinator);
        const auto* a = FindActor(status, "actor-0");
        return a != nullptr && (*a)["counters"].value("registrations", 0.0) == 2.0;
      },
      5000))
      << status.dump(2);

  // SIGTERM drains: the actor reports itself stopped, cleanly.
  kill(actor_pids["actor-0"], SIGTERM);
  int wstatus = 0;
  ASSERT_TRUE(WaitExit(actor_pids["actor-0"], 5000, &wstatus));
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
  status = Status(coordinator);
  EXPECT_EQ(StateOf(status, "actor-0"), "stopped") << status.dump(2);
  EXPECT_EQ(FindActor(status, "actor-0")->value("exit_reason", ""), "exit 0");
}

// Frames a hostile or broken peer might send.
std::vector<std::pair<std::string, std::string>> BadFrames(size_t oversize) {
  std::mt19937_64 rng(42);
  std::string random(1000, '\0');
  for (auto& c : random) c = static_cast<char>(rng());
  capnp::MallocMessageBuilder ok_msg;
  actors::InitEnvelope(ok_msg, "intruder", 7).getBody().initStatusRequest();
  std::string valid = actors::EncodeFrame(ok_msg);
  // Valid Cap'n Proto and a valid Envelope, but a body no server here takes.
  capnp::MallocMessageBuilder wrong;
  actors::InitEnvelope(wrong, "intruder", 8).getBody().initBatch().setReady(true);
  // Valid Cap'n Proto of another type altogether (no magic).
  capnp::MallocMessageBuilder other;
  other.initRoot<wire::Prompt>().setText("not an envelope");
  std::string big(oversize, '\0');
  return {{"garbage", random},
          {"garbage", std::string(3, 'x')},
          {"truncated", valid.substr(0, valid.size() - 16)},
          {"oversized", big},
          {"wrong_kind", actors::EncodeFrame(wrong)},
          {"garbage", actors::EncodeFrame(other)}};
}

TEST_F(Cluster, BadFramesAreCountedAndDroppedWhileServing) {
  const std::string coordinator = StartCoordinator("tcp://127.0.0.1:0",
                                                   "coordinator.max_frame_bytes=65536");
  ASSERT_FALSE(coordinator.empty());
  StartActor("victim", coordinator);
  nlohmann::json status;
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(coordinator);
        return StateOf(status, "victim") == "healthy";
      },
      15000));
  const std::string data_endpoint = FindActor(status, "victim")->value("data_endpoint", "");
  ASSERT_FALSE(data_endpoint.empty());

  for (const std::string& target : {coordinator, data_endpoint}) {
    actors::DealerSocket raw;
    ASSERT_TRUE(raw.Connect(target).ok());
    for (int round = 0; round < 3; ++round) {
      for (auto& [kind, bytes] : BadFrames(100000)) ASSERT_TRUE(raw.Send(bytes, 2000).ok());
    }
    // Still serving: a good request right after gets its answer.
    actors::RpcClient rpc("checker");
    ASSERT_TRUE(rpc.Connect(target).ok());
    capnp::MallocMessageBuilder msg;
    actors::InitEnvelope(msg, "checker", 0).getBody().initStatusRequest();
    auto reply = rpc.Call(msg, {actors::BodyKind::STATUS_REPLY, actors::BodyKind::COMMAND_REPLY}, 3000);
    ASSERT_TRUE(reply.ok()) << target << ": " << reply.status();
  }

  // Counted per kind, by the coordinator (cluster line) and by the actor
  // (its heartbeat counters).
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(coordinator);
        const auto* a = FindActor(status, "victim");
        return a != nullptr && (*a)["counters"].value("bad_frames_wrong_kind", 0.0) >= 3;
      },
      5000))
      << status.dump(2);
  const auto& c = status["cluster"];
  EXPECT_EQ(c.value("bad_frames_garbage", -1.0), 9.0);
  EXPECT_EQ(c.value("bad_frames_truncated", -1.0), 3.0);
  EXPECT_EQ(c.value("bad_frames_oversized", -1.0), 3.0);
  EXPECT_EQ(c.value("bad_frames_wrong_kind", -1.0), 3.0);
  const auto& counters = (*FindActor(status, "victim"))["counters"];
  EXPECT_EQ(counters.value("bad_frames_garbage", -1.0), 9.0);
  EXPECT_EQ(counters.value("bad_frames_truncated", -1.0), 3.0);
  EXPECT_EQ(counters.value("bad_frames_oversized", -1.0), 3.0);
  EXPECT_EQ(counters.value("bad_frames_wrong_kind", -1.0), 3.0);
  EXPECT_EQ(counters.value("served", -1.0), 1.0);
  EXPECT_EQ(StateOf(status, "victim"), "healthy");
  // The processes are alive.
  EXPECT_EQ(kill(coordinator_pid_, 0), 0);
}

}  // namespace
}  // namespace grove
