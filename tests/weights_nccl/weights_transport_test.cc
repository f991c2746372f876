// The [weights] section: defaults, every key, and clear errors for unknown
// keys and out-of-range values.
#include "actors/weights_transport.h"
#include "learner/weight_publisher.h"
#include "rollout/weight_fetch.h"

#include <gtest/gtest.h>

namespace grove::actors {
namespace {

Result<WeightsTransportOptions> Read(const std::string& toml) {
  auto c = Config::Parse(toml);
  if (!c.ok()) return c.status();
  return WeightsTransportOptions::FromConfig(*c);
}

TEST(WeightsTransport, DefaultsAreZmqWith64MiBBuckets) {
  auto o = Read("");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->transport, WeightTransport::kZmq);
  EXPECT_EQ(o->bucket_bytes, uint64_t{64} << 20);
  EXPECT_EQ(o->deadline_ms, 30000);
}

TEST(WeightsTransport, ReadsEveryKey) {
  auto o = Read("[weights]\ntransport = \"nccl\"\nbucket_mb = 128\ndeadline_ms = 5000\npoll_ms = 20\n");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->transport, WeightTransport::kNccl);
  EXPECT_EQ(o->bucket_bytes, uint64_t{128} << 20);
  EXPECT_EQ(o->deadline_ms, 5000);
  EXPECT_EQ(o->poll_ms, 20);
}

TEST(WeightsTransport, AutoResolvesByWhatThisProcessHas) {
  auto o = Read("[weights]\ntransport = \"auto\"\n");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->Choose(true), WeightTransport::kNccl);
  EXPECT_EQ(*o->Choose(false), WeightTransport::kZmq);
  auto z = Read("[weights]\ntransport = \"zmq\"\n");
  EXPECT_EQ(*z->Choose(true), WeightTransport::kZmq) << "an explicit choice stands";
  auto n = Read("[weights]\ntransport = \"nccl\"\n");
  EXPECT_EQ(n->Choose(false).status().code(), StatusCode::kFailedPrecondition)
      << "nccl asked for where it cannot run: a clear error, not a silent fallback";
}

TEST(WeightsTransport, RejectsBadInput) {
  for (const char* bad : {"[weights]\ntransport = \"udp\"\n", "[weights]\nbucket_mb = 0\n",
                          "[weights]\nbucket_mb = 256\n", "[weights]\ndeadline_ms = 10\n",
                          "[weights]\npoll_ms = 0\n", "[weights]\ndeadline_ms = 1000\npoll_ms = 600\n",
                          "[weights]\nbucket_bytes = 4096\n", "[weights]\ntransport = 3\n"}) {
    auto o = Read(bad);
    EXPECT_FALSE(o.ok()) << bad;
  }
  auto unknown = Read("[weights]\nbukcet_mb = 64\n");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("bukcet_mb"), std::string::npos) << unknown.status();
}

}  // namespace
}  // namespace grove::actors

// What the learner and the rollout worker start from [weights]: nothing
// extra for zmq; for nccl where it cannot run, an error at start.
namespace grove {
namespace {

TEST(WeightsTransportInRoles, ZmqStartsNoNcclSide) {
  auto c = Config::Parse("[weights]\ntransport = \"zmq\"\n");
  ASSERT_TRUE(c.ok());
  auto b = learner::StartWeightBroadcast(*c, "learner", "tcp://127.0.0.1:1");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, nullptr);
  auto f = rollout::StartWeightFeed(*c, "rollout-0", "tcp://127.0.0.1:1");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f, nullptr);
}

TEST(WeightsTransportInRoles, BadSectionIsAnErrorAtStart) {
  auto c = Config::Parse("[weights]\ntransport = \"nccl\"\nbucket_mb = 9999\n");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(learner::StartWeightBroadcast(*c, "l", "tcp://127.0.0.1:1").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(rollout::StartWeightFeed(*c, "r", "tcp://127.0.0.1:1").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove
