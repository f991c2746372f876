// Network faults between hosts, with hosts made of Linux network namespaces.
//
// Topology (one switch namespace holding a bridge; one veth pair per host):
//   coord  10.77.0.1   the coordinator
//   hostA  10.77.0.2   replay store, learner, verifier-0, rollout-1
//   hostB  10.77.0.3   rollout-0
// Every actor is a real `grove run ROLE --coordinator tcp://10.77.0.1:PORT`
// process inside its host's namespace. A host is cut off by setting its
// switch port down, which drops every packet both ways without telling
// either end (like a pulled cable behind a switch).
//
// Case 1: hostB is cut off for three liveness windows. The coordinator must
// declare rollout-0 dead and re-queue its prompts (its log says how many;
// rollout-1 on hostA takes them), and after the link returns rollout-0 must
// be healthy again and pull and deliver new work, with the registry's
// membership unchanged.
// Case 2: the coordinator's host is cut off for three windows: every actor
// is dead in its eyes; after the link returns every one of them registers
// again, healthy, and the registry holds the same actors as before.
//
// Needs root (CAP_NET_ADMIN) and iproute2; skips when `ip netns add` fails.
// Namespaces carry this process's pid in their names, so parallel runs do not
// clash, and a guard deletes them (and kills the actors) on every path.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support/proc_util.h"

namespace grove {
namespace {

using nlohmann::json;
using testing::GroveBinary;
using testing::ReadFile;
using testing::RunCapture;
using testing::Spawn;
using testing::WaitExit;
using testing::WaitFor;

constexpr const char* kIp = "/usr/sbin/ip";
constexpr int kHeartbeatMs = 200;
constexpr int kLivenessMisses = 5;  // the coordinator's liveness window: 1 s
constexpr int kCutMs = 3 * kHeartbeatMs * kLivenessMisses;

bool Ip(const std::vector<std::string>& args, std::string* out = nullptr) {
  std::vector<std::string> argv = {kIp};
  argv.insert(argv.end(), args.begin(), args.end());
  int rc = -1;
  std::string text = RunCapture(argv, &rc, /*with_stderr=*/true);
  if (out != nullptr) *out = text;
  return rc == 0;
}

// Namespaces, links and the processes inside them; undone in the destructor.
class NetLab {
 public:
  NetLab() : prefix_("gv" + std::to_string(getpid() % 1000000)) {}
  ~NetLab() {
    for (int pid : pids_) kill(pid, SIGKILL);
    for (int pid : pids_) WaitExit(pid, 5000);
    for (auto it = namespaces_.rbegin(); it != namespaces_.rend(); ++it) Ip({"netns", "del", *it});
  }

  std::string Name(const std::string& host) const { return prefix_ + host; }

  // Adds a namespace; false (with why) when the kernel or permissions refuse.
  bool AddNamespace(const std::string& host, std::string* why) {
    const std::string ns = Name(host);
    if (!Ip({"netns", "add", ns}, why)) return false;
    namespaces_.push_back(ns);
    return Ip({"-n", ns, "link", "set", "lo", "up"}, why);
  }

  // Joins `host` to the switch's bridge with `address`/24 on its eth0; the
  // switch-side end is named "p" + host.
  bool Attach(const std::string& host, const std::string& address, std::string* why) {
    const std::string sw = Name("sw"), ns = Name(host), port = "p" + host;
    return Ip({"-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns}, why) &&
           Ip({"-n", sw, "link", "set", port, "master", "br0"}, why) &&
           Ip({"-n", sw, "link", "set", port, "up"}, why) &&
           Ip({"-n", ns, "addr", "add", address + "/24", "dev", "eth0"}, why) &&
           Ip({"-n", ns, "link", "set", "eth0", "up"}, why);
  }

  bool Build(std::string* why) {
    if (!AddNamespace("sw", why)) return false;
    if (!Ip({"-n", Name("sw"), "link", "add", "br0", "type", "bridge"}, why) ||
        !Ip({"-n", Name("sw"), "link", "set", "br0", "up"}, why))
      return false;
    for (const auto& [host, address] : std::vector<std::pair<std::string, std::string>>{
             {"coord", "10.77.0.1"}, {"hostA", "10.77.0.2"}, {"hostB", "10.77.0.3"}}) {
      if (!AddNamespace(host, why) || !Attach(host, address, why)) return false;
    }
    return true;
  }

  // Cuts (up = false) or restores a host's switch port.
  void SetLink(const std::string& host, bool up) {
    std::string why;
    ASSERT_TRUE(Ip({"-n", Name("sw"), "link", "set", "p" + host, up ? "up" : "down"}, &why)) << why;
  }

  // Runs argv inside host's namespace, output to log; returns the pid.
  int Start(const std::string& host, std::vector<std::string> argv, const std::string& log) {
    std::vector<std::string> full = {kIp, "netns", "exec", Name(host)};
    full.insert(full.end(), argv.begin(), argv.end());
    const int pid = Spawn(full, log);
    pids_.push_back(pid);
    return pid;
  }

  // Runs argv inside host's namespace to completion; returns stdout.
  std::string Run(const std::string& host, std::vector<std::string> argv, int* rc) {
    std::vector<std::string> full = {kIp, "netns", "exec", Name(host)};
    full.insert(full.end(), argv.begin(), argv.end());
    return RunCapture(full, rc);
  }

 private:
  std::string prefix_;
  std::vector<std::string> namespaces_;
  std::vector<int> pids_;
};

// The cluster of the header, shared by the cases (starting it costs a
// warm-start; the cases leave it whole).
class NetworkFaults : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    lab_ = new NetLab();
    std::string why;
    if (!lab_->Build(&why)) {
      skip_reason_ = "network namespaces unavailable here: " + why;
      return;
    }
    dir_ = testing::MakeTempDir();
    const std::string config = std::string(std::getenv("GROVE_SOURCE_DIR") ? std::getenv("GROVE_SOURCE_DIR") : ".") +
                               "/configs/smoke.toml";
    // A short liveness window; a learner that warms up in seconds and then
    // trains for longer than the test lives. No staleness gate: workers then
    // always hold leased prompts (sampling, or waiting for room in the
    // store), so a cut-off worker has prompts to reassign.
    const std::vector<std::string> sets = {
        "--set=coordinator.prompts_per_step=0",
        "--set=coordinator.heartbeat_interval_ms=" + std::to_string(kHeartbeatMs),
        "--set=coordinator.liveness_misses=" + std::to_string(kLivenessMisses),
        "--set=coordinator.metrics_bind=\"off\"",
        "--set=learner.warmstart_steps=20",
        "--set=learner.steps=100000",
        "--set=learner.eval_every=0",
        "--set=learner.eval_problems=4",
        "--set=learner.checkpoint_every=100000"};
    auto with_sets = [&](std::vector<std::string> argv) {
      argv.insert(argv.end(), sets.begin(), sets.end());
      return argv;
    };
    const std::string endpoint_file = dir_ + "/coordinator.endpoint";
    lab_->Start("coord",
                with_sets({GroveBinary(), "run", "coordinator", "--id=coordinator", "--bind=tcp://10.77.0.1:0",
                           "--config=" + config, "--endpoint_file=" + endpoint_file, "--run_dir=" + dir_}),
                dir_ + "/coordinator.log");
    ASSERT_TRUE(WaitFor([&] { return !ReadFile(endpoint_file).empty(); }, 20000)) << ReadFile(dir_ + "/coordinator.log");
    coordinator_ = ReadFile(endpoint_file);
    while (!coordinator_.empty() && std::isspace(static_cast<unsigned char>(coordinator_.back()))) coordinator_.pop_back();
    auto actor = [&](const std::string& host, const std::string& role, const std::string& id, const std::string& ip) {
      std::vector<std::string> argv = {GroveBinary(), "run", role, "--id=" + id, "--coordinator=" + coordinator_,
                                       "--config=" + config, "--run_dir=" + dir_};
      if (role != "rollout") argv.push_back("--bind=tcp://" + ip + ":0");
      lab_->Start(host, with_sets(argv), dir_ + "/" + id + ".log");
    };
    actor("hostA", "replay", "replay-0", "10.77.0.2");
    actor("hostA", "learner", "learner-0", "10.77.0.2");
    actor("hostA", "verifier", "verifier-0", "10.77.0.2");
    actor("hostA", "rollout", "rollout-1", "10.77.0.2");
    actor("hostB", "rollout", "rollout-0", "10.77.0.3");
  }
  static void TearDownTestSuite() {
    delete lab_;
    lab_ = nullptr;
    if (!dir_.empty() && !::testing::Test::HasFailure()) std::filesystem::remove_all(dir_);
  }

  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
    ASSERT_FALSE(coordinator_.empty());
  }

  // `grove status --json`, asked from the coordinator's own host (so it
  // answers even while that host is cut off). Null when it does not answer.
  static json Status() {
    int rc = -1;
    std::string out = lab_->Run("coord", {GroveBinary(), "status", "--json", "--coordinator=" + coordinator_,
                                          "--timeout_ms=2000"}, &rc);
    if (rc != 0) return nullptr;
    json j = json::parse(out, nullptr, false);
    return j.is_discarded() ? json(nullptr) : j;
  }
  static const json* Actor(const json& status, const std::string& id) {
    for (const json& a : status.at("actors"))
      if (a.at("id") == id) return &a;
    return nullptr;
  }
  static std::string State(const json& status, const std::string& id) {
    const json* a = Actor(status, id);
    return a ? a->at("state").get<std::string>() : "absent";
  }
  static double Counter(const json& status, const std::string& id, const std::string& name) {
    const json* a = Actor(status, id);
    return a ? a->at("counters").value(name, 0.0) : 0.0;
  }
  static std::set<std::string> Ids(const json& status) {
    std::set<std::string> ids;
    for (const json& a : status.at("actors")) ids.insert(a.at("id").get<std::string>());
    return ids;
  }
  // Polls status until pred holds (true) or timeout_ms passes (false); *last
  // gets the last answer.
  static bool WaitStatus(const std::function<bool(const json&)>& pred, int timeout_ms, json* last) {
    return WaitFor(
        [&] {
          json s = Status();
          if (s.is_null()) return false;
          *last = s;
          return pred(s);
        },
        timeout_ms);
  }
  // N of the coordinator's "re-queued N prompts of dead <id>" in `log`, or 0.
  static double RequeuedOf(const std::string& log, const std::string& id) {
    const std::regex line("re-queued ([0-9]+) prompts of dead " + id + "\\b");
    std::smatch m;
    return std::regex_search(log, m, line) ? std::stod(m[1].str()) : 0.0;
  }
  static bool AllHealthy(const json& s) {
    for (const json& a : s.at("actors"))
      if (a.at("state") != "healthy") return false;
    return s.at("actors").size() == kActors.size();
  }
  // The whole cluster is up and both rollout workers have delivered groups.
  static void WaitWorking() {
    json s;
    ASSERT_TRUE(WaitStatus(
        [](const json& s) {
          return AllHealthy(s) && Counter(s, "rollout-0", "groups_sent") >= 1 &&
                 Counter(s, "rollout-1", "groups_sent") >= 1;
        },
        120000, &s))
        << s.dump(1) << "\n" << ReadFile(dir_ + "/rollout-0.log");
  }

  static inline const std::set<std::string> kActors = {"replay-0", "learner-0", "verifier-0", "rollout-0",
                                                       "rollout-1"};
  static inline NetLab* lab_ = nullptr;
  static inline std::string skip_reason_;
  static inline std::string dir_;
  static inline std::string coordinator_;
};

TEST_F(NetworkFaults, CutOffRolloutWorkerIsDeclaredDeadItsPromptsReassignedAndItRejoins) {
  WaitWorking();
  // Cut hostB off while the coordinator holds prompts leased to rollout-0
  // (a worker waiting at the staleness gate holds none, and then there is
  // nothing to re-queue). The count is read after the cut, when rollout-0
  // can no longer return any, and before it is declared dead; a worker that
  // returned its prompts just before the cut gets its link back and another
  // try.
  json s;
  double held = 0;
  auto cut_at = std::chrono::steady_clock::now();
  double sent_before = 0, done_before = 0;
  size_t log_at_cut = 0;  // the coordinator log's length at the (last) cut
  for (int attempt = 0; attempt < 10 && held == 0; ++attempt) {
    ASSERT_TRUE(WaitStatus(
        [](const json& s) { return State(s, "rollout-0") == "healthy" && Counter(s, "rollout-0", "prompts_leased") >= 1; },
        60000, &s))
        << s.dump(1);
    sent_before = Counter(s, "rollout-0", "groups_sent");
    done_before = s.at("cluster").value("prompts_done", 0.0);
    log_at_cut = ReadFile(dir_ + "/coordinator.log").size();
    const auto cut_start = std::chrono::steady_clock::now();
    lab_->SetLink("hostB", false);
    cut_at = std::chrono::steady_clock::now();
    // What was already on its way to the coordinator lands first.
    std::this_thread::sleep_for(std::chrono::milliseconds(kHeartbeatMs / 2));
    json after = Status();
    ASSERT_FALSE(after.is_null());
    const bool dead_already = State(after, "rollout-0") == "dead";
    if (!dead_already) {
      held = Counter(after, "rollout-0", "prompts_leased");
    } else {
      // rollout-0 was declared dead, and its prompts re-queued, before they
      // could be counted: on a loaded machine (CI failed so, 5 cuts in a
      // row; reproduced with 3 spinning processes on 2 cores) the status 100
      // ms after the cut returned already said "dead". The coordinator's log
      // says how many it re-queued.
      held = RequeuedOf(ReadFile(dir_ + "/coordinator.log").substr(log_at_cut), "rollout-0");
    }
    if (held == 0) {
      lab_->SetLink("hostB", true);
      std::fprintf(stderr,
                   "rollout-0 held no prompts at the cut (attempt %d; %g leased before it, cutting took %lld ms, "
                   "dead already: %d); again\n",
                   attempt, Counter(s, "rollout-0", "prompts_leased"),
                   static_cast<long long>(
                       std::chrono::duration_cast<std::chrono::milliseconds>(cut_at - cut_start).count()),
                   dead_already ? 1 : 0);
      WaitWorking();
    }
  }
  ASSERT_GE(held, 1) << "rollout-0 never held prompts when cut off";

  // Dead within the liveness window (plus a sweep and a poll of slack).
  ASSERT_TRUE(WaitStatus([](const json& s) { return State(s, "rollout-0") == "dead"; }, 4 * kHeartbeatMs * kLivenessMisses,
                         &s))
      << s.dump(1);
  // Exactly the prompts it held went back to the queue, and the worker on
  // hostA takes them and keeps finishing prompts meanwhile.
  const std::string coord_log = ReadFile(dir_ + "/coordinator.log").substr(log_at_cut);
  const std::string requeued = "re-queued " + std::to_string(static_cast<int>(held)) + " prompts of dead rollout-0";
  EXPECT_NE(coord_log.find(requeued), std::string::npos) << requeued << "\n" << coord_log;
  EXPECT_TRUE(WaitStatus(
      [&](const json& s) {
        return State(s, "rollout-1") == "healthy" && s.at("cluster").value("prompts_done", 0.0) > done_before &&
               s.at("cluster").value("prompt_queue_depth", -1.0) == 0;
      },
      30000, &s))
      << "the re-queued prompts were not taken by rollout-1: " << s.dump(1);
  // Everyone else is untouched by the cut.
  for (const std::string id : {"replay-0", "learner-0", "verifier-0", "rollout-1"}) EXPECT_EQ(State(s, id), "healthy") << id;
  std::this_thread::sleep_until(cut_at + std::chrono::milliseconds(kCutMs));

  lab_->SetLink("hostB", true);
  // Back: healthy again (it registers anew) and pulling and delivering work.
  EXPECT_TRUE(WaitStatus(
      [&](const json& s) { return State(s, "rollout-0") == "healthy" && Counter(s, "rollout-0", "groups_sent") > sent_before; },
      60000, &s))
      << s.dump(1) << "\n" << ReadFile(dir_ + "/rollout-0.log");
  EXPECT_EQ(Ids(s), kActors);
  EXPECT_TRUE(AllHealthy(s)) << s.dump(1);
}

TEST_F(NetworkFaults, CoordinatorCutOffAndBackLosesNoRegistration) {
  WaitWorking();
  json before = Status();
  ASSERT_FALSE(before.is_null());
  ASSERT_EQ(Ids(before), kActors);
  const double step_before = before.at("cluster").value("learner_step", 0.0);

  lab_->SetLink("coord", false);
  const auto cut_at = std::chrono::steady_clock::now();
  json s;
  // Seen from its own host, the coordinator loses every actor.
  EXPECT_TRUE(WaitStatus(
      [](const json& s) {
        for (const json& a : s.at("actors"))
          if (a.at("state") != "dead") return false;
        return true;
      },
      4 * kHeartbeatMs * kLivenessMisses, &s))
      << s.dump(1);
  std::this_thread::sleep_until(cut_at + std::chrono::milliseconds(kCutMs));

  lab_->SetLink("coord", true);
  // Every actor registers again: the same five, all healthy, and training
  // goes on.
  EXPECT_TRUE(WaitStatus([](const json& s) { return AllHealthy(s); }, 60000, &s)) << s.dump(1);
  EXPECT_EQ(Ids(s), kActors);
  EXPECT_TRUE(WaitStatus([&](const json& s) { return s.at("cluster").value("learner_step", 0.0) > step_before; }, 60000,
                         &s))
      << s.dump(1);
}

}  // namespace
}  // namespace grove
