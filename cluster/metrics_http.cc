#include "cluster/metrics_http.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include <glog/logging.h>

namespace grove {

Status ParseHostPort(const std::string& text, std::string* host, int* port) {
  std::string s = text;
  if (s.rfind("tcp://", 0) == 0) s = s.substr(6);
  if (s.rfind("http://", 0) == 0) s = s.substr(7);
  const auto colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == s.size()) {
    return Status::InvalidArgument("want HOST:PORT, got '" + text + "'");
  }
  *host = s.substr(0, colon);
  const std::string p = s.substr(colon + 1);
  if (p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(p) > 65535) {
    return Status::InvalidArgument("bad port in '" + text + "'");
  }
  *port = std::stoi(p);
  if (*host == "*") *host = "0.0.0.0";
  return Status::OK();
}

Result<std::string> MetricsServer::Start(const std::string& bind) {
  if (listen_fd_ >= 0) return Status::FailedPrecondition("metrics server already started");
  std::string host;
  int port = 0;
  GROVE_RETURN_IF_ERROR(ParseHostPort(bind, &host, &port));
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (int rc = getaddrinfo(host.c_str(), nullptr, &hints, &found); rc != 0 || found == nullptr) {
    return Status::InvalidArgument("metrics bind: cannot resolve '" + host + "': " +
                                   gai_strerror(rc));
  }
  sockaddr_in addr = *reinterpret_cast<sockaddr_in*>(found->ai_addr);
  freeaddrinfo(found);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::IOError(std::string("socket: ") + std::strerror(errno));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 16) != 0) {
    const std::string err = std::strerror(errno);
    close(fd);
    return Status::Unavailable("metrics bind " + bind + ": " + err);
  }
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  char ip[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &addr.sin_addr, ip, sizeof(ip));
  listen_fd_ = fd;
  stop_ = false;
  thread_ = std::thread([this] { Loop(); });
  return std::string(ip) + ":" + std::to_string(ntohs(addr.sin_port));
}

void MetricsServer::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
  listen_fd_ = -1;
}

void MetricsServer::Loop() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    HandleConnection(fd);
    close(fd);
  }
}

namespace {

void SendAll(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    ssize_t n = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;  // the client went away: nothing to do
    sent += static_cast<size_t>(n);
  }
}

void Respond(int fd, int code, const char* reason, const std::string& type,
             const std::string& body) {
  SendAll(fd, "HTTP/1.0 " + std::to_string(code) + " " + reason + "\r\nContent-Type: " + type +
                  "\r\nContent-Length: " + std::to_string(body.size()) +
                  "\r\nConnection: close\r\n\r\n" + body);
}

}  // namespace

void MetricsServer::HandleConnection(int fd) {
  // Read the request head (up to the blank line), at most 8 KiB and 2 s.
  std::string head;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (head.find("\r\n\r\n") == std::string::npos && head.find("\n\n") == std::string::npos) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0 || head.size() > 8192 || stop_) return;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 100))) <= 0) continue;
    char buf[2048];
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return;
    head.append(buf, static_cast<size_t>(n));
  }
  const std::string line = head.substr(0, head.find_first_of("\r\n"));
  const auto sp1 = line.find(' ');
  const auto sp2 = line.find(' ', sp1 == std::string::npos ? 0 : sp1 + 1);
  if (sp1 == std::string::npos) {
    Respond(fd, 400, "Bad Request", "text/plain", "bad request line\n");
    return;
  }
  const std::string method = line.substr(0, sp1);
  std::string path = line.substr(sp1 + 1, sp2 == std::string::npos ? std::string::npos : sp2 - sp1 - 1);
  path = path.substr(0, path.find('?'));
  if (method != "GET") {
    Respond(fd, 405, "Method Not Allowed", "text/plain", "only GET\n");
    return;
  }
  if (path == "/") {
    Respond(fd, 200, "OK", "text/html",
            "<html><body><a href=\"/metrics\">/metrics</a> (grove cluster)</body></html>\n");
    return;
  }
  if (path != "/metrics") {
    Respond(fd, 404, "Not Found", "text/plain", "not found; try /metrics\n");
    return;
  }
  auto text = render_();
  if (!text.ok()) {
    Respond(fd, 503, "Service Unavailable", "text/plain", text.status().ToString() + "\n");
    return;
  }
  ++served_;
  Respond(fd, 200, "OK", "text/plain; version=0.0.4; charset=utf-8",
          *text);
}

}  // namespace grove
