#include "actors/rpc_client.h"

#include <random>

namespace grove::actors {

RpcClient::RpcClient(std::string sender_id, SocketOptions options)
    : sender_id_(std::move(sender_id)), dealer_(options) {
  // Random start: replies meant for a previous process with the same id
  // can never match.
  next_request_id_ = std::random_device{}() | (uint64_t{std::random_device{}()} << 32);
}

Status RpcClient::Connect(const std::string& endpoint) { return dealer_.Connect(endpoint); }

Result<Frame> RpcClient::Call(capnp::MallocMessageBuilder& message,
                              std::initializer_list<BodyKind> expected, int timeout_ms) {
  const uint64_t id = ++next_request_id_;
  auto env = message.getRoot<wire::Envelope>();
  env.setRequestId(id);
  env.setSentAtMs(WallClockMs());
  const int64_t deadline = MonotonicMs() + timeout_ms;
  Status sent = dealer_.Send(EncodeFrame(message), timeout_ms);
  if (!sent.ok()) {
    (void)dealer_.Reconnect();
    return sent;
  }
  for (;;) {
    const int64_t left = deadline - MonotonicMs();
    if (left <= 0) break;
    auto reply = dealer_.Receive(static_cast<int>(left));
    if (!reply) break;
    auto frame = DecodeMessage(std::move(*reply), {}, &stats_,
                               DecodeLimits{.max_frame_bytes = dealer_.options().max_frame_bytes});
    if (!frame.ok()) continue;
    if (frame->envelope().getRequestId() != id) continue;  // late reply to an old request
    if (frame->kind() == BodyKind::ERROR) {
      return Status::FailedPrecondition(frame->envelope().getBody().getError().getMessage().cStr());
    }
    for (BodyKind k : expected) {
      if (frame->kind() == k) return frame;
    }
    stats_.Count(FrameError::kWrongKind, "reply of kind " + BodyKindName(frame->kind()));
    return Status::Corruption("unexpected reply kind " + BodyKindName(frame->kind()));
  }
  (void)dealer_.Reconnect();
  return Status::DeadlineExceeded("no reply from " + dealer_.endpoint() + " within " +
                                  std::to_string(timeout_ms) + " ms");
}

}  // namespace grove::actors
