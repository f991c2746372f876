#include "actors/socket.h"

#include <malloc.h>


#include <glog/logging.h>

namespace grove::actors {
namespace {

void SetCommonOptions(zmq::socket_t& s, const SocketOptions& o) {
  // Bounded linger: close never hangs on an unreachable peer.
  s.set(zmq::sockopt::linger, o.linger_ms);
  // ZeroMQ drops a peer that sends more than this before we buffer it; the
  // codec's own (lower) limit counts frames between the two.
  s.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(o.max_frame_bytes) * 2);
  // High-water marks: bounded queues give back-pressure, not memory growth.
  s.set(zmq::sockopt::sndhwm, o.send_hwm);
  s.set(zmq::sockopt::rcvhwm, o.recv_hwm);
}

}  // namespace

Result<Frame> DecodeMessage(zmq::message_t&& message, std::initializer_list<BodyKind> expected,
                            FrameStats* stats, const DecodeLimits& limits) {
  auto owned = std::make_shared<zmq::message_t>(std::move(message));
  const void* data = owned->data();
  const size_t size = owned->size();
  return DecodeFrame(std::move(owned), data, size, expected, stats, limits);
}

void KeepLargeBuffersInProcess() {
  static const bool done = [] {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
    return true;
  }();
  (void)done;
}

zmq::context_t& SharedContext() {
  KeepLargeBuffersInProcess();
  // Leaked on purpose: a static context's destructor would block at exit on
  // sockets owned by detached threads.
  static zmq::context_t* context = new zmq::context_t(1);
  return *context;
}

RouterSocket::RouterSocket(SocketOptions options)
    : options_(options), socket_(SharedContext(), zmq::socket_type::router) {
  SetCommonOptions(socket_, options_);
  // Router-mandatory: a reply to a peer that is gone fails with EHOSTUNREACH
  // instead of vanishing, so the server can count and log it.
  socket_.set(zmq::sockopt::router_mandatory, 1);
}

Result<std::string> RouterSocket::Bind(const std::string& endpoint) {
  if (options_.security != nullptr) {
    GROVE_RETURN_IF_ERROR(ApplyServerSecurity(socket_, *options_.security, endpoint));
  }
  try {
    socket_.bind(endpoint);
  } catch (const zmq::error_t& e) {
    return Status::IOError("bind " + endpoint + ": " + e.what());
  }
  endpoint_ = socket_.get(zmq::sockopt::last_endpoint);
  return endpoint_;
}

std::optional<Incoming> RouterSocket::Receive(int timeout_ms) {
  zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
  // A dropped garbage message must not cut the caller's wait short: keep
  // waiting for a good one until the original deadline.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0));
  for (;;) {
    try {
      long wait_ms = timeout_ms;
      if (timeout_ms >= 0) {
        wait_ms = std::max<long>(0, std::chrono::duration_cast<std::chrono::milliseconds>(
                                        deadline - std::chrono::steady_clock::now())
                                        .count());
      }
      if (zmq::poll(&item, 1, std::chrono::milliseconds(wait_ms)) <= 0) return std::nullopt;
      Incoming in;
      zmq::message_t identity;
      if (!socket_.recv(identity, zmq::recv_flags::dontwait)) return std::nullopt;
      in.peer = identity.to_string();
      int parts = 0;
      bool more = identity.more();
      while (more) {
        zmq::message_t part;
        if (!socket_.recv(part, zmq::recv_flags::none)) break;
        more = part.more();
        if (parts++ == 0) in.payload = std::move(part);
      }
      if (parts == 1) return in;
      stats_.Count(FrameError::kGarbage,
                   "message of " + std::to_string(parts) + " parts (expected one frame)");
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) return std::nullopt;  // a signal: let the caller check its flags
      LOG(ERROR) << "router receive: " << e.what();
      return std::nullopt;
    }
  }
}

Status RouterSocket::Send(const std::string& peer, std::string frame) {
  try {
    if (!socket_.send(zmq::buffer(peer), zmq::send_flags::sndmore | zmq::send_flags::dontwait)) {
      return Status::ResourceExhausted("peer's send queue is full");
    }
    auto* owned = new std::string(std::move(frame));
    zmq::message_t msg(owned->data(), owned->size(),
                       [](void*, void* hint) { delete static_cast<std::string*>(hint); }, owned);
    if (!socket_.send(msg, zmq::send_flags::dontwait)) {
      return Status::ResourceExhausted("peer's send queue is full");
    }
  } catch (const zmq::error_t& e) {
    if (e.num() == EHOSTUNREACH) return Status::Unavailable("peer disconnected");
    return Status::IOError(std::string("router send: ") + e.what());
  }
  return Status::OK();
}

DealerSocket::DealerSocket(SocketOptions options)
    : options_(options), socket_(SharedContext(), zmq::socket_type::dealer) {
  Open();
}

void DealerSocket::Open() {
  SetCommonOptions(socket_, options_);
  // Immediate: queue only on completed connections, so a request to a peer
  // that is down times out in Send (and counts as a miss) rather than sitting
  // in a queue and arriving, stale, when the peer comes back.
  socket_.set(zmq::sockopt::immediate, 1);
  // TCP reconnect back-off of the transport itself.
  socket_.set(zmq::sockopt::reconnect_ivl, options_.reconnect_ivl_ms);
  socket_.set(zmq::sockopt::reconnect_ivl_max, options_.reconnect_ivl_max_ms);
}

Status DealerSocket::Connect(const std::string& endpoint) {
  if (options_.security != nullptr) {
    GROVE_RETURN_IF_ERROR(ApplyClientSecurity(socket_, *options_.security));
  }
  try {
    socket_.connect(endpoint);
  } catch (const zmq::error_t& e) {
    return Status::InvalidArgument("connect " + endpoint + ": " + e.what());
  }
  endpoint_ = endpoint;
  return Status::OK();
}

Status DealerSocket::Reconnect() {
  socket_.close();
  socket_ = zmq::socket_t(SharedContext(), zmq::socket_type::dealer);
  Open();
  if (endpoint_.empty()) return Status::OK();
  return Connect(endpoint_);
}

Status DealerSocket::Send(std::string frame, int timeout_ms) {
  try {
    socket_.set(zmq::sockopt::sndtimeo, timeout_ms);
    auto* owned = new std::string(std::move(frame));
    zmq::message_t msg(owned->data(), owned->size(),
                       [](void*, void* hint) { delete static_cast<std::string*>(hint); }, owned);
    if (!socket_.send(msg, zmq::send_flags::none)) {
      return Status::Unavailable("no connection to " + endpoint_ + " within " +
                                 std::to_string(timeout_ms) + " ms");
    }
  } catch (const zmq::error_t& e) {
    if (e.num() == EINTR) return Status::Aborted("interrupted");
    return Status::IOError(std::string("dealer send: ") + e.what());
  }
  return Status::OK();
}

std::optional<zmq::message_t> DealerSocket::Receive(int timeout_ms) {
  zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
  try {
    if (zmq::poll(&item, 1, std::chrono::milliseconds(timeout_ms)) <= 0) return std::nullopt;
    zmq::message_t msg;
    if (!socket_.recv(msg, zmq::recv_flags::dontwait)) return std::nullopt;
    while (msg.more()) {  // a DEALER peer answers one part; drop any extra
      zmq::message_t extra;
      if (!socket_.recv(extra, zmq::recv_flags::none) || !extra.more()) break;
    }
    return msg;
  } catch (const zmq::error_t& e) {
    return std::nullopt;
  }
}

}  // namespace grove::actors
