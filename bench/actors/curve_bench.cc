// What CurveZMQ costs on the message plane: the same loopback exchanges
// through RouterSocket/DealerSocket with plain TCP and with CurveZMQ
// (encryption + a ZAP-authenticated handshake):
//   1. round-trip latency of a 200-byte message,
//   2. one-way throughput of 1 MiB messages (the size of weight chunks),
//   3. the time from Connect to the first answered request (handshake).
// Prints a table. Usage: curve_bench [--quick]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "actors/curve_keys.h"
#include "actors/curve_security.h"
#include "actors/socket.h"
#include "actors/zap_authenticator.h"

namespace grove::actors {
namespace {

double NowUs() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Security {
  std::shared_ptr<const SocketSecurity> server, client;  // both null: plain TCP
};

// Echoes `rounds` messages back to their sender.
void Echo(RouterSocket* server, int rounds) {
  for (int i = 0; i < rounds; ++i) {
    auto in = server->Receive(10000);
    if (!in) return;
    (void)server->Send(in->peer, in->payload.to_string());
  }
}

void Run(const char* name, const Security& sec, int rounds, int big_messages) {
  SocketOptions server_options;
  server_options.security = sec.server;
  SocketOptions client_options;
  client_options.security = sec.client;

  // 3 + 1: connect and the first round trip, then the latency rounds.
  RouterSocket server(server_options);
  const std::string endpoint = *server.Bind("tcp://127.0.0.1:0");
  std::thread echo(Echo, &server, rounds + 1);
  const double t_connect = NowUs();
  DealerSocket client(client_options);
  (void)client.Connect(endpoint);
  const std::string small(200, 'x');
  (void)client.Send(small, 10000);
  if (!client.Receive(10000)) {
    std::printf("%s: no first reply\n", name);
    echo.join();
    return;
  }
  const double first_us = NowUs() - t_connect;
  std::vector<double> us;
  for (int i = 0; i < rounds; ++i) {
    const double t0 = NowUs();
    (void)client.Send(small, 5000);
    if (!client.Receive(5000)) break;
    us.push_back(NowUs() - t0);
  }
  echo.join();
  std::sort(us.begin(), us.end());
  auto pct = [&](double p) { return us[std::min(us.size() - 1, static_cast<size_t>(p * us.size()))]; };

  // Throughput: big_messages of 1 MiB one way, then one small ack.
  std::thread sink([&] {
    for (int i = 0; i < big_messages; ++i) {
      auto in = server.Receive(20000);
      if (!in) return;
      if (i == big_messages - 1) (void)server.Send(in->peer, "done");
    }
  });
  const std::string big(1 << 20, 'w');
  const double t0 = NowUs();
  for (int i = 0; i < big_messages; ++i) (void)client.Send(big, 20000);
  const bool done = client.Receive(30000).has_value();
  const double seconds = (NowUs() - t0) / 1e6;
  sink.join();
  std::printf("%-6s connect+first %7.0f us | round trip p50 %6.1f us p99 %6.1f us | 1 MiB x %d: %s%7.0f MiB/s\n",
              name, first_us, pct(0.5), pct(0.99), big_messages, done ? "" : "(incomplete) ",
              big_messages / seconds);
}

}  // namespace
}  // namespace grove::actors

int main(int argc, char** argv) {
  using namespace grove::actors;
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int rounds = quick ? 500 : 5000;
  const int big = quick ? 50 : 500;
  auto server = GenerateCurveKeyPair();
  auto client = GenerateCurveKeyPair();
  if (!server.ok() || !client.ok()) {
    std::fprintf(stderr, "curve_bench: %s\n", server.status().ToString().c_str());
    return 1;
  }
  auto zap = ZapAuthenticator::Start(SharedContext(), {{client->public_key, "bench"}});
  if (!zap.ok()) {
    std::fprintf(stderr, "curve_bench: %s\n", zap.status().ToString().c_str());
    return 1;
  }
  auto srv = std::make_shared<SocketSecurity>();
  srv->server = *server;
  srv->authenticator = std::move(*zap);
  auto cli = std::make_shared<SocketSecurity>();
  cli->server.public_key = server->public_key;
  cli->client = *client;
  std::printf("loopback, %d round trips of 200 B, %d one-way messages of 1 MiB\n", rounds, big);
  Run("plain", Security{}, rounds, big);
  Run("curve", Security{srv, cli}, rounds, big);
  return 0;
}
