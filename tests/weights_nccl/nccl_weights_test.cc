// The NCCL weight group across processes: a learner process and worker
// processes (one GPU each: NCCL allows one rank per GPU per communicator)
// around an in-process coordinator. Workers check every version bit for bit
// (tests/weights_nccl/weights_peer.h). Skips with fewer GPUs than a case
// needs; the CUDA IPC case needs one.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <fstream>
#include <sstream>
#include <thread>

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include "actors/codec.h"
#include "actors/cuda_ipc.h"
#include "actors/nccl_group.h"
#include "cluster/coordinator.h"
#include "learner/ipc_weight_export.h"
#include "tests/support/proc_util.h"
#include "tests/weights_nccl/weights_peer.h"

namespace grove {
namespace {

using testing::ReadFile;

std::string PeerBinary() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  std::string self(buf, n > 0 ? static_cast<size_t>(n) : 0);
  return self.substr(0, self.rfind('/')) + "/weights_nccl_peer";
}

std::vector<std::string> Lines(const std::string& path) {
  std::vector<std::string> out;
  std::istringstream in(ReadFile(path));
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

int CountPrefix(const std::vector<std::string>& lines, const std::string& prefix) {
  int n = 0;
  for (const auto& l : lines) n += l.rfind(prefix, 0) == 0;
  return n;
}

// Highest version a worker logged as received; -1 if none.
int64_t NewestOk(const std::vector<std::string>& lines) {
  int64_t best = -1;
  for (const auto& l : lines) {
    int64_t v;
    char what[16];
    if (std::sscanf(l.c_str(), "got %ld %15s", &v, what) == 2 && std::string(what) == "ok") best = std::max(best, v);
  }
  return best;
}

class NcclWeightsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    setenv("NCCL_NVLS_ENABLE", "0", 1);  // inherited by every peer
    gpus_ = actors::CudaDeviceCount();
    dir_ = testing::MakeTempDir();
  }
  void TearDown() override {
    for (int pid : pids_) {
      kill(pid, SIGKILL);
      testing::WaitExit(pid, 5000);
    }
    if (serving_.joinable()) {
      stop_ = true;
      serving_.join();
    }
  }
  void StartCoordinator() {
    CoordinatorOptions o;
    o.timing = HealthTiming{50, 2, 6};
    o.first_prompt_id = 1;
    coordinator_ = std::make_unique<Coordinator>(o, nullptr);
    auto ep = coordinator_->Bind();
    ASSERT_TRUE(ep.ok()) << ep.status();
    endpoint_ = *ep;
    serving_ = std::thread([this] { coordinator_->Serve([this] { return stop_.load(); }); });
  }
  int Peer(const std::string& role, const std::string& id, int device, std::vector<std::string> extra) {
    std::vector<std::string> argv{PeerBinary(), "--role=" + role, "--id=" + id, "--coordinator=" + endpoint_,
                                  "--device=" + std::to_string(device), "--seed=" + std::to_string(seed_),
                                  "--out=" + dir_ + "/" + id + ".events"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    int pid = testing::Spawn(argv, dir_ + "/" + id + ".log");
    pids_.push_back(pid);
    return pid;
  }
  std::string Events(const std::string& id) { return dir_ + "/" + id + ".events"; }
  std::string Log(const std::string& id) { return ReadFile(dir_ + "/" + id + ".log"); }

  std::vector<std::string> ExpectEveryVersionBitForBit(const std::vector<std::string>& worker_flags);

  int gpus_ = 0;
  uint64_t seed_ = std::random_device{}();
  std::string dir_, endpoint_;
  std::unique_ptr<Coordinator> coordinator_;
  std::atomic<bool> stop_{false};
  std::thread serving_;
  std::vector<int> pids_;
};

// 1..3 workers (as GPUs allow) receive several versions, each bit for bit,
// in buckets that do not divide the buffer.
TEST_F(NcclWeightsTest, EveryWorkerReceivesEveryVersionBitForBit) {
  if (gpus_ < 2) GTEST_SKIP() << "needs 2 GPUs, found " << gpus_;
  ExpectEveryVersionBitForBit({});
}

// The same with versions kept on the workers' GPUs (a GPU engine installs
// from there): verified on the device, handed out with an empty host copy,
// and each held for 2 s (two to three newer versions arrive meanwhile) and
// compared again: the receiver never writes into the version it handed out.
TEST_F(NcclWeightsTest, VersionsKeptOnTheWorkersGpuAreExactAndStayWhileHeld) {
  if (gpus_ < 2) GTEST_SKIP() << "needs 2 GPUs, found " << gpus_;
  const std::vector<std::string> lines = ExpectEveryVersionBitForBit({"--to_device", "--hold_ms=2000"});
  EXPECT_GE(CountPrefix(lines, "held"), 1);
  bool newer_arrived_while_held = false;
  for (const std::string& l : lines) {
    if (l.rfind("held ", 0) != 0) continue;
    EXPECT_NE(l.find(" ok "), std::string::npos) << l;
    std::istringstream in(l.substr(5));
    int64_t held = -1, newest = -1;
    std::string ok, w1, w2;
    in >> held >> ok >> w1 >> w2 >> newest;
    newer_arrived_while_held = newer_arrived_while_held || newest > held;
  }
  EXPECT_TRUE(newer_arrived_while_held) << "no version arrived while one was held: the test proved nothing";
}

// Runs the learner and 1..3 workers (each with `worker_flags`) until every
// worker holds version 4, checking each worker's every version; returns the
// first worker's event lines.
std::vector<std::string> NcclWeightsTest::ExpectEveryVersionBitForBit(const std::vector<std::string>& worker_flags) {
  StartCoordinator();
  const int workers = std::min(3, gpus_ - 1);
  const std::vector<std::string> common{"--floats=3000001", "--bucket_bytes=1048576", "--versions=4",
                                        "--deadline_ms=5000"};
  auto with = [&](std::vector<std::string> v) {
    v.insert(v.end(), common.begin(), common.end());
    return v;
  };
  std::vector<int> worker_pids;
  for (int w = 0; w < workers; ++w) {
    std::vector<std::string> flags = worker_flags;
    flags.push_back("--run_ms=40000");
    worker_pids.push_back(Peer("worker", "rollout-" + std::to_string(w), w + 1, with(flags)));
  }
  // Let every worker become a candidate before the first epoch forms.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  Peer("learner", "learner", 0, with({"--interval_ms=800", "--run_ms=30000"}));
  std::vector<std::string> first;
  for (int w = 0; w < workers; ++w) {
    int status = -1;
    const std::string id = "rollout-" + std::to_string(w);
    const bool exited = testing::WaitExit(worker_pids[w], 40000, &status);
    EXPECT_TRUE(exited) << Log(id);
    auto lines = Lines(Events(id));
    EXPECT_TRUE(exited && WIFEXITED(status) && WEXITSTATUS(status) == 0) << ReadFile(Events(id)) << Log(id);
    EXPECT_EQ(NewestOk(lines), 4) << ReadFile(Events(id));
    for (const auto& l : lines) EXPECT_EQ(l.find("MISMATCH"), std::string::npos) << l;
    EXPECT_GE(CountPrefix(lines, "got"), 2) << "several versions, not just the last";
    if (w == 0) first = lines;
  }
  return first;
}

// A worker killed by SIGKILL after a version's header (mid-broadcast): the
// learner's deadline fires, it aborts, reports, re-forms and goes on; the
// other worker (a third GPU) or a worker that joins afterwards (two GPUs)
// receives the current version and the ones after it, bit for bit.
TEST_F(NcclWeightsTest, KilledWorkerDoesNotHangTheLearner) {
  if (gpus_ < 2) GTEST_SKIP() << "needs 2 GPUs, found " << gpus_;
  StartCoordinator();
  const std::vector<std::string> common{"--floats=4000000", "--bucket_bytes=1048576", "--versions=6",
                                        "--deadline_ms=4000"};
  auto with = [&](std::vector<std::string> v) {
    v.insert(v.end(), common.begin(), common.end());
    return v;
  };
  const int doomed = Peer("worker", "rollout-doomed", 1, with({"--die_at_version=2", "--run_ms=30000"}));
  int other = -1;
  if (gpus_ >= 3) other = Peer("worker", "rollout-other", 2, with({"--run_ms=40000"}));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const auto t0 = std::chrono::steady_clock::now();
  Peer("learner", "learner", 0, with({"--interval_ms=1500", "--run_ms=20000"}));
  int status = -1;
  ASSERT_TRUE(testing::WaitExit(doomed, 20000, &status)) << ReadFile(Events("rollout-doomed"));
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << ReadFile(Events("rollout-doomed"));
  if (other < 0) other = Peer("worker", "rollout-other", 1, with({"--run_ms=30000"}));  // joins mid-run
  ASSERT_TRUE(testing::WaitExit(other, 40000, &status)) << Log("rollout-other");
  auto lines = Lines(Events("rollout-other"));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << ReadFile(Events("rollout-other"));
  EXPECT_EQ(NewestOk(lines), 6) << ReadFile(Events("rollout-other"));
  for (const auto& l : lines) EXPECT_EQ(l.find("MISMATCH"), std::string::npos) << l;
  // The learner went on, past the death, to a later epoch and version. It
  // learns of the death one of two ways, both seen on two H200s: its
  // broadcast misses the deadline (reported failure), or, when NCCL's
  // buffers swallowed the whole version, the coordinator's health check
  // drops the worker and asks for a new epoch before the next version.
  const std::string learner = ReadFile(Events("learner"));
  EXPECT_TRUE(learner.find("failures 1") != std::string::npos || learner.find("epoch 2 size") != std::string::npos)
      << learner;
  EXPECT_NE(learner.find("sent 6"), std::string::npos) << learner;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(secs, 40.0);
}

// The 2-GPU default run's hang (issue 10): the learner publishes ONE version
// before any worker exists and never another (it waits for samples); the
// worker joins, receives it bit for bit, and installs it as an engine does
// (upload, then a wait for its whole device). A receive posted early for
// the next version would park an NCCL kernel on the worker's GPU that only
// the learner's next version ends, and the install's device wait would
// never return.
TEST_F(NcclWeightsTest, WorkerJoiningAfterTheOnlyVersionGetsAndInstallsIt) {
  if (gpus_ < 2) GTEST_SKIP() << "needs 2 GPUs, found " << gpus_;
  StartCoordinator();
  const std::vector<std::string> common{"--floats=3000017", "--bucket_bytes=1048576", "--versions=1",
                                        "--deadline_ms=5000"};
  auto with = [&](std::vector<std::string> v) {
    v.insert(v.end(), common.begin(), common.end());
    return v;
  };
  Peer("learner", "learner", 0, with({"--run_ms=30000"}));
  ASSERT_TRUE(testing::WaitFor([&] { return CountPrefix(Lines(Events("learner")), "published 1") == 1; }, 15000))
      << ReadFile(Events("learner"));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the version is old news when the worker comes
  const auto t0 = std::chrono::steady_clock::now();
  const int worker = Peer("worker", "rollout-0", 1, with({"--run_ms=20000", "--install"}));
  int status = -1;
  ASSERT_TRUE(testing::WaitExit(worker, 25000, &status)) << ReadFile(Events("rollout-0")) << Log("rollout-0");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto lines = Lines(Events("rollout-0"));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << ReadFile(Events("rollout-0")) << Log("rollout-0");
  EXPECT_EQ(NewestOk(lines), 1) << ReadFile(Events("rollout-0"));
  EXPECT_EQ(CountPrefix(lines, "installed 1 ok"), 1) << ReadFile(Events("rollout-0"));
  // Start, join, one 12 MB version and the install take a few seconds; the
  // worker's own give-up is at 20 s.
  EXPECT_LT(secs, 15.0) << ReadFile(Events("rollout-0"));
}

// With three or more GPUs: a worker that joins mid-run gets the current
// version at the next epoch while the first worker keeps receiving.
TEST_F(NcclWeightsTest, WorkerAddedMidRunReceivesCurrentWeights) {
  if (gpus_ < 3) GTEST_SKIP() << "needs 3 GPUs (with 2, KilledWorkerDoesNotHangTheLearner covers a join)";
  StartCoordinator();
  const std::vector<std::string> common{"--floats=2000003", "--bucket_bytes=524288", "--versions=6",
                                        "--deadline_ms=5000"};
  auto with = [&](std::vector<std::string> v) {
    v.insert(v.end(), common.begin(), common.end());
    return v;
  };
  const int first = Peer("worker", "rollout-first", 1, with({"--run_ms=40000"}));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  Peer("learner", "learner", 0, with({"--interval_ms=1500", "--run_ms=20000"}));
  ASSERT_TRUE(testing::WaitFor([&] { return NewestOk(Lines(Events("rollout-first"))) >= 2; }, 20000));
  const int late = Peer("worker", "rollout-late", 2, with({"--run_ms=30000"}));
  int status = -1;
  for (auto [pid, id] : {std::pair{first, "rollout-first"}, std::pair{late, "rollout-late"}}) {
    ASSERT_TRUE(testing::WaitExit(pid, 40000, &status)) << Log(id);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << ReadFile(Events(id));
    EXPECT_EQ(NewestOk(Lines(Events(id))), 6) << ReadFile(Events(id));
  }
  auto late_lines = Lines(Events("rollout-late"));
  ASSERT_FALSE(late_lines.empty());
  int64_t first_version = -1;
  std::sscanf(late_lines[0].c_str(), "got %ld", &first_version);
  EXPECT_GE(first_version, 2) << "the late worker starts at the version current when it joined";
}

// A slot written as the learner writes it (actors/cuda_ipc.h), freed on
// scope exit.
struct TestSlot {
  void* slot = nullptr;
  uint64_t* scratch = nullptr;
  ~TestSlot() {
    if (slot) cudaFree(slot);
    if (scratch) cudaFree(scratch);
  }
  void Write(const actors::WeightSnapshot& snap) {
    const size_t bytes = snap.flat.size() * sizeof(float);
    if (!slot) {
      ASSERT_EQ(cudaMalloc(&slot, actors::kIpcSlotHeaderBytes + bytes), cudaSuccess);
    }
    if (!scratch) {
      ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&scratch), sizeof(uint64_t)), cudaSuccess);
    }
    Status s = actors::WriteIpcWeightSlot(slot, snap.flat.data(), false, bytes, snap.version, snap.checksum,
                                          scratch, nullptr);
    ASSERT_TRUE(s.ok()) << s;
  }
  std::string Frame(const actors::WeightSnapshot& snap, const std::string& path, bool corrupt = false) {
    capnp::MallocMessageBuilder msg;
    auto announce = actors::InitEnvelope(msg, "learner", 1).getBody().initWeightAnnounce();
    Status s = actors::FillIpcWeightAnnounce(snap, slot, snap.flat.size() * sizeof(float), 0, announce);
    EXPECT_TRUE(s.ok()) << s;
    if (corrupt) announce.setChecksum(snap.checksum ^ 1);
    std::ofstream(path, std::ios::binary) << actors::EncodeFrame(msg);
    return path;
  }
};

// Learner and worker on one GPU: the learner's IPC slot travels as a CUDA
// IPC handle inside a WeightAnnounce frame; another process copies it into
// its own device memory, verifies it there and on the host. A frame whose
// checksum disagrees with the slot is refused.
TEST_F(NcclWeightsTest, CudaIpcMovesWeightsBetweenProcessesOnOneGpu) {
  if (gpus_ < 1) GTEST_SKIP() << "needs a GPU";
  actors::WeightSnapshot snap = testing::PeerWeights(seed_, 7, 5000011);
  const size_t bytes = snap.flat.size() * sizeof(float);
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  TestSlot slot;
  slot.Write(snap);
  for (bool corrupt : {false, true}) {
    const std::string frame_path = slot.Frame(snap, dir_ + "/frame" + std::to_string(corrupt), corrupt);
    const std::string out_path = dir_ + "/flat" + std::to_string(corrupt);
    int code = -1;
    std::string err = testing::RunCapture({PeerBinary(), "--role=ipc_reader", "--frame=" + frame_path,
                                           "--out=" + out_path},
                                          &code, /*with_stderr=*/true);
    if (corrupt) {
      EXPECT_EQ(code, 3) << err;
      EXPECT_NE(err.find("checksum"), std::string::npos) << err;
      continue;
    }
    ASSERT_EQ(code, 0) << err;
    EXPECT_NE(err.find("torn 0"), std::string::npos) << err;
    const std::string got = ReadFile(out_path);
    ASSERT_EQ(got.size(), bytes);
    EXPECT_EQ(std::memcmp(got.data(), snap.flat.data(), bytes), 0);
  }
}

// The learner reuses its slots: here the slot holding version 7 is
// rewritten with version 8 while the reader is half way through its copy.
// The reader must see the torn read (the slot's generation moved), refuse
// to hand out the mixed bytes, and on its retry find version 8 in the slot
// (Aborted: fetch the newest announce); with the announce of 8 it then
// gets version 8 bit for bit.
TEST_F(NcclWeightsTest, CudaIpcTornReadIsDetectedAndFetchedAgain) {
  if (gpus_ < 1) GTEST_SKIP() << "needs a GPU";
  const size_t floats = 3000017;
  actors::WeightSnapshot v7 = testing::PeerWeights(seed_, 7, floats);
  actors::WeightSnapshot v8 = testing::PeerWeights(seed_, 8, floats);
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  TestSlot slot;
  slot.Write(v7);
  const std::string f7 = slot.Frame(v7, dir_ + "/frame7");
  // The announce of 8 names the same slot, as the learner's would once it
  // holds 8; the reader only opens it after the rewrite.
  const std::string f8 = slot.Frame(v8, dir_ + "/frame8");
  const std::string out_path = dir_ + "/flat";
  int code = -1;
  std::string err = testing::RunCapture({PeerBinary(), "--role=ipc_reader", "--frame=" + f7, "--frame2=" + f8,
                                         "--rewrite_with_version=8", "--floats=" + std::to_string(floats),
                                         "--seed=" + std::to_string(seed_), "--out=" + out_path},
                                        &code, /*with_stderr=*/true);
  ASSERT_EQ(code, 0) << err;
  EXPECT_NE(err.find("torn 1"), std::string::npos) << err;
  EXPECT_NE(err.find("holds version 8"), std::string::npos) << err;
  EXPECT_NE(err.find("read version 8"), std::string::npos) << err;
  const std::string got = ReadFile(out_path);
  ASSERT_EQ(got.size(), floats * sizeof(float));
  EXPECT_EQ(std::memcmp(got.data(), v8.flat.data(), got.size()), 0);
}

// The learner's export (learner/ipc_weight_export.h): lazy until a worker on
// its GPU asks; then every version is copied, device to device when the
// caller has the bytes on the GPU; the newest two stay announced; what a
// reader in another process gets is the published version bit for bit.
TEST_F(NcclWeightsTest, IpcExportIsLazyThenCopiesDeviceToDevice) {
  if (gpus_ < 1) GTEST_SKIP() << "needs a GPU";
  const size_t floats = 1000003;
  auto made = learner::IpcWeightExport::Create(0);
  ASSERT_TRUE(made.ok()) << made.status();
  learner::DeviceWeightExport& e = **made;
  auto announce = [&](const actors::WeightSnapshot& snap, const std::string& path) {
    capnp::MallocMessageBuilder msg;
    bool held = e.FillAnnounce(snap, actors::InitEnvelope(msg, "learner", 1).getBody().initWeightAnnounce());
    if (held) std::ofstream(path, std::ios::binary) << actors::EncodeFrame(msg);
    return held;
  };
  actors::WeightSnapshot v1 = testing::PeerWeights(seed_, 1, floats);
  actors::WeightSnapshot v2 = testing::PeerWeights(seed_, 2, floats);
  actors::WeightSnapshot v3 = testing::PeerWeights(seed_, 3, floats);
  ASSERT_TRUE(e.Publish(v1, nullptr).ok());
  EXPECT_FALSE(e.wanted());
  EXPECT_FALSE(announce(v1, dir_ + "/a1")) << "nothing copied before a worker asks";
  ASSERT_TRUE(e.Export(v1).ok());
  EXPECT_TRUE(e.wanted());
  EXPECT_TRUE(announce(v1, dir_ + "/a1"));
  // v2 from "the learner's masters" on the device.
  float* masters = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&masters), floats * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(masters, v2.flat.data(), floats * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_TRUE(e.Publish(v2, masters).ok());
  EXPECT_TRUE(announce(v1, dir_ + "/a1")) << "the newest two stay";
  ASSERT_TRUE(announce(v2, dir_ + "/a2"));
  for (auto [path, snap] : {std::pair{dir_ + "/a1", &v1}, std::pair{dir_ + "/a2", &v2}}) {
    int code = -1;
    const std::string out = path + ".flat";
    std::string err = testing::RunCapture({PeerBinary(), "--role=ipc_reader", "--frame=" + path, "--out=" + out},
                                          &code, /*with_stderr=*/true);
    ASSERT_EQ(code, 0) << err;
    const std::string got = ReadFile(out);
    ASSERT_EQ(got.size(), floats * sizeof(float));
    EXPECT_EQ(std::memcmp(got.data(), snap->flat.data(), got.size()), 0) << path;
  }
  ASSERT_TRUE(e.Publish(v3, nullptr).ok());
  EXPECT_FALSE(announce(v1, dir_ + "/a1")) << "v1's slot now holds v3";
  EXPECT_TRUE(announce(v3, dir_ + "/a3"));
  cudaFree(masters);
}

// Bad input to the group gets a clear error, not a crash or a hang.
TEST(NcclGroup, RejectsBadArguments) {
  auto short_id = actors::NcclGroup::Form("too short", 0, 2, 0, actors::NcclDeadlineIn(100));
  EXPECT_EQ(short_id.status().code(), StatusCode::kInvalidArgument);
  if (actors::CudaDeviceCount() < 1) GTEST_SKIP() << "no GPU for the rest";
  auto id = actors::NcclGroup::NewUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(actors::NcclGroup::Form(*id, 2, 2, 0, actors::NcclDeadlineIn(100)).status().code(),
            StatusCode::kInvalidArgument);
  // Rank 0 of 2 with nobody joining: the deadline ends the wait.
  const auto t0 = std::chrono::steady_clock::now();
  auto lonely = actors::NcclGroup::Form(*id, 0, 2, 0, actors::NcclDeadlineIn(1500));
  EXPECT_EQ(lonely.status().code(), StatusCode::kDeadlineExceeded) << lonely.status();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
}

}  // namespace
}  // namespace grove
