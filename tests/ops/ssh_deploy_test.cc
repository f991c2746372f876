// deploy/ssh.sh against this machine's own sshd on loopback: the test starts
// an sshd of its own (its own host key, config and port; the current user
// logs in with a key generated here), starts a cluster over ssh on two
// "hosts" (127.0.0.1 and localhost) with the test actor standing in for
// every role but the coordinator, checks placement and health through
// `grove status --json`, and stops it with `ssh.sh down`. Skips with a clear
// message where sshd, ssh or ssh-keygen are not installed.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/support/proc_util.h"

namespace grove {
namespace {

using testing::FreePort;
using testing::RunCapture;
using testing::WaitFor;

bool Accepts(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

// Ended: no such process, or a zombie waiting for init to reap it (the
// actors ssh.sh starts are not this test's children).
bool Gone(int pid) {
  if (kill(pid, 0) != 0) return true;
  std::string stat = testing::ReadFile("/proc/" + std::to_string(pid) + "/stat");
  const auto paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z';
}

std::string Which(const std::vector<std::string>& candidates) {
  for (const auto& c : candidates) {
    if (access(c.c_str(), X_OK) == 0) return c;
  }
  return "";
}

class SshDeploy : public ::testing::Test {
 protected:
  void SetUp() override {
    sshd_bin_ = Which({"/usr/sbin/sshd", "/usr/local/sbin/sshd"});
    ssh_bin_ = Which({"/usr/bin/ssh", "/usr/local/bin/ssh"});
    keygen_ = Which({"/usr/bin/ssh-keygen", "/usr/local/bin/ssh-keygen"});
    if (sshd_bin_.empty() || ssh_bin_.empty() || keygen_.empty()) {
      GTEST_SKIP() << "sshd, ssh or ssh-keygen not installed (Debian: openssh-server "
                      "openssh-client, listed in deploy/install-deps.sh); the ssh deploy path "
                      "is not tested here";
    }
    dir_ = testing::MakeTempDir();
    int code = -1;
    for (const char* key : {"host_key", "client_key"}) {
      std::string out = RunCapture({keygen_, "-q", "-t", "ed25519", "-N", "", "-f",
                                    dir_ + "/" + key}, &code, true);
      ASSERT_EQ(code, 0) << out;
    }
    std::filesystem::copy_file(dir_ + "/client_key.pub", dir_ + "/authorized_keys");
    port_ = FreePort();
    std::ofstream(dir_ + "/sshd_config")
        << "ListenAddress 127.0.0.1\n"
        << "HostKey " << dir_ << "/host_key\n"
        << "AuthorizedKeysFile " << dir_ << "/authorized_keys\n"
        << "PidFile " << dir_ << "/sshd.pid\n"
        << "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        << "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        << "StrictModes no\nUsePAM no\n";
    // As root sshd wants its privilege separation directory.
    if (geteuid() == 0) std::filesystem::create_directories("/run/sshd");
    sshd_pid_ = testing::Spawn({sshd_bin_, "-D", "-e", "-f", dir_ + "/sshd_config", "-p",
                                std::to_string(port_)},
                               dir_ + "/sshd.log");
    ASSERT_TRUE(WaitFor([&] { return Accepts(port_); }, 10000))
        << "sshd did not start:\n" << testing::ReadFile(dir_ + "/sshd.log");
    ssh_ = ssh_bin_ + " -p " + std::to_string(port_) + " -i " + dir_ +
           "/client_key -o BatchMode=yes -o StrictHostKeyChecking=no"
           " -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR";
    std::string out = RunCapture({"/bin/sh", "-c", ssh_ + " 127.0.0.1 echo ok"}, &code, true);
    ASSERT_EQ(out, "ok\n") << "ssh to the test's own sshd failed:\n"
                           << out << "\nsshd log:\n" << testing::ReadFile(dir_ + "/sshd.log");
  }
  void TearDown() override {
    // Whatever a failed test left running, by the pids ssh.sh recorded.
    std::ifstream actors(dir_ + "/state/actors.tsv");
    std::string host, role, id;
    int pid = 0;
    while (actors >> host >> role >> id >> pid) kill(pid, SIGKILL);
    if (sshd_pid_ > 0) {
      kill(sshd_pid_, SIGTERM);
      testing::WaitExit(sshd_pid_, 5000);
    }
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  std::string Script() { return std::string(std::getenv("GROVE_SOURCE_DIR")) + "/deploy/ssh.sh"; }

  std::string sshd_bin_, ssh_bin_, keygen_, dir_, ssh_;
  int port_ = 0, sshd_pid_ = 0;
};

TEST_F(SshDeploy, UpOnTwoHostsThenDown) {
  const std::string actor = testing::TestActorBinary();
  const std::string config = dir_ + "/exp.toml";
  std::ofstream(config) << "[cluster]\nreplay = 1\nlearner = 1\nrollout = 2  # two\nverifier = 1\n"
                           "[coordinator]\nheartbeat_interval_ms = 100\n";
  const int cluster_port = FreePort();
  const std::string state = dir_ + "/state";
  int code = -1;
  std::vector<std::string> up = {Script(), "up", "--hosts", "127.0.0.1 localhost", "--config",
                                 config, "--port", std::to_string(cluster_port), "--state", state,
                                 "--grove", testing::GroveBinary(), "--ssh", ssh_};
  for (const char* role : {"replay", "learner", "rollout", "verifier"}) {
    up.push_back("--program");
    up.push_back(std::string(role) + "=" + actor);
  }
  std::string out = RunCapture(up, &code, true);
  ASSERT_EQ(code, 0) << out << "\nsshd log:\n" << testing::ReadFile(dir_ + "/sshd.log");

  // Placement: coordinator, replay and learner on the first host; the
  // workers on the second.
  std::map<std::string, std::pair<std::string, int>> placed;  // id -> (host, pid)
  {
    std::ifstream actors(state + "/actors.tsv");
    std::string host, role, id;
    int pid = 0;
    while (actors >> host >> role >> id >> pid) placed[id] = {host, pid};
  }
  ASSERT_EQ(placed.size(), 6u) << testing::ReadFile(state + "/actors.tsv");
  for (const char* id : {"coordinator", "replay-0", "learner-0"}) {
    EXPECT_EQ(placed[id].first, "127.0.0.1") << id;
  }
  for (const char* id : {"rollout-0", "rollout-1", "verifier-0"}) {
    EXPECT_EQ(placed[id].first, "localhost") << id;
  }

  // Every actor registered with the coordinator under the pid ssh.sh saw.
  const std::string coordinator = "tcp://127.0.0.1:" + std::to_string(cluster_port);
  nlohmann::json status;
  auto healthy = [&] {
    int c = -1;
    std::string s = RunCapture({testing::GroveBinary(), "status", "--json", "--coordinator",
                                coordinator}, &c);
    status = c == 0 ? nlohmann::json::parse(s, nullptr, false) : nlohmann::json();
    if (!status.is_object()) return false;
    int n = 0;
    for (const auto& a : status["actors"]) n += a["state"] == "healthy" ? 1 : 0;
    return n == 5;
  };
  ASSERT_TRUE(WaitFor(healthy, 20000)) << status.dump(2);
  for (const auto& a : status["actors"]) {
    const std::string id = a["id"];
    ASSERT_TRUE(placed.count(id)) << id;
    EXPECT_EQ(a["pid"], placed[id].second) << id;
    EXPECT_EQ(a["role"], id.substr(0, id.find('-')));
  }
  // The first host's run directory works with grove status and grove logs.
  out = RunCapture({testing::GroveBinary(), "status", "--run_dir", state}, &code, true);
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(out.rfind("cluster  5/5 up", 0), 0u) << out;
  out = RunCapture({testing::GroveBinary(), "logs", "coordinator", "--run_dir", state}, &code, true);
  EXPECT_EQ(code, 0);
  EXPECT_NE(out.find("coordinator serving at"), std::string::npos) << out;
  out = RunCapture({Script(), "status", "--state", state}, &code, true);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("rollout-1"), std::string::npos) << out;

  // Down: every process ends on SIGTERM, none needs SIGKILL.
  out = RunCapture({Script(), "down", "--state", state, "--timeout", "20"}, &code, true);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("down: 6 processes stopped, 0 needed SIGKILL"), std::string::npos) << out;
  for (const auto& [id, where] : placed) {
    EXPECT_TRUE(Gone(where.second)) << id << " pid " << where.second << " still runs";
  }
  out = RunCapture({Script(), "down", "--state", state}, &code, true);
  EXPECT_EQ(code, 2);  // nothing left to stop
  EXPECT_NE(out.find("holds no cluster"), std::string::npos) << out;
}

TEST_F(SshDeploy, UpRefusesBadArguments) {
  int code = -1;
  std::string out = RunCapture({Script(), "up", "--config", "/nonexistent.toml"}, &code, true);
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--hosts is required"), std::string::npos) << out;
  out = RunCapture({Script(), "up", "--hosts", "127.0.0.1", "--config", "/nonexistent.toml"},
                   &code, true);
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("cannot read config"), std::string::npos) << out;
  out = RunCapture({Script(), "sideways"}, &code, true);
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("unknown command 'sideways'"), std::string::npos) << out;
  // An unreachable host: a clear message, nothing recorded.
  std::ofstream(dir_ + "/c.toml") << "[cluster]\nrollout = 1\n";
  out = RunCapture({Script(), "up", "--hosts", "127.0.0.1", "--config", dir_ + "/c.toml", "--state",
                    dir_ + "/st", "--ssh", ssh_bin_ + " -p 1 -o BatchMode=yes -o ConnectTimeout=5"},
                   &code, true);
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("cannot reach 127.0.0.1 over ssh"), std::string::npos) << out;
}

}  // namespace
}  // namespace grove
