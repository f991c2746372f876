#include "actors/curve_security.h"

#include <filesystem>
#include <mutex>

#include <glog/logging.h>

#include "actors/socket.h"

namespace grove::actors {
namespace {

constexpr const char* kZapDomain = "grove";

std::mutex g_mu;
std::shared_ptr<const SocketSecurity> g_security;     // guarded by g_mu
std::shared_ptr<ZapAuthenticator> g_authenticator;  // guarded by g_mu

std::string Join(const std::string& dir, const char* name) {
  return (std::filesystem::path(dir) / name).string();
}

}  // namespace

Result<SecurityConfig> SecurityConfig::FromConfig(const Config& root) {
  Config section = root.Section("security");
  GROVE_RETURN_IF_ERROR(
      section.CheckKeys({"curve", "keys_dir", "server_key", "client_key", "authorized_dir"}));
  SecurityConfig c;
  GROVE_ASSIGN_OR_RETURN(c.curve, section.Bool("curve", false));
  GROVE_ASSIGN_OR_RETURN(c.keys_dir, section.String("keys_dir", std::string()));
  GROVE_ASSIGN_OR_RETURN(c.server_key, section.String("server_key", std::string()));
  GROVE_ASSIGN_OR_RETURN(c.client_key, section.String("client_key", std::string()));
  GROVE_ASSIGN_OR_RETURN(c.authorized_dir, section.String("authorized_dir", std::string()));
  if (!c.keys_dir.empty()) {
    if (c.server_key.empty()) c.server_key = Join(c.keys_dir, "server");
    if (c.client_key.empty()) c.client_key = Join(c.keys_dir, "client");
    if (c.authorized_dir.empty()) c.authorized_dir = Join(c.keys_dir, "authorized");
  }
  if (c.curve && (c.server_key.empty() || c.client_key.empty() || c.authorized_dir.empty())) {
    return Status::InvalidArgument(
        "security.curve = true needs security.keys_dir (or server_key, client_key and "
        "authorized_dir) in " + root.source());
  }
  return c;
}

SecurityConfig SecurityConfig::ForKeysDir(const std::string& dir) {
  SecurityConfig c;
  c.curve = true;
  c.keys_dir = dir;
  c.server_key = Join(dir, "server");
  c.client_key = Join(dir, "client");
  c.authorized_dir = Join(dir, "authorized");
  return c;
}

SecurityConfig SecurityConfig::Absolute() const {
  SecurityConfig c = *this;
  for (std::string* p : {&c.keys_dir, &c.server_key, &c.client_key, &c.authorized_dir}) {
    if (!p->empty()) *p = std::filesystem::absolute(*p).lexically_normal().string();
  }
  return c;
}

Result<SocketSecurity> LoadSocketSecurity(const SecurityConfig& config, KeyUse use) {
  if (!config.curve) return Status::InvalidArgument("security.curve is off");
  SocketSecurity s;
  GROVE_ASSIGN_OR_RETURN(s.client, ReadCurveKeyPair(config.client_key));
  if (use == KeyUse::kServeAndConnect) {
    GROVE_ASSIGN_OR_RETURN(s.server, ReadCurveKeyPair(config.server_key));
  } else {
    GROVE_ASSIGN_OR_RETURN(s.server.public_key, ReadCurveKeyFile(config.server_key + ".pub"));
  }
  return s;
}

Status ApplyServerSecurity(zmq::socket_t& socket, const SocketSecurity& security,
                           const std::string& endpoint) {
  if (security.server.secret_key.empty()) {
    return Status::FailedPrecondition("CurveZMQ is on but this process has no server secret key");
  }
  if (security.authenticator == nullptr) {
    return Status::FailedPrecondition(
        "CurveZMQ is on but this process runs no ZAP handler; it would admit any client");
  }
  try {
    socket.set(zmq::sockopt::curve_server, 1);
    socket.set(zmq::sockopt::curve_secretkey, security.server.secret_key);
    // A ZAP domain makes libzmq ask the handler about every handshake.
    socket.set(zmq::sockopt::zap_domain, kZapDomain);
  } catch (const zmq::error_t& e) {
    return Status::Internal(std::string("set CurveZMQ server options: ") + e.what());
  }
  return security.authenticator->Watch(socket, endpoint);
}

Status ApplyClientSecurity(zmq::socket_t& socket, const SocketSecurity& security) {
  if (security.client.secret_key.empty() || security.server.public_key.empty()) {
    return Status::FailedPrecondition("CurveZMQ is on but the client key pair or server key is missing");
  }
  try {
    socket.set(zmq::sockopt::curve_serverkey, security.server.public_key);
    socket.set(zmq::sockopt::curve_publickey, security.client.public_key);
    socket.set(zmq::sockopt::curve_secretkey, security.client.secret_key);
  } catch (const zmq::error_t& e) {
    return Status::Internal(std::string("set CurveZMQ client options: ") + e.what());
  }
  return Status::OK();
}

Status InstallProcessSecurity(const Config& root, KeyUse use) {
  GROVE_ASSIGN_OR_RETURN(SecurityConfig config, SecurityConfig::FromConfig(root));
  if (!config.curve) return Status::OK();
  return InstallProcessSecurity(config, use);
}

Status InstallProcessSecurity(const SecurityConfig& config, KeyUse use) {
  if (!config.curve) return Status::OK();
  GROVE_ASSIGN_OR_RETURN(SocketSecurity security, LoadSocketSecurity(config, use));
  std::lock_guard<std::mutex> lock(g_mu);
  if (use == KeyUse::kServeAndConnect) {
    GROVE_ASSIGN_OR_RETURN(AuthorizedKeys authorized, ReadAuthorizedKeys(config.authorized_dir));
    const size_t n = authorized.size();
    if (g_authenticator != nullptr) {
      g_authenticator->SetAuthorizedKeys(std::move(authorized));
    } else {
      GROVE_ASSIGN_OR_RETURN(auto started,
                             ZapAuthenticator::Start(SharedContext(), std::move(authorized)));
      g_authenticator = std::move(started);
    }
    // Keys added to (or removed from) authorized_dir apply without a restart.
    g_authenticator->ReloadFrom(config.authorized_dir);
    security.authenticator = g_authenticator;
    LOG(INFO) << "CurveZMQ on: server key " << security.server.public_key << ", own key "
              << security.client.public_key << ", " << n << " authorized client keys in "
              << config.authorized_dir;
  }
  g_security = std::make_shared<const SocketSecurity>(std::move(security));
  return Status::OK();
}

std::shared_ptr<const SocketSecurity> ProcessSocketSecurity() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_security;
}

AuthRefusals ProcessAuthRefusals() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_authenticator != nullptr ? g_authenticator->refusals() : AuthRefusals();
}

}  // namespace grove::actors
