// Message-plane benchmark over TCP loopback, through the real runtime
// (RouterSocket / DealerSocket, EncodeFrame / DecodeFrame with validation):
//   1. round-trip latency of a small control message (heartbeat -> ack),
//   2. one-way throughput of 1 KiB and 1 MiB WeightChunk messages, where the
//      sender builds and encodes every message and the receiver decodes and
//      validates every one.
// Prints a table. Usage: message_plane_bench [--quick]
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "actors/codec.h"
#include "actors/socket.h"

namespace grove::actors {
namespace {

double NowUs() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Latency(int rounds) {
  RouterSocket server;
  const std::string endpoint = *server.Bind("tcp://127.0.0.1:0");
  std::thread echo([&] {
    for (int i = 0; i < rounds; ++i) {
      auto in = server.Receive(5000);
      if (!in) return;
      auto frame = DecodeFrame(in->payload.data(), in->payload.size(), {BodyKind::HEARTBEAT},
                               &server.stats());
      if (!frame.ok()) continue;
      capnp::MallocMessageBuilder reply;
      auto ack = InitEnvelope(reply, "server", frame->envelope().getRequestId())
                     .getBody()
                     .initHeartbeatAck();
      ack.setKnown(true);
      (void)server.Send(in->peer, EncodeFrame(reply));
    }
  });
  DealerSocket client;
  (void)client.Connect(endpoint);
  std::vector<double> us;
  us.reserve(rounds);
  for (int i = 0; i < rounds; ++i) {
    const double t0 = NowUs();
    capnp::MallocMessageBuilder msg;
    auto hb = InitEnvelope(msg, "client", static_cast<uint64_t>(i)).getBody().initHeartbeat();
    hb.setState(wire::ActorState::HEALTHY);
    auto counters = hb.initCounters(4);
    for (unsigned k = 0; k < 4; ++k) {
      counters[k].setName("counter");
      counters[k].setValue(k);
    }
    (void)client.Send(EncodeFrame(msg), 5000);
    auto reply = client.Receive(5000);
    if (!reply) break;
    auto frame = DecodeFrame(reply->data(), reply->size(), {BodyKind::HEARTBEAT_ACK}, nullptr);
    if (!frame.ok()) break;
    us.push_back(NowUs() - t0);
  }
  echo.join();
  const size_t warm = us.size() / 10;  // first 10%: connection setup, cold caches
  std::vector<double> v(us.begin() + static_cast<long>(warm), us.end());
  std::sort(v.begin(), v.end());
  auto pct = [&](double p) { return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))]; };
  double sum = 0;
  for (double x : v) sum += x;
  std::printf("%-34s %8zu  p50 %7.1f us  p99 %7.1f us  p99.9 %7.1f us  mean %7.1f us\n",
              "round trip (heartbeat -> ack)", v.size(), pct(0.50), pct(0.99), pct(0.999),
              sum / static_cast<double>(v.size()));
}

// The same round trip with raw 64-byte ZeroMQ messages and no codec: the
// transport's (and this machine's scheduling) share of the figure above.
void RawLatency(int rounds) {
  RouterSocket server;
  const std::string endpoint = *server.Bind("tcp://127.0.0.1:0");
  std::thread echo([&] {
    for (int i = 0; i < rounds; ++i) {
      auto in = server.Receive(5000);
      if (!in) return;
      (void)server.Send(in->peer, std::string(64, 'a'));
    }
  });
  DealerSocket client;
  (void)client.Connect(endpoint);
  std::vector<double> v;
  for (int i = 0; i < rounds; ++i) {
    const double t0 = NowUs();
    (void)client.Send(std::string(64, 'q'), 5000);
    if (!client.Receive(5000)) break;
    v.push_back(NowUs() - t0);
  }
  echo.join();
  v.erase(v.begin(), v.begin() + static_cast<long>(v.size() / 10));
  std::sort(v.begin(), v.end());
  auto pct = [&](double p) { return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))]; };
  std::printf("%-34s %8zu  p50 %7.1f us  p99 %7.1f us  p99.9 %7.1f us\n",
              "round trip, raw zmq, no codec", v.size(), pct(0.50), pct(0.99), pct(0.999));
}

// CPU cost of the codec alone (build + encode + decode with validation).
void CodecCost(size_t payload_bytes, int messages) {
  std::vector<kj::byte> data(payload_bytes, 7);
  const double t0 = NowUs();
  size_t total = 0;
  for (int i = 0; i < messages; ++i) {
    capnp::MallocMessageBuilder msg(static_cast<unsigned>(payload_bytes / 8 + 64));
    auto chunk = InitEnvelope(msg, "learner", static_cast<uint64_t>(i)).getBody().initWeightChunk();
    chunk.adoptData(msg.getOrphanage().referenceExternalData(
        capnp::Data::Reader(data.data(), data.size())));
    std::string frame = EncodeFrame(msg);
    auto owned = std::make_shared<std::string>(std::move(frame));
    auto decoded = DecodeFrame(owned, owned->data(), owned->size(), {BodyKind::WEIGHT_CHUNK}, nullptr);
    total += decoded.ok() ? decoded->envelope().getBody().getWeightChunk().getData().size() : 0;
  }
  const double us = (NowUs() - t0) / messages;
  char label[64];
  std::snprintf(label, sizeof(label), "codec only, %zu B payload", payload_bytes);
  std::printf("%-34s %8d  %7.2f us/msg  %7.3f GB/s\n", label, messages, us,
              static_cast<double>(total) / (us * messages) / 1e3);
}

void Throughput(size_t payload_bytes, int messages) {
  SocketOptions options;
  options.send_hwm = 64;
  options.recv_hwm = 64;
  RouterSocket server(options);
  const std::string endpoint = *server.Bind("tcp://127.0.0.1:0");
  std::atomic<int> received{0};
  std::atomic<uint64_t> bytes{0};
  double t_first = 0, t_last = 0;
  std::thread sink([&] {
    for (int i = 0; i < messages; ++i) {
      auto in = server.Receive(10000);
      if (!in) return;
      auto frame = DecodeMessage(std::move(in->payload), {BodyKind::WEIGHT_CHUNK}, &server.stats());
      if (!frame.ok()) return;
      if (i == 0) t_first = NowUs();
      bytes += frame->envelope().getBody().getWeightChunk().getData().size();
      received = i + 1;
    }
    t_last = NowUs();
  });
  DealerSocket client(options);
  (void)client.Connect(endpoint);
  std::vector<kj::byte> data(payload_bytes);  // operator new: word-aligned
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<kj::byte>(i * 131);
  const double t0 = NowUs();
  for (int i = 0; i < messages; ++i) {
    capnp::MallocMessageBuilder msg(static_cast<unsigned>(payload_bytes / 8 + 64));
    auto chunk = InitEnvelope(msg, "learner", static_cast<uint64_t>(i)).getBody().initWeightChunk();
    chunk.setVersion(1);
    chunk.setOffset(static_cast<uint64_t>(i) * payload_bytes);
    // Referenced, not copied: EncodeFrame makes the one copy.
    chunk.adoptData(msg.getOrphanage().referenceExternalData(
        capnp::Data::Reader(data.data(), data.size())));
    if (!client.Send(EncodeFrame(msg), 10000).ok()) break;
  }
  sink.join();
  const double seconds = (t_last - t0) / 1e6;
  const double gbps = static_cast<double>(bytes.load()) / seconds / 1e9;
  char label[64];
  std::snprintf(label, sizeof(label), "throughput %zu B messages", payload_bytes);
  std::printf("%-34s %8d  %9.0f msg/s  %7.3f GB/s payload\n", label, received.load(),
              received.load() / seconds, gbps);
  (void)t_first;
}

}  // namespace
}  // namespace grove::actors

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  grove::actors::KeepLargeBuffersInProcess();  // as every actor process does
  std::printf("grove message plane, TCP loopback, through the runtime's sockets and codec\n");
  grove::actors::Latency(quick ? 2000 : 20000);
  grove::actors::RawLatency(quick ? 2000 : 20000);
  grove::actors::CodecCost(1024, quick ? 20000 : 200000);
  grove::actors::CodecCost(1 << 20, quick ? 200 : 2000);
  grove::actors::Throughput(1024, quick ? 20000 : 200000);
  grove::actors::Throughput(1 << 20, quick ? 200 : 2000);
  return 0;
}
