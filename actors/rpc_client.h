// RpcClient: request/reply over a DEALER socket, the way every grove client
// (actors, the CLI, the launcher) talks to a server.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "actors/codec.h"
#include "actors/socket.h"
#include "base/result.h"

namespace grove::actors {

// Request/reply over a DEALER: stamps a fresh request id, sends, and waits
// for the reply carrying that id (late replies to earlier, timed-out
// requests are discarded). After a timeout the socket is reset.
class RpcClient {
 public:
  RpcClient(std::string sender_id, SocketOptions options = SocketOptions());

  Status Connect(const std::string& endpoint);
  const std::string& endpoint() const { return dealer_.endpoint(); }
  const std::string& sender_id() const { return sender_id_; }

  // `message` holds an Envelope (see InitEnvelope); its requestId is
  // overwritten. The reply must be one of `expected` (or an `error` body,
  // returned as a FailedPrecondition status with its text).
  Result<Frame> Call(capnp::MallocMessageBuilder& message, std::initializer_list<BodyKind> expected,
                     int timeout_ms);

  FrameStats& stats() { return stats_; }

 private:
  std::string sender_id_;
  DealerSocket dealer_;
  uint64_t next_request_id_;
  FrameStats stats_;
};

}  // namespace grove::actors
