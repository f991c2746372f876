// Socket tests on loopback with ephemeral ports: request/reply, timeouts,
// late replies, unreachable peers, malformed multipart messages.
#include "actors/rpc_client.h"
#include "actors/socket.h"

#include <thread>

#include <gtest/gtest.h>

namespace grove::actors {
namespace {

std::string StatusRequestFrame(capnp::MallocMessageBuilder& msg, const char* sender) {
  InitEnvelope(msg, sender, 0).getBody().initStatusRequest();
  return EncodeFrame(msg);
}

// Answers `count` requests with commandReply{matched = request number},
// delaying the first `slow` of them by delay_ms.
void Serve(RouterSocket* server, int count, int slow, int delay_ms) {
  for (int i = 0; i < count;) {
    auto in = server->Receive(2000);
    if (!in) return;
    auto frame = DecodeFrame(in->payload.data(), in->payload.size(), {BodyKind::STATUS_REQUEST},
                             &server->stats());
    if (!frame.ok()) continue;
    ++i;
    if (i <= slow) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    capnp::MallocMessageBuilder reply;
    InitEnvelope(reply, "server", frame->envelope().getRequestId())
        .getBody()
        .initCommandReply()
        .setMatched(static_cast<uint32_t>(i));
    (void)server->Send(in->peer, EncodeFrame(reply));
  }
}

TEST(Sockets, EphemeralPortRequestReply) {
  RouterSocket server;
  auto endpoint = server.Bind("tcp://127.0.0.1:0");
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  EXPECT_EQ(endpoint->rfind("tcp://127.0.0.1:", 0), 0u);
  EXPECT_NE(*endpoint, "tcp://127.0.0.1:0");
  RouterSocket second;
  auto other = second.Bind("tcp://127.0.0.1:0");
  ASSERT_TRUE(other.ok());
  EXPECT_NE(*other, *endpoint);
  // Binding the same port twice is an error, not a crash.
  RouterSocket clash;
  EXPECT_EQ(clash.Bind(*endpoint).status().code(), StatusCode::kIOError);

  std::thread t(Serve, &server, 3, 0, 0);
  RpcClient client("c");
  ASSERT_TRUE(client.Connect(*endpoint).ok());
  for (uint32_t i = 1; i <= 3; ++i) {
    capnp::MallocMessageBuilder msg;
    InitEnvelope(msg, "c", 0).getBody().initStatusRequest();
    auto reply = client.Call(msg, {BodyKind::COMMAND_REPLY}, 2000);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->envelope().getBody().getCommandReply().getMatched(), i);
    EXPECT_EQ(std::string(reply->envelope().getSender().cStr()), "server");
  }
  t.join();
}

TEST(Sockets, TimeoutThenLateReplyIsNotMistakenForTheNext) {
  RouterSocket server;
  auto endpoint = server.Bind("tcp://127.0.0.1:0");
  ASSERT_TRUE(endpoint.ok());
  std::thread t(Serve, &server, 2, 1, 300);
  RpcClient client("c");
  ASSERT_TRUE(client.Connect(*endpoint).ok());
  capnp::MallocMessageBuilder first;
  InitEnvelope(first, "c", 0).getBody().initStatusRequest();
  auto r1 = client.Call(first, {BodyKind::COMMAND_REPLY}, 100);
  EXPECT_EQ(r1.status().code(), StatusCode::kDeadlineExceeded);
  capnp::MallocMessageBuilder second;
  InitEnvelope(second, "c", 0).getBody().initStatusRequest();
  auto r2 = client.Call(second, {BodyKind::COMMAND_REPLY}, 3000);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->envelope().getBody().getCommandReply().getMatched(), 2u);
  t.join();
}

TEST(Sockets, NoServerTimesOutQuickly) {
  // Reserve a port, then close it so nothing listens there.
  std::string endpoint;
  {
    RouterSocket s;
    endpoint = *s.Bind("tcp://127.0.0.1:0");
  }
  RpcClient client("c");
  ASSERT_TRUE(client.Connect(endpoint).ok());
  capnp::MallocMessageBuilder msg;
  InitEnvelope(msg, "c", 0).getBody().initStatusRequest();
  const int64_t start = MonotonicMs();
  auto r = client.Call(msg, {BodyKind::COMMAND_REPLY}, 150);
  EXPECT_FALSE(r.ok());
  EXPECT_LT(MonotonicMs() - start, 1000);
  EXPECT_EQ(client.Connect("not-an-endpoint").code(), StatusCode::kInvalidArgument);
}

TEST(Sockets, RouterReportsVanishedPeerAndMultipartGarbage) {
  RouterSocket server;
  auto endpoint = server.Bind("tcp://127.0.0.1:0");
  ASSERT_TRUE(endpoint.ok());
  EXPECT_EQ(server.Send("no-such-peer", "x").code(), StatusCode::kUnavailable);

  DealerSocket raw;
  ASSERT_TRUE(raw.Connect(*endpoint).ok());
  // Two-part message: not a grove frame.
  zmq::message_t a("ab", 2), b("cd", 2);
  raw.raw().send(a, zmq::send_flags::sndmore);
  raw.raw().send(b, zmq::send_flags::none);
  capnp::MallocMessageBuilder msg;
  ASSERT_TRUE(raw.Send(StatusRequestFrame(msg, "raw"), 1000).ok());
  auto in = server.Receive(2000);
  ASSERT_TRUE(in.has_value());
  EXPECT_TRUE(DecodeFrame(in->payload.data(), in->payload.size(), {BodyKind::STATUS_REQUEST},
                          nullptr).ok());
  EXPECT_EQ(server.stats().Get(FrameError::kGarbage), 1u);
}

}  // namespace
}  // namespace grove::actors
