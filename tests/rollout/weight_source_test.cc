// The worker's weight sources against a real WeightPublisher over loopback:
// chunks for a worker on another GPU (or none), an IPC announce only for a
// worker whose GPU UUID is the learner's, and the probe that decides.
#include "rollout/weight_fetch.h"

#include <random>

#include <gtest/gtest.h>

#include "learner/weight_publisher.h"

namespace grove::rollout {
namespace {

std::shared_ptr<actors::WeightSnapshot> RandomSnapshot(int64_t version, uint64_t seed) {
  auto s = std::make_shared<actors::WeightSnapshot>();
  s->version = version;
  s->tensors = {{"a", {64, 96}, 0, 64 * 96}, {"b", {1000}, 64 * 96, 1000}};
  s->flat.resize(64 * 96 + 1000);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0, 1);
  for (float& x : s->flat) x = n(rng);
  s->checksum = actors::WeightChecksum(s->flat.data(), s->flat.size());
  return s;
}

// A device copy that is not on a device: the test's stand-in for
// IpcWeightExport, announcing a handle no CUDA call accepts.
class FakeDeviceExport : public learner::DeviceWeightExport {
 public:
  const std::string& device_uuid() const override { return uuid_; }
  bool wanted() const override { return wanted_; }
  Status Publish(const actors::WeightSnapshot& s, const float*) override {
    if (!wanted_) return Status::OK();
    version_ = s.version;
    ++publishes_;
    return Status::OK();
  }
  Status Export(const actors::WeightSnapshot& s) override {
    wanted_ = true;
    version_ = s.version;
    ++exports_;
    return Status::OK();
  }
  bool FillAnnounce(const actors::WeightSnapshot& s, wire::WeightAnnounce::Builder out) override {
    if (s.version != version_) return false;
    actors::FillWeightAnnounce(s, 4096, out);
    static const char kHandle[] = "not-a-handle";
    out.setIpcHandle(kj::arrayPtr(reinterpret_cast<const kj::byte*>(kHandle), sizeof kHandle - 1));
    out.setIpcDevice(0);
    ++announces_;
    return true;
  }
  std::string uuid_ = std::string("GPU-UUID-0123456", 16);
  int64_t version_ = -1;
  bool wanted_ = false;
  int publishes_ = 0, exports_ = 0, announces_ = 0;
};

TEST(WeightSource, ProbeAndFetchByGpu) {
  auto pub = learner::WeightPublisher::Start("tcp://127.0.0.1:0", "learner-0", 4096);
  ASSERT_TRUE(pub.ok()) << pub.status();
  auto fake = std::make_unique<FakeDeviceExport>();
  FakeDeviceExport* dev = fake.get();
  (*pub)->SetDeviceExport(std::move(fake));
  actors::RpcClient rpc("rollout-0");
  ASSERT_TRUE(rpc.Connect((*pub)->endpoint()).ok());

  // Nothing published yet: the probe fails (the worker asks again later).
  EXPECT_FALSE(ProbeLearnerWeights(rpc, 2000).ok());

  auto v1 = RandomSnapshot(1, 1);
  (*pub)->Publish(v1);
  EXPECT_EQ(dev->publishes_, 0) << "lazy: no worker on the learner's GPU has asked";
  auto info = ProbeLearnerWeights(rpc, 2000);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->version, 1);
  EXPECT_EQ(info->device_uuid, dev->uuid_);

  // Another GPU (or none): chunks, bit for bit.
  FetchOptions other;
  other.device_uuid = std::string("GPU-UUID-9999999", 16);
  auto got = FetchNewerWeights(rpc, -1, other);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->version, 1);
  EXPECT_EQ((*got)->flat, v1->flat);
  EXPECT_EQ(dev->announces_, 0);
  FetchOptions plain;
  auto got_plain = FetchNewerWeights(rpc, -1, plain);
  ASSERT_TRUE(got_plain.ok() && got_plain->has_value());
  EXPECT_EQ((*got_plain)->flat, v1->flat);

  // The learner's GPU: the announce carries the handle and the worker goes
  // the IPC way (which this fake handle cannot pass: the error says IPC).
  FetchOptions same;
  same.device_uuid = dev->uuid_;
  same.ipc_device = 0;
  auto ipc = FetchNewerWeights(rpc, -1, same);
  EXPECT_EQ(dev->exports_, 1) << "the first same-GPU request exports the current version";
  EXPECT_EQ(dev->announces_, 1);
  ASSERT_FALSE(ipc.ok());
  EXPECT_NE(ipc.status().ToString().find("IPC"), std::string::npos) << ipc.status();
  // Holding the newest already: nothing, and no announce of a handle.
  auto none = FetchNewerWeights(rpc, 1, same);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  EXPECT_EQ(dev->announces_, 1);
  // Asked once: every later version is copied as it is published.
  (*pub)->Publish(RandomSnapshot(2, 2));
  EXPECT_EQ(dev->publishes_, 1);
  EXPECT_EQ(dev->exports_, 1);
}

TEST(WeightSource, ZmqTransportFetchesFromThePublisher) {
  auto cfg = Config::Parse("[weights]\ntransport = \"zmq\"\n", "test.toml");
  ASSERT_TRUE(cfg.ok());
  auto src = WeightSource::Start(*cfg, "rollout-0", "tcp://127.0.0.1:1", 0, FetchOptions());
  ASSERT_TRUE(src.ok()) << src.status();
  EXPECT_EQ((*src)->name(), "zmq");
  EXPECT_TRUE((*src)->needs_learner());
  auto nothing = (*src)->TakeNewer(nullptr, -1);
  ASSERT_TRUE(nothing.ok());
  EXPECT_FALSE(nothing->has_value());

  auto pub = learner::WeightPublisher::Start("tcp://127.0.0.1:0", "learner-0", 4096);
  ASSERT_TRUE(pub.ok());
  auto v3 = RandomSnapshot(3, 5);
  (*pub)->Publish(v3);
  actors::RpcClient rpc("rollout-0");
  ASSERT_TRUE(rpc.Connect((*pub)->endpoint()).ok());
  auto got = (*src)->TakeNewer(&rpc, -1);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->version, 3);
  EXPECT_EQ((*got)->flat, v3->flat);
  auto again = (*src)->TakeNewer(&rpc, 3);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());
}

TEST(WeightSource, NcclWithoutAGpuIsAClearError) {
  auto cfg = Config::Parse("[weights]\ntransport = \"nccl\"\n", "test.toml");
  ASSERT_TRUE(cfg.ok());
  auto src = WeightSource::Start(*cfg, "rollout-0", "tcp://127.0.0.1:1", 0, FetchOptions());
  if (src.ok()) GTEST_SKIP() << "this machine has NCCL and a GPU";
  EXPECT_EQ(src.status().code(), StatusCode::kFailedPrecondition) << src.status();
}

}  // namespace
}  // namespace grove::rollout
