// deploy/slurm/grove.sbatch and grove-join.sbatch run for real against a
// Slurm cluster the test starts on this machine: its own munged (key,
// socket, log in a temp dir), a slurmctld and two slurmd "nodes" (node0 and
// node1, both this host on their own ports), non-default ports everywhere.
// Two nodes, not one: Slurm's backfill scheduler, the only one that starts
// heterogeneous jobs, plans whole nodes, so the two components of
// grove.sbatch can never start together on a single node.
//
// The job is the real script with the smoke config, shortened through the
// script's GROVE_SET and sized to fit on the command line (component 0 on
// one node, up to two rollout workers on the other). The test checks that
// every actor registers and is healthy in `grove status --json`, that a
// worker from grove-join.sbatch joins and drains on scancel, that the verifier's
// reward latency shows in status and /metrics, that the learner trains its
// steps, and that Slurm records the job as completed with exit code 0.
// Skips where the Slurm or munge binaries are missing or the daemons cannot
// start here (with their log tails).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support/proc_util.h"
#include "tests/ops/http_get.h"
#include "tests/ops/prometheus_parse.h"

namespace grove {
namespace {

using testing::FreePort;
using testing::ReadFile;
using testing::RunCapture;
using testing::WaitFor;

std::string Which(const std::string& name) {
  for (const char* dir : {"/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin"}) {
    const std::string path = std::string(dir) + "/" + name;
    if (access(path.c_str(), X_OK) == 0) return path;
  }
  return "";
}

std::string Tail(const std::string& path, size_t bytes = 3000) {
  const std::string s = ReadFile(path);
  return path + ":\n" + (s.size() > bytes ? "..." + s.substr(s.size() - bytes) : s) + "\n";
}

// For processes that are not this test's children (the job's actors).
bool Alive(int pid) { return pid > 0 && kill(pid, 0) == 0; }

// For this test's children: true once it has exited; reaps it and clears
// *pid so that nothing signals a recycled pid later.
bool Exited(int* pid) {
  int status = 0;
  if (*pid <= 0) return true;
  if (waitpid(*pid, &status, WNOHANG) != *pid) return false;
  *pid = 0;
  return true;
}

// `Key=Value` out of scontrol's or slurmd -C's output ("" when absent).
std::string Field(const std::string& text, const std::string& key) {
  std::smatch m;
  if (std::regex_search(text, m, std::regex("(^|\\s)" + key + "=(\\S*)"))) return m[2];
  return "";
}

class SlurmDeploy : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : {"munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol",
                             "sinfo", "squeue"}) {
      bin_[name] = Which(name);
      if (bin_[name].empty()) {
        GTEST_SKIP() << "'" << name << "' not installed (Debian: slurm-wlm and munge, listed in "
                     << "deploy/install-deps.sh); the Slurm deploy path is not tested here";
      }
    }
    if (geteuid() != 0) {
      GTEST_SKIP() << "slurmd launches jobs only as root and this test runs as uid " << geteuid()
                   << "; the Slurm deploy path is not tested here";
    }
    dir_ = testing::MakeTempDir();
    chmod(dir_.c_str(), 0755);  // munged wants its socket's directory searchable
    for (const char* sub : {"munge", "state", "log", "work", "spool/node0", "spool/node1"}) {
      std::filesystem::create_directories(dir_ + "/" + sub);
    }
    chmod((dir_ + "/munge").c_str(), 0755);

    // munge: a fresh key, our own socket.
    int code = -1;
    const std::string key = dir_ + "/munge/munge.key";
    std::string out = RunCapture({bin_["mungekey"], "--create", "--keyfile", key}, &code, true);
    ASSERT_EQ(code, 0) << out;
    chmod(key.c_str(), 0400);
    munge_socket_ = dir_ + "/munge/munge.socket";
    munged_pid_ = testing::Spawn({bin_["munged"], "--foreground", "--socket", munge_socket_, "--key-file", key,
                                  "--log-file", dir_ + "/log/munged.log", "--pid-file", dir_ + "/munge/munged.pid",
                                  "--seed-file", dir_ + "/munge/munged.seed", "--force"},
                                 dir_ + "/log/munged.out");
    if (!WaitFor([&] { return std::filesystem::exists(munge_socket_) || Exited(&munged_pid_); }, 10000) ||
        Exited(&munged_pid_)) {
      GTEST_SKIP() << "munged does not start here:\n"
                   << Tail(dir_ + "/log/munged.out") << Tail(dir_ + "/log/munged.log");
    }

    // slurm.conf: this machine's CPUs and memory (slurmd -C) for each node.
    const std::string hw = RunCapture({bin_["slurmd"], "-C"}, &code, true);
    const std::string cpus = Field(hw, "CPUs"), memory = Field(hw, "RealMemory");
    ASSERT_FALSE(cpus.empty() || memory.empty()) << "slurmd -C: " << hw;
    rollout_tasks_ = std::stoi(cpus) >= 2 ? 2 : 1;  // component 1 fits on one node
    conf_ = dir_ + "/slurm.conf";
    // slurmctld and both slurmds on distinct ports: with a shared one, node1's
    // slurmd got node0's step launch ("Invalid node name specified", CI).
    const std::vector<int> ports = testing::FreePorts(3);
    std::ofstream conf(conf_);
    conf << "ClusterName=grovetest\n"
         << "SlurmctldHost=localhost\n"
         << "SlurmctldPort=" << ports[0] << "\n"
         << "SlurmUser=root\nSlurmdUser=root\n"
         << "AuthType=auth/munge\nCredType=cred/munge\n"
         << "AuthInfo=socket=" << munge_socket_ << "\n"
         << "StateSaveLocation=" << dir_ << "/state\n"
         << "SlurmdSpoolDir=" << dir_ << "/spool/%n\n"
         << "SlurmctldPidFile=" << dir_ << "/slurmctld.pid\n"
         << "SlurmdPidFile=" << dir_ << "/slurmd-%n.pid\n"
         << "SlurmctldLogFile=" << dir_ << "/log/slurmctld.log\n"
         << "SlurmdLogFile=" << dir_ << "/log/slurmd-%n.log\n"
         << "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
         << "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
         << "JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
         << "JobCompType=jobcomp/none\nMpiDefault=none\n"
         << "ReturnToService=2\nSlurmdTimeout=120\nInactiveLimit=0\nKillWait=10\n"
         << "MinJobAge=600\n"  // keeps finished jobs in scontrol show job
         << "SchedulerType=sched/backfill\nSchedulerParameters=bf_interval=1\n";
    for (int n = 0; n < 2; ++n) {
      conf << "NodeName=node" << n << " NodeHostname=localhost NodeAddr=127.0.0.1 Port=" << ports[1 + n]
           << " CPUs=" << cpus << " RealMemory=" << memory << " State=UNKNOWN\n";
    }
    // OverSubscribe: the join job shares a node with the running job.
    conf << "PartitionName=grove Nodes=node0,node1 Default=YES MaxTime=30 DefaultTime=30 "
            "OverSubscribe=FORCE:4 State=UP\n";
    conf.close();
    setenv("SLURM_CONF", conf_.c_str(), 1);

    ctld_pid_ = testing::Spawn({bin_["slurmctld"], "-D", "-i", "-f", conf_}, dir_ + "/log/slurmctld.out");
    for (int n = 0; n < 2; ++n) {
      const std::string node = "node" + std::to_string(n);
      slurmd_pids_.push_back(
          testing::Spawn({bin_["slurmd"], "-D", "-N", node, "-f", conf_}, dir_ + "/log/slurmd-" + node + ".out"));
    }
    std::string nodes;
    const bool idle = WaitFor(
        [&] {
          int c = -1;
          nodes = RunCapture({bin_["sinfo"], "-h", "-N", "-o", "%N %t"}, &c, true);
          return c == 0 && nodes.find("node0 idle") != std::string::npos &&
                 nodes.find("node1 idle") != std::string::npos;
        },
        30000);
    // A daemon that exits here is a failure, not a skip: with the binaries
    // present and root, what stops it is this test's configuration.
    ASSERT_TRUE(idle) << "the Slurm nodes did not become idle; sinfo:\n"
                      << nodes << Tail(dir_ + "/log/slurmctld.out") << Tail(dir_ + "/log/slurmd-node0.out")
                      << Tail(dir_ + "/log/slurmd-node1.out");
  }

  void TearDown() override {
    if (dir_.empty()) return;
    if (!conf_.empty()) {
      int code = -1;
      for (const std::string& job : jobs_) RunCapture({bin_["scancel"], job}, &code, true);
      WaitFor(
          [&] {
            int c = -1;
            return RunCapture({bin_["squeue"], "-h"}, &c, true).empty() && c == 0;
          },
          30000);
    }
    // Whatever a failed run left behind, by the pids the actors reported.
    for (int pid : actor_pids_) {
      if (Alive(pid)) kill(pid, SIGKILL);
    }
    for (int pid : slurmd_pids_) Stop(pid);
    Stop(ctld_pid_);
    Stop(munged_pid_);
    std::filesystem::remove_all(dir_);
  }

  static void Stop(int pid) {
    if (pid <= 0) return;
    kill(pid, SIGTERM);
    if (!testing::WaitExit(pid, 10000)) {
      kill(pid, SIGKILL);
      testing::WaitExit(pid, 5000);
    }
  }

  // sbatch --parsable with `env` added to this process's environment (the
  // job gets it; GROVE_BIN means the binary to the scripts but the bin
  // directory to the tests, hence set only around the call). The job id, or
  // "" on failure with the output in *out.
  std::string Submit(const std::vector<std::string>& args, const std::map<std::string, std::string>& env,
                     std::string* out) {
    std::map<std::string, std::optional<std::string>> saved;
    for (const auto& [k, v] : env) {
      const char* old = std::getenv(k.c_str());
      saved[k] = old ? std::optional<std::string>(old) : std::nullopt;
      setenv(k.c_str(), v.c_str(), 1);
    }
    std::vector<std::string> argv = {bin_["sbatch"], "--parsable"};
    argv.insert(argv.end(), args.begin(), args.end());
    int code = -1;
    // Submitted from work/: the scripts put their run directory and output
    // under the submit directory.
    const auto cwd = std::filesystem::current_path();
    std::filesystem::current_path(dir_ + "/work");
    *out = RunCapture(argv, &code, true);
    std::filesystem::current_path(cwd);
    for (const auto& [k, v] : saved) {
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
    std::smatch m;
    if (code != 0 || !std::regex_search(*out, m, std::regex("^([0-9]+)"))) return "";
    jobs_.push_back(m[1]);
    return m[1];
  }

  nlohmann::json Status(const std::string& coordinator) {
    int code = -1;
    const std::string out =
        RunCapture({testing::GroveBinary(), "status", "--json", "--coordinator", coordinator}, &code);
    nlohmann::json status = code == 0 ? nlohmann::json::parse(out, nullptr, false) : nlohmann::json();
    if (!status.is_object()) return nlohmann::json();
    for (const auto& a : status["actors"]) actor_pids_.insert(a.value("pid", 0));
    return status;
  }

  static const nlohmann::json* Find(const nlohmann::json& status, const std::string& id) {
    if (!status.is_object()) return nullptr;
    for (const auto& a : status["actors"]) {
      if (a.value("id", "") == id) return &a;
    }
    return nullptr;
  }
  static double Counter(const nlohmann::json& status, const std::string& id, const std::string& name) {
    const auto* a = Find(status, id);
    return a && (*a)["counters"].contains(name) ? (*a)["counters"][name].get<double>() : -1;
  }

  // Every component's JobState, from scontrol show job.
  std::vector<std::string> JobStates(const std::string& job, std::string* text) {
    int code = -1;
    *text = RunCapture({bin_["scontrol"], "show", "job", job}, &code, true);
    std::vector<std::string> states;
    std::regex re("JobState=(\\S+)");
    for (auto it = std::sregex_iterator(text->begin(), text->end(), re); it != std::sregex_iterator(); ++it) {
      states.push_back((*it)[1]);
    }
    return states;
  }

  // Waits until no component of `job` is pending or running any more.
  bool WaitEnded(const std::string& job, int timeout_ms, std::vector<std::string>* states, std::string* text) {
    return WaitFor(
        [&] {
          *states = JobStates(job, text);
          if (states->empty()) return false;
          for (const auto& s : *states) {
            if (s == "PENDING" || s == "RUNNING" || s == "CONFIGURING" || s == "COMPLETING") return false;
          }
          return true;
        },
        timeout_ms);
  }

  std::string Logs(const std::string& run_dir) {
    std::string s;
    for (const char* id : {"coordinator", "learner-0", "replay-0", "verifier-0", "rollout-0", "rollout-1"}) {
      s += Tail(run_dir + "/logs/" + id + ".log", 1500);
    }
    return s + Tail(dir_ + "/log/slurmctld.log", 1500);
  }

  std::map<std::string, std::string> bin_;
  std::string dir_, conf_, munge_socket_;
  int munged_pid_ = 0, ctld_pid_ = 0;
  std::vector<int> slurmd_pids_;
  std::vector<std::string> jobs_;
  std::set<int> actor_pids_;
  int rollout_tasks_ = 2;
};

TEST_F(SlurmDeploy, HeterogeneousJobRegistersTrainsJoinsAndCompletes) {
  const std::string source = std::getenv("GROVE_SOURCE_DIR");
  const int port = FreePort();
  // The smoke experiment, shortened: no warm-start, small steps. More steps
  // than the test waits for: it ends the run itself (scancel --signal=TERM,
  // the learner drains), so that the join below never races the run's end.
  const std::string overrides =
      "learner.steps=100000 learner.warmstart_steps=0 learner.eval_every=0 learner.eval_problems=8 learner.max_new_tokens=12"
      " learner.batch_groups=4 coordinator.prompts_per_step=4 replay.min_size_to_serve=4"
      " rollout.group_size=4 rollout.max_new_tokens=12 coordinator.heartbeat_interval_ms=200";
  const std::map<std::string, std::string> env = {{"GROVE_CONFIG", source + "/configs/smoke.toml"},
                                                   {"GROVE_BIN", testing::GroveBinary()},
                                                   {"GROVE_PORT", std::to_string(port)},
                                                   {"GROVE_SET", overrides},
                                                   {"GROVE_VERIFIERS", "1"}};
  unsetenv("GROVE_RUN_DIR");

  // Component 0 (coordinator, replay, verifier, learner) on one node, a
  // rollout worker per CPU (up to two) on the other: the script's
  // components, sized to fit.
  std::string out;
  const std::string job = Submit({"--cpus-per-task=1", "--mem=1G", ":", "--nodes=1",
                                  "--ntasks-per-node=" + std::to_string(rollout_tasks_),
                                  "--cpus-per-task=1", "--mem=1G", source + "/deploy/slurm/grove.sbatch"},
                                 env, &out);
  ASSERT_FALSE(job.empty()) << "sbatch failed: " << out;
  const std::string run_dir = dir_ + "/work/runs/slurm-" + job;
  std::string job_text;
  ASSERT_TRUE(WaitFor([&] { return std::filesystem::exists(run_dir + "/cluster.json"); }, 60000))
      << "job " << job << " wrote no cluster.json; states " << ::testing::PrintToString(JobStates(job, &job_text))
      << "\n" << job_text << Tail(dir_ + "/work/grove-" + job + ".out") << Tail(dir_ + "/log/slurmctld.log");
  nlohmann::json info;
  ASSERT_TRUE(WaitFor(
      [&] {
        info = nlohmann::json::parse(ReadFile(run_dir + "/cluster.json"), nullptr, false);
        return info.is_object();
      },
      5000));
  const std::string coordinator = info.value("coordinator", "");
  ASSERT_EQ(coordinator.rfind("tcp://", 0), 0u) << info.dump();
  ASSERT_EQ(coordinator.substr(coordinator.rfind(':') + 1), std::to_string(port)) << info.dump();

  // Every role of the job registers and is healthy.
  std::vector<std::string> ids = {"replay-0", "verifier-0", "learner-0"};
  for (int t = 0; t < rollout_tasks_; ++t) ids.push_back("rollout-" + std::to_string(t));
  nlohmann::json status;
  auto all_healthy = [&](const std::vector<std::string>& want) {
    status = Status(coordinator);
    for (const auto& id : want) {
      const auto* a = Find(status, id);
      if (!a || (*a)["state"] != "healthy") return false;
    }
    return true;
  };
  ASSERT_TRUE(WaitFor([&] { return all_healthy(ids); }, 90000)) << status.dump(2) << Logs(run_dir);
  for (const auto& id : ids) {
    const auto& a = *Find(status, id);
    EXPECT_EQ(a["role"], id.substr(0, id.find('-'))) << id;
    EXPECT_GT(a["pid"].get<int>(), 0) << id;
  }

  // A worker of its own job joins the running cluster, with the run's
  // overrides read from the run directory...
  const std::string join = Submit({"--cpus-per-task=1", "--mem=512M", source + "/deploy/slurm/grove-join.sbatch"},
                                  {{"GROVE_RUN_DIR", run_dir}, {"GROVE_BIN", testing::GroveBinary()}}, &out);
  ASSERT_FALSE(join.empty()) << "sbatch grove-join failed: " << out;
  const std::string joined = "rollout-" + join + "-0";
  ASSERT_TRUE(WaitFor([&] { return all_healthy({joined}); }, 60000))
      << status.dump(2) << Tail(run_dir + "/logs/" + joined + ".log") << Tail(dir_ + "/work/grove-rollout-" + join + ".out");

  // ... while the learner trains and the verifier reports reward latency.
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(coordinator);
        return Counter(status, "learner-0", "step") >= 3 && Counter(status, "verifier-0", "reward_latency_count") > 0;
      },
      120000))
      << status.dump(2) << Logs(run_dir);
  const double p50 = Counter(status, "verifier-0", "reward_latency_p50_ms");
  const double p99 = Counter(status, "verifier-0", "reward_latency_p99_ms");
  // Scoring a group of 4 short sums: well above zero, far below the 2 s
  // per-sample timeout of the config.
  EXPECT_GT(p50, 0) << status.dump(2);
  EXPECT_GE(p99, p50);
  EXPECT_LT(p99, 4 * 2000.0);
  EXPECT_GT(Counter(status, "verifier-0", "reward_latency_sum_ms"), 0);
  // Generation done -> scored: same host, same clock; under the heartbeat
  // deadlines of the run, and counted for every scored group.
  EXPECT_GE(Counter(status, "verifier-0", "rollout_to_scored_p50_ms"), 0);
  EXPECT_LT(Counter(status, "verifier-0", "rollout_to_scored_p99_ms"), 60000);
  EXPECT_EQ(Counter(status, "verifier-0", "rollout_to_scored_count"),
            Counter(status, "verifier-0", "reward_latency_count"));

  // /metrics, where the script recorded it, carries the same latency as a summary.
  const std::string url = info.value("metrics", "");
  ASSERT_EQ(url.rfind("http://", 0), 0u) << info.dump();
  const std::string response = testing::HttpGet(url);
  ASSERT_EQ(testing::HttpCode(response), 200) << response;
  auto samples = testing::ParseExposition(testing::HttpBody(response));
  ASSERT_TRUE(samples.ok()) << samples.status();
  const std::string l = "role=\"verifier\",id=\"verifier-0\"";
  for (const char* q : {"0.5", "0.99"}) {
    auto it = samples->find("grove_verifier_reward_latency_seconds{" + l + ",quantile=\"" + q + "\"}");
    ASSERT_NE(it, samples->end()) << q << "\n" << testing::HttpBody(response);
    EXPECT_GT(it->second, 0) << q;
    EXPECT_LT(it->second, 8.0) << q;
  }
  auto count = samples->find("grove_verifier_reward_latency_seconds_count{" + l + "}");
  ASSERT_NE(count, samples->end());
  EXPECT_GE(count->second, 1);
  EXPECT_EQ(samples->count("grove_actor_pid{role=\"rollout\",id=\"" + joined + "\"}"), 1u);

  // scancel --signal=TERM drains the joined worker: it leaves as stopped,
  // not dead, and its job completes.
  int code = -1;
  out = RunCapture({bin_["scancel"], "--signal=TERM", join}, &code, true);
  ASSERT_EQ(code, 0) << out;
  ASSERT_TRUE(WaitFor(
      [&] {
        status = Status(coordinator);
        const auto* a = Find(status, joined);
        return a && (*a)["state"] == "stopped";
      },
      60000))
      << status.dump(2) << Tail(run_dir + "/logs/" + joined + ".log");
  std::vector<std::string> states;
  ASSERT_TRUE(WaitEnded(join, 60000, &states, &job_text)) << job_text;
  EXPECT_EQ(states, std::vector<std::string>{"COMPLETED"}) << job_text;
  EXPECT_NE(ReadFile(run_dir + "/logs/" + joined + ".log").find("stopping: exit 0"), std::string::npos)
      << Tail(run_dir + "/logs/" + joined + ".log");

  // The run ends: SIGTERM to the job's steps drains the learner (exit 0)
  // and the workers; the script stops the rest, and Slurm records the job
  // as completed with the learner's exit code.
  out = RunCapture({bin_["scancel"], "--signal=TERM", job}, &code, true);
  ASSERT_EQ(code, 0) << out;
  ASSERT_TRUE(WaitEnded(job, 90000, &states, &job_text)) << job_text << Logs(run_dir);
  ASSERT_EQ(states.size(), 2u) << job_text;  // two components
  for (const auto& s : states) EXPECT_EQ(s, "COMPLETED") << job_text << Logs(run_dir);
  EXPECT_EQ(Field(job_text, "ExitCode"), "0:0") << job_text;
  const std::string batch_out = ReadFile(dir_ + "/work/grove-" + job + ".out");
  EXPECT_NE(batch_out.find("learner exited with 0"), std::string::npos) << batch_out;
  std::smatch done;
  const std::string learner_log = ReadFile(run_dir + "/logs/learner-0.log");
  ASSERT_TRUE(std::regex_search(learner_log, done, std::regex("learner done at step ([0-9]+)")))
      << Tail(run_dir + "/logs/learner-0.log");
  EXPECT_GE(std::stoi(done[1]), 3);
  // Every actor drained and exited 0: none was killed.
  for (const auto& id : ids) {
    EXPECT_NE(ReadFile(run_dir + "/logs/" + id + ".log").find("stopping: exit 0"), std::string::npos)
        << Tail(run_dir + "/logs/" + id + ".log");
  }
  EXPECT_NE(ReadFile(run_dir + "/logs/coordinator.log").find("coordinator stopped"), std::string::npos);
  // Nothing the jobs started outlives them.
  for (int pid : actor_pids_) EXPECT_FALSE(Alive(pid)) << "pid " << pid << " still runs";
}

// The script's own ending: the learner trains its steps and exits; the
// script drains the workers (through Slurm, so that srun does not kill
// them) and the rest, and the job completes with exit code 0. The script's
// defaults otherwise: two verifiers, GROVE_RUN_DIR given.
TEST_F(SlurmDeploy, JobEndsWhenTheLearnerHasTrainedItsSteps) {
  const std::string source = std::getenv("GROVE_SOURCE_DIR");
  const std::string run_dir = dir_ + "/work/natural";
  const std::map<std::string, std::string> env = {
      {"GROVE_CONFIG", source + "/configs/smoke.toml"},
      {"GROVE_BIN", testing::GroveBinary()},
      {"GROVE_PORT", std::to_string(FreePort())},
      {"GROVE_RUN_DIR", run_dir},
      {"GROVE_SET",
       "learner.steps=4 learner.warmstart_steps=0 learner.eval_every=0 learner.eval_problems=8 "
       "learner.max_new_tokens=12 learner.batch_groups=4 coordinator.prompts_per_step=4 "
       "replay.min_size_to_serve=4 rollout.group_size=4 rollout.max_new_tokens=12"}};
  std::string out;
  const std::string job = Submit({"--cpus-per-task=1", "--mem=1G", ":", "--nodes=1", "--ntasks-per-node=1",
                                  "--cpus-per-task=1", "--mem=1G", source + "/deploy/slurm/grove.sbatch"},
                                 env, &out);
  ASSERT_FALSE(job.empty()) << "sbatch failed: " << out;
  std::vector<std::string> states;
  std::string job_text;
  ASSERT_TRUE(WaitEnded(job, 120000, &states, &job_text)) << job_text << Logs(run_dir);
  ASSERT_EQ(states.size(), 2u) << job_text;
  for (const auto& s : states) EXPECT_EQ(s, "COMPLETED") << job_text << Logs(run_dir);
  EXPECT_EQ(Field(job_text, "ExitCode"), "0:0") << job_text;
  EXPECT_NE(ReadFile(run_dir + "/logs/learner-0.log").find("learner done at step 4"), std::string::npos)
      << Tail(run_dir + "/logs/learner-0.log");
  for (const char* id : {"learner-0", "replay-0", "verifier-0", "verifier-1", "rollout-0"}) {
    EXPECT_NE(ReadFile(run_dir + "/logs/" + id + ".log").find("stopping: exit 0"), std::string::npos)
        << Tail(run_dir + "/logs/" + std::string(id) + ".log") << Tail(dir_ + "/work/grove-" + job + ".out");
  }
  EXPECT_NE(ReadFile(run_dir + "/logs/coordinator.log").find("coordinator stopped"), std::string::npos);
  const std::string batch_out = ReadFile(dir_ + "/work/grove-" + job + ".out");
  EXPECT_NE(batch_out.find("learner exited with 0"), std::string::npos) << batch_out;
  EXPECT_EQ(batch_out.find("Killed"), std::string::npos) << batch_out;
  EXPECT_TRUE(std::filesystem::exists(run_dir + "/checkpoints/latest")) << run_dir;
}

}  // namespace
}  // namespace grove
