// ZapAuthenticator: decides which CurveZMQ clients a server admits, and
// counts the ones it turns away.
//
// libzmq asks a ZAP handler (RFC 27, at inproc://zeromq.zap.01 of the
// socket's context) about every handshake on a socket that sets
// ZMQ_ZAP_DOMAIN. This one admits mechanism CURVE only, and only a client
// whose public key is in the authorized set; every other request is refused
// and counted. A peer that does not speak CURVE at all (an actor started
// without keys) or encrypts to the wrong server key never reaches ZAP: its
// handshake fails earlier, so Watch() also listens to a server socket's
// monitor events and counts those failures too.
//
// One per context, that is one per process (actors::SharedContext()); the
// process-wide one is started by InstallProcessSecurity (curve_security.h).
// Each refusal is logged once per (client key or peer host, reason), so a
// misconfigured actor retrying every second does not flood the log.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <zmq.hpp>

#include "base/result.h"

namespace grove::actors {

struct AuthRefusals {
  // Handshakes refused since the start. A refused client that keeps
  // reconnecting counts once per attempt.
  uint64_t count = 0;
  // The latest refused peer: "IP" (ZAP is told no port), "IP:PORT" (a
  // handshake that failed before ZAP), "" if none or unknown. Before ZAP
  // the address is read from the accepted socket by the handler thread,
  // best effort: a peer that is already gone by then stays unknown.
  std::string last_peer;
  std::string last_reason;   // why the latest was refused
};

// The authorized set: public key (Z85) -> a name for logs (the .pub file's stem).
using AuthorizedKeys = std::map<std::string, std::string>;

// Reads every *.pub file in `dir` (one Z85 key each). InvalidArgument names a
// file that is not a key; an empty or missing directory is an error too (a
// server admitting nobody is a configuration mistake, not a policy).
Result<AuthorizedKeys> ReadAuthorizedKeys(const std::string& dir);

class ZapAuthenticator {
 public:
  // Binds inproc://zeromq.zap.01 on `context` and starts the handler
  // thread. AlreadyExists when the context has a ZAP handler already.
  static Result<std::unique_ptr<ZapAuthenticator>> Start(zmq::context_t& context,
                                                          AuthorizedKeys authorized);
  ~ZapAuthenticator();  // stops the thread, closes its sockets
  ZapAuthenticator(const ZapAuthenticator&) = delete;
  ZapAuthenticator& operator=(const ZapAuthenticator&) = delete;

  // Replaces the authorized set; applies to the next handshake (connections
  // already admitted stay).
  void SetAuthorizedKeys(AuthorizedKeys authorized);
  size_t authorized_count() const;

  // Keeps the authorized set in step with `dir`: every interval_ms the
  // handler thread looks at the *.pub files' names, sizes and times, and
  // re-reads them (ReadAuthorizedKeys) when any changed. A directory that no
  // longer reads (a bad key file, emptied) keeps the current set and logs why.
  void ReloadFrom(std::string dir, int interval_ms = 2000);

  // Counts handshakes of `server` that fail before ZAP (no CURVE, wrong
  // server key). Call from the socket's owning thread, before it serves.
  Status Watch(zmq::socket_t& server, const std::string& endpoint);

  AuthRefusals refusals() const;

 private:
  struct Monitor;
  ZapAuthenticator(zmq::context_t& context, AuthorizedKeys authorized);
  void Loop();
  void HandleZapRequest();
  void HandleMonitorEvent(Monitor& m);
  void Refuse(const std::string& peer, const std::string& who, const std::string& reason);
  void MaybeReload();

  zmq::context_t& context_;
  zmq::socket_t zap_;  // REP, used by the handler thread only

  mutable std::mutex mu_;  // guards the members below
  AuthorizedKeys authorized_;
  AuthRefusals refusals_;
  std::set<std::string> logged_;                    // (who, reason) already logged
  std::vector<std::unique_ptr<Monitor>> adopting_;  // handed over by Watch()

  std::string reload_dir_;       // "" when not reloading
  int reload_interval_ms_ = 0;
  std::string reload_stamp_;     // the directory as last read

  std::vector<std::unique_ptr<Monitor>> monitors_;  // handler thread only
  int64_t next_reload_ms_ = 0;                      // handler thread only
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace grove::actors
