#include "actors/zap_authenticator.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include <glog/logging.h>

#include "actors/codec.h"  // MonotonicMs
#include "actors/curve_keys.h"

namespace grove::actors {

// One watched server socket: the PAIR end of its monitor, and the peers it
// accepted (fd -> "IP:PORT"), so a failed handshake can name its peer.
struct ZapAuthenticator::Monitor {
  zmq::socket_t pair;
  std::string endpoint;              // the server's bound endpoint, for logs
  std::map<int, std::string> peers;  // accepted fd -> address
  std::string pending_reason;        // a handshake failed; its DISCONNECTED names the peer
};

namespace {

constexpr size_t kMaxLogged = 4096;  // distinct (who, reason) pairs logged; then silence

std::string PeerOfFd(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return "";
  char host[INET6_ADDRSTRLEN] = {0};
  int port = 0;
  if (addr.ss_family == AF_INET) {
    auto* in = reinterpret_cast<sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    auto* in = reinterpret_cast<sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &in->sin6_addr, host, sizeof(host));
    port = ntohs(in->sin6_port);
  } else {
    return "";
  }
  return std::string(host) + ":" + std::to_string(port);
}

// What an authorized directory looks like: its *.pub files' names, sizes
// and modification times. Any change to the set changes this text.
std::string AuthorizedDirStamp(const std::string& dir) {
  std::vector<std::string> lines;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.path().extension() != ".pub") continue;
    std::error_code fec;
    const auto size = entry.file_size(fec);
    const auto time = entry.last_write_time(fec).time_since_epoch().count();
    lines.push_back(entry.path().filename().string() + "/" + std::to_string(size) + "/" +
                    std::to_string(time));
  }
  std::sort(lines.begin(), lines.end());  // directory order is arbitrary
  std::string stamp;
  for (const auto& l : lines) stamp += l + "\n";
  return stamp;
}

std::string HostOf(const std::string& peer) {
  const size_t colon = peer.rfind(':');
  return colon == std::string::npos ? peer : peer.substr(0, colon);
}

std::string HandshakeFailure(uint32_t code) {
  switch (code) {
    case ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
      return "peer does not use CurveZMQ (started without keys?)";
    case ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
      return "CurveZMQ handshake did not decrypt (peer has the wrong server key?)";
    default: {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "handshake failed (ZMTP error 0x%x)", code);
      return buf;
    }
  }
}

}  // namespace

Result<AuthorizedKeys> ReadAuthorizedKeys(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return Status::NotFound("authorized keys directory " + dir + " does not exist");
  }
  AuthorizedKeys keys;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.path().extension() != ".pub") continue;
    GROVE_ASSIGN_OR_RETURN(std::string key, ReadCurveKeyFile(entry.path().string()));
    keys[key] = entry.path().stem().string();
  }
  if (ec) return Status::IOError("list " + dir + ": " + ec.message());
  if (keys.empty()) {
    return Status::InvalidArgument("no *.pub keys in " + dir +
                                   ": the servers would admit nobody (grove keygen --authorize)");
  }
  return keys;
}

ZapAuthenticator::ZapAuthenticator(zmq::context_t& context, AuthorizedKeys authorized)
    : context_(context), zap_(context, zmq::socket_type::rep), authorized_(std::move(authorized)) {}

Result<std::unique_ptr<ZapAuthenticator>> ZapAuthenticator::Start(zmq::context_t& context,
                                                                   AuthorizedKeys authorized) {
  std::unique_ptr<ZapAuthenticator> z(new ZapAuthenticator(context, std::move(authorized)));
  try {
    z->zap_.set(zmq::sockopt::linger, 0);
    z->zap_.bind("inproc://zeromq.zap.01");
  } catch (const zmq::error_t& e) {
    if (e.num() == EADDRINUSE) {
      return Status::AlreadyExists("this process has a ZAP handler already");
    }
    return Status::IOError(std::string("bind the ZAP handler: ") + e.what());
  }
  z->thread_ = std::thread([p = z.get()] { p->Loop(); });
  return z;
}

ZapAuthenticator::~ZapAuthenticator() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void ZapAuthenticator::SetAuthorizedKeys(AuthorizedKeys authorized) {
  std::lock_guard<std::mutex> lock(mu_);
  authorized_ = std::move(authorized);
}

void ZapAuthenticator::ReloadFrom(std::string dir, int interval_ms) {
  std::string stamp = AuthorizedDirStamp(dir);
  std::lock_guard<std::mutex> lock(mu_);
  reload_dir_ = std::move(dir);
  reload_interval_ms_ = std::max(interval_ms, 10);
  reload_stamp_ = std::move(stamp);
}

void ZapAuthenticator::MaybeReload() {
  std::string dir, old_stamp;
  int interval_ms = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dir = reload_dir_;
    interval_ms = reload_interval_ms_;
    old_stamp = reload_stamp_;
  }
  const int64_t now = MonotonicMs();
  if (dir.empty() || now < next_reload_ms_) return;
  next_reload_ms_ = now + interval_ms;
  std::string stamp = AuthorizedDirStamp(dir);
  if (stamp == old_stamp) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    reload_stamp_ = stamp;
  }
  auto keys = ReadAuthorizedKeys(dir);
  if (!keys.ok()) {
    LOG(WARNING) << "authorized keys not reloaded, keeping the current set: " << keys.status();
    return;
  }
  LOG(INFO) << "authorized keys reloaded from " << dir << ": " << keys->size() << " keys";
  SetAuthorizedKeys(std::move(*keys));
}

size_t ZapAuthenticator::authorized_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return authorized_.size();
}

AuthRefusals ZapAuthenticator::refusals() const {
  std::lock_guard<std::mutex> lock(mu_);
  return refusals_;
}

Status ZapAuthenticator::Watch(zmq::socket_t& server, const std::string& endpoint) {
  static std::atomic<uint64_t> next{0};
  const std::string address = "inproc://grove-auth-monitor-" + std::to_string(next++);
  // Not HANDSHAKE_FAILED_NO_DETAIL: that is a transport error mid-handshake
  // (a peer closing early), not a refusal. HANDSHAKE_FAILED_AUTH follows a
  // ZAP refusal, which HandleZapRequest counts already.
  constexpr int kEvents = ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED |
                          ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_MONITOR_STOPPED;
  if (zmq_socket_monitor(server.handle(), address.c_str(), kEvents) != 0) {
    return Status::IOError(std::string("monitor ") + endpoint + ": " + zmq_strerror(zmq_errno()));
  }
  // Connected here, before the server serves, so no event is lost; the
  // handler thread adopts the socket (the mutex is the memory barrier a
  // ZeroMQ socket needs to change threads).
  auto m = std::make_unique<Monitor>(Monitor{zmq::socket_t(context_, zmq::socket_type::pair), endpoint, {}, {}});
  try {
    m->pair.set(zmq::sockopt::linger, 0);
    m->pair.connect(address);
  } catch (const zmq::error_t& e) {
    return Status::IOError(std::string("connect monitor: ") + e.what());
  }
  std::lock_guard<std::mutex> lock(mu_);
  adopting_.push_back(std::move(m));
  return Status::OK();
}

void ZapAuthenticator::Refuse(const std::string& peer, const std::string& who,
                              const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  ++refusals_.count;
  refusals_.last_peer = peer;
  refusals_.last_reason = reason;
  const std::string log_key = who + "\n" + reason;
  if (logged_.size() < kMaxLogged && logged_.insert(log_key).second) {
    LOG(WARNING) << "refused a connection from " << (peer.empty() ? "an unknown peer" : peer)
                 << ": " << reason << " (logged once per key or host; grove status counts them all)";
  }
}

void ZapAuthenticator::Loop() {
  while (!stop_) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& m : adopting_) monitors_.push_back(std::move(m));
      adopting_.clear();
    }
    MaybeReload();
    std::vector<zmq::pollitem_t> items;
    items.push_back({zap_.handle(), 0, ZMQ_POLLIN, 0});
    for (auto& m : monitors_) items.push_back({m->pair.handle(), 0, ZMQ_POLLIN, 0});
    try {
      // Short timeout: new monitors and the stop flag are picked up quickly.
      if (zmq::poll(items, std::chrono::milliseconds(50)) <= 0) continue;
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      LOG(ERROR) << "ZAP handler poll: " << e.what();
      return;
    }
    if (items[0].revents & ZMQ_POLLIN) HandleZapRequest();
    for (size_t i = 0; i < monitors_.size(); ++i) {
      if (items[i + 1].revents & ZMQ_POLLIN) HandleMonitorEvent(*monitors_[i]);
    }
    std::erase_if(monitors_, [](const auto& m) { return m->pair.handle() == nullptr; });
  }
}

void ZapAuthenticator::HandleZapRequest() {
  // RFC 27 request: version, request id, domain, address, identity,
  // mechanism, credentials (CURVE: the client's 32-byte public key).
  std::vector<zmq::message_t> frames;
  try {
    for (;;) {
      zmq::message_t part;
      if (!zap_.recv(part, zmq::recv_flags::dontwait)) break;
      const bool more = part.more();
      frames.push_back(std::move(part));
      if (!more) break;
    }
  } catch (const zmq::error_t& e) {
    LOG(ERROR) << "ZAP receive: " << e.what();
    return;
  }
  if (frames.empty()) return;
  const std::string version = frames.size() > 0 ? frames[0].to_string() : "";
  const std::string request_id = frames.size() > 1 ? frames[1].to_string() : "";
  const std::string address = frames.size() > 3 ? frames[3].to_string() : "";
  const std::string mechanism = frames.size() > 5 ? frames[5].to_string() : "";
  std::string status = "400", text, user;
  if (version != "1.0" || frames.size() < 6) {
    text = "malformed ZAP request";
  } else if (mechanism != "CURVE" || frames.size() < 7 || frames[6].size() != 32) {
    text = "mechanism " + mechanism + " not allowed";
    Refuse(address, address, "mechanism " + mechanism + " is not CurveZMQ");
  } else {
    char z85[41] = {0};
    zmq_z85_encode(z85, static_cast<const uint8_t*>(frames[6].data()), 32);
    const std::string key(z85);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = authorized_.find(key);
      if (it != authorized_.end()) {
        status = "200";
        text = "OK";
        user = it->second;
      }
    }
    if (status != "200") {
      text = "key not authorized";
      Refuse(address, key, "public key " + key + " is not authorized");
    }
  }
  try {
    zap_.send(zmq::buffer(std::string("1.0")), zmq::send_flags::sndmore);
    zap_.send(zmq::buffer(request_id), zmq::send_flags::sndmore);
    zap_.send(zmq::buffer(status), zmq::send_flags::sndmore);
    zap_.send(zmq::buffer(text), zmq::send_flags::sndmore);
    zap_.send(zmq::buffer(user), zmq::send_flags::sndmore);
    zap_.send(zmq::message_t(), zmq::send_flags::none);  // no metadata
  } catch (const zmq::error_t& e) {
    LOG(ERROR) << "ZAP reply: " << e.what();
  }
}

void ZapAuthenticator::HandleMonitorEvent(Monitor& m) {
  // A monitor event: [uint16 event, uint32 value][endpoint].
  zmq::message_t head, endpoint;
  try {
    if (!m.pair.recv(head, zmq::recv_flags::dontwait)) return;
    if (head.more()) (void)m.pair.recv(endpoint, zmq::recv_flags::none);
  } catch (const zmq::error_t&) {
    return;
  }
  if (head.size() < 6) return;
  uint16_t event = 0;
  uint32_t value = 0;
  std::memcpy(&event, head.data(), 2);
  std::memcpy(&value, static_cast<const char*>(head.data()) + 2, 4);
  switch (event) {
    case ZMQ_EVENT_ACCEPTED:
      // Looked up now, while the connection (usually) still stands.
      m.peers[static_cast<int>(value)] = PeerOfFd(static_cast<int>(value));
      break;
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
      // libzmq reports the failure, then the DISCONNECTED of its fd; the
      // refusal is recorded there, with the peer's address.
      if (!m.pending_reason.empty()) Refuse("", "", m.pending_reason + " on " + m.endpoint);
      m.pending_reason = HandshakeFailure(value);
      break;
    case ZMQ_EVENT_DISCONNECTED: {
      auto it = m.peers.find(static_cast<int>(value));
      const std::string peer = it != m.peers.end() ? it->second : "";
      if (it != m.peers.end()) m.peers.erase(it);
      if (!m.pending_reason.empty()) {
        Refuse(peer, HostOf(peer), m.pending_reason);
        m.pending_reason.clear();
      }
      break;
    }
    case ZMQ_EVENT_MONITOR_STOPPED:
      if (!m.pending_reason.empty()) Refuse("", "", m.pending_reason);
      m.pair.close();
      break;
    default:
      break;
  }
}

}  // namespace grove::actors
