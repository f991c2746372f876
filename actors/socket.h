// Sockets: thin wrappers over ZeroMQ ROUTER (servers) and DEALER (clients)
// with every option set on purpose. One socket belongs to one thread.
//
// Wire shape: a DEALER sends one-part messages (one frame = one Envelope); a
// ROUTER receives [peer identity, frame] and replies to an identity.
// Endpoints may name port 0 ("tcp://127.0.0.1:0"); Bind() returns the port
// the OS chose, so parallel tests never collide.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <zmq.hpp>

#include "actors/codec.h"
#include "actors/curve_security.h"
#include "base/result.h"

namespace grove::actors {

// The process-wide ZeroMQ context (one I/O thread is plenty for control and
// for data up to a few GB/s). Creating it also calls
// KeepLargeBuffersInProcess() once.
zmq::context_t& SharedContext();

// Every large message is a fresh malloc on both ends (the encoded frame, the
// receive buffer). By default glibc serves those with mmap and returns them
// to the OS on free, so each 1 MiB message page-faults its memory back in:
// measured ~10 ms per 1 MiB message on a busy VM, against ~50 us with this
// set. It raises the mmap threshold to 32 MiB and the trim threshold to
// 256 MiB; the cost is that freed memory (up to that much) stays in the
// process's RSS for the next message.
void KeepLargeBuffersInProcess();

struct SocketOptions {
  // Largest frame the codec accepts. ZeroMQ itself drops the connection of a
  // peer sending more than twice this (ZMQ_MAXMSGSIZE), so memory stays
  // bounded; frames between the two limits are read and counted as oversized.
  size_t max_frame_bytes = kMaxFrameBytes;
  // Messages queued per peer before sends fail (ROUTER) or block (DEALER):
  // a slow peer pushes back instead of growing an unbounded queue.
  int send_hwm = 1000;
  int recv_hwm = 1000;
  // Milliseconds unsent messages are kept after close: bounded so a process
  // whose peer is gone still exits promptly.
  int linger_ms = 200;
  // TCP reconnect back-off of a DEALER: starts at ivl and doubles up to max.
  int reconnect_ivl_ms = 50;
  int reconnect_ivl_max_ms = 2000;
  // CurveZMQ keys (curve_security.h): a RouterSocket serves with them, a
  // DealerSocket connects with them; null: plain TCP. Defaults to what the
  // process installed, so every socket of a secured process is secured.
  std::shared_ptr<const SocketSecurity> security = ProcessSocketSecurity();
};

// Decodes a received message without copying it (the Frame keeps it).
Result<Frame> DecodeMessage(zmq::message_t&& message, std::initializer_list<BodyKind> expected,
                            FrameStats* stats, const DecodeLimits& limits = DecodeLimits());

struct Incoming {
  std::string peer;        // ROUTER identity of the sender; pass to Send()
  zmq::message_t payload;  // the frame; decode with DecodeFrame
};

class RouterSocket {
 public:
  explicit RouterSocket(SocketOptions options = SocketOptions());

  // Binds and returns the actual endpoint (ZMQ_LAST_ENDPOINT). With
  // options.security, binds as a CurveZMQ server (ApplyServerSecurity).
  Result<std::string> Bind(const std::string& endpoint);
  const std::string& endpoint() const { return endpoint_; }

  // Waits up to timeout_ms (0: poll, -1: forever). nullopt on timeout.
  // Messages not shaped [identity, frame] are dropped and counted as garbage.
  std::optional<Incoming> Receive(int timeout_ms);

  // Sends without blocking. Unavailable if the peer is gone (router-mandatory
  // tells us instead of dropping silently), ResourceExhausted at its HWM.
  Status Send(const std::string& peer, std::string frame);

  FrameStats& stats() { return stats_; }
  const SocketOptions& options() const { return options_; }
  zmq::socket_t& raw() { return socket_; }

 private:
  SocketOptions options_;
  zmq::socket_t socket_;
  std::string endpoint_;
  FrameStats stats_;
};

class DealerSocket {
 public:
  explicit DealerSocket(SocketOptions options = SocketOptions());

  // With options.security, connects as a CurveZMQ client
  // (ApplyClientSecurity); a server that refuses our key never completes
  // the connection, so sends then time out.
  Status Connect(const std::string& endpoint);
  // Closes the socket and opens a fresh one to the same endpoint: drops
  // queued requests and late replies (the Lazy Pirate reset).
  Status Reconnect();
  const std::string& endpoint() const { return endpoint_; }

  // Waits up to timeout_ms for the connection to accept the frame.
  Status Send(std::string frame, int timeout_ms);
  std::optional<zmq::message_t> Receive(int timeout_ms);

  const SocketOptions& options() const { return options_; }
  zmq::socket_t& raw() { return socket_; }

 private:
  void Open();
  SocketOptions options_;
  zmq::socket_t socket_;
  std::string endpoint_;
};

}  // namespace grove::actors
