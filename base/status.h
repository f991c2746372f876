// Status: the outcome of an operation that crosses a module line. Modules
// return Status (or Result<T>) instead of throwing; a non-OK status carries a
// code a caller can branch on and a message a person can act on.
#pragma once

#include <ostream>
#include <string>
#include <string_view>
#include <utility>

namespace grove {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // the caller's input is wrong (bad config, bad request)
  kNotFound,            // a named thing does not exist
  kAlreadyExists,       // a thing that must be new is not
  kCorruption,          // stored or received bytes are not what they claim
  kIOError,             // the operating system refused a file or socket call
  kUnavailable,         // a peer or resource is not reachable now; retrying may help
  kDeadlineExceeded,    // an operation ran out of time
  kResourceExhausted,   // a queue, memory or quota bound was hit
  kFailedPrecondition,  // the system is not in a state where this can run
  kAborted,             // the operation was stopped (shutdown, drain)
  kInternal,            // a bug: an invariant of grove itself does not hold
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
  static Status Corruption(std::string m) { return {StatusCode::kCorruption, std::move(m)}; }
  static Status IOError(std::string m) { return {StatusCode::kIOError, std::move(m)}; }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status DeadlineExceeded(std::string m) { return {StatusCode::kDeadlineExceeded, std::move(m)}; }
  static Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
  static Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
  static Status Aborted(std::string m) { return {StatusCode::kAborted, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "OK" or "<code name>: <message>".
  std::string ToString() const;

  // Returns a copy whose message is "<context>: <message>"; OK stays OK.
  Status WithContext(std::string_view context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

std::ostream& operator<<(std::ostream& os, const Status& s);

}  // namespace grove

// Returns the status of `expr` from the enclosing function if it is not OK.
#define GROVE_RETURN_IF_ERROR(expr)                 \
  do {                                              \
    ::grove::Status grove_status_ = (expr);         \
    if (!grove_status_.ok()) return grove_status_;  \
  } while (0)
