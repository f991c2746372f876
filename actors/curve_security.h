// CurveZMQ on grove's sockets: the [security] section of a cluster config,
// the keys it names, and the one place that applies them to a socket.
//
//   [security]
//   curve = true                 # encrypt and authenticate every ZeroMQ link
//   keys_dir = "/etc/grove/keys" # server.key/.pub, client.key/.pub, authorized/*.pub
//   # optional, each overrides its part of the keys_dir layout:
//   server_key = "/path/server"  # key pair stem (.key/.pub) every server binds with
//   client_key = "/path/rollout" # this process's own key pair for connecting
//   authorized_dir = "/path/dir" # *.pub of the clients servers admit
//
// One server key pair serves the whole cluster: actors find each other's
// data endpoints through the coordinator, so every client must know the
// server key of whatever it reaches; sharing one avoids shipping keys in
// lookups. Clients are told apart by their own keys, which servers admit
// only when listed in authorized_dir (see zap_authenticator.h).
//
// Processes call InstallProcessSecurity once, before opening sockets; every
// RouterSocket and DealerSocket made after that picks the keys up through
// SocketOptions (socket.h), so no role applies security by hand.
#pragma once

#include <memory>
#include <string>

#include <zmq.hpp>

#include "actors/curve_keys.h"
#include "actors/zap_authenticator.h"
#include "base/config.h"
#include "base/result.h"

namespace grove::actors {

struct SecurityConfig {
  bool curve = false;
  std::string keys_dir;
  std::string server_key;      // stem; default keys_dir/server
  std::string client_key;      // stem; default keys_dir/client
  std::string authorized_dir;  // default keys_dir/authorized

  // Reads [security] of `root` (keys: curve, keys_dir, server_key,
  // client_key, authorized_dir; any other key is an error). With curve on,
  // keys_dir or all three explicit paths must be given.
  static Result<SecurityConfig> FromConfig(const Config& root);
  // curve = true with the default layout under `dir` (the CLI's --keys DIR).
  static SecurityConfig ForKeysDir(const std::string& dir);
  // Makes every path absolute (against the working directory), so a config
  // written for child processes means the same files wherever they run.
  SecurityConfig Absolute() const;
};

// What sockets apply. A server needs server.secret_key and an authenticator
// (a CURVE server without a ZAP handler would admit any client); a client
// needs server.public_key and its own pair.
struct SocketSecurity {
  CurveKeyPair server;
  CurveKeyPair client;
  std::shared_ptr<ZapAuthenticator> authenticator;  // null in processes that only connect
};

enum class KeyUse {
  kServeAndConnect,  // actors, the coordinator, the launcher
  kConnectOnly,      // the CLI: needs only server.pub and a client pair
};

// Loads the keys `config` names; with kServeAndConnect also reads the
// authorized keys (the caller starts the authenticator).
Result<SocketSecurity> LoadSocketSecurity(const SecurityConfig& config, KeyUse use);

// Before bind: CURVE server with the server secret key and ZAP domain
// "grove", and refusals of `socket` counted by the authenticator.
Status ApplyServerSecurity(zmq::socket_t& socket, const SocketSecurity& security,
                           const std::string& endpoint);
// Before connect: CURVE client with its own pair and the server's public key.
Status ApplyClientSecurity(zmq::socket_t& socket, const SocketSecurity& security);

// Reads [security] of `root`; when curve is on, loads the keys, starts this
// process's ZAP handler (kServeAndConnect) and makes every socket created
// afterwards use them. Nothing happens when curve is off. Installing twice
// replaces the keys for later sockets but keeps the first ZAP handler (with
// the new authorized set).
Status InstallProcessSecurity(const Config& root, KeyUse use = KeyUse::kServeAndConnect);
Status InstallProcessSecurity(const SecurityConfig& config, KeyUse use);

// The installed security; null when this process does not use CurveZMQ.
std::shared_ptr<const SocketSecurity> ProcessSocketSecurity();
// Refusals counted by this process's ZAP handler (zero when it has none).
AuthRefusals ProcessAuthRefusals();

}  // namespace grove::actors
