// MetricsServer: a small HTTP/1.0 server on its own thread that answers
// GET /metrics with the text a callback renders (Prometheus exposition, see
// cluster/prometheus_text.h). One connection at a time, "Connection: close";
// a client that sends no complete request within 2 s is dropped, so a stuck
// scraper cannot hold the thread. Anything but GET gets 405, any other path
// 404; a render error gets 503 with the error text.
#pragma once

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "base/result.h"

namespace grove {

class MetricsServer {
 public:
  using Render = std::function<Result<std::string>()>;
  explicit MetricsServer(Render render) : render_(std::move(render)) {}
  ~MetricsServer() { Stop(); }
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Binds "HOST:PORT" (or "tcp://HOST:PORT"; port 0 picks a free one; HOST
  // an IPv4 address or a name) and starts serving. Returns the bound
  // "HOST:PORT".
  Result<std::string> Start(const std::string& bind);
  // Stops the thread and closes the socket (idempotent).
  void Stop();

  uint64_t requests_served() const { return served_.load(); }

 private:
  void Loop();
  void HandleConnection(int fd);

  Render render_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> served_{0};
  std::thread thread_;
};

// Splits "HOST:PORT" / "tcp://HOST:PORT"; InvalidArgument when malformed.
Status ParseHostPort(const std::string& text, std::string* host, int* port);

}  // namespace grove
