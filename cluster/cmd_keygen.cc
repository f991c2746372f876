// grove keygen: CurveZMQ key pairs for a cluster's [security] section.
#include <cstdio>
#include <filesystem>

#include "actors/curve_keys.h"
#include "cluster/cli_flags.h"
#include "cluster/commands.h"

namespace grove::cli {
namespace {

int Fail(const Status& s) {
  std::fprintf(stderr, "grove keygen: %s\n", s.ToString().c_str());
  return 1;
}

// Writes DIR/NAME.key + .pub and, when asked, lists the public key in
// DIR/authorized/NAME.pub.
Status MakePair(const std::string& dir, const std::string& name, bool authorize) {
  GROVE_ASSIGN_OR_RETURN(actors::CurveKeyPair pair, actors::GenerateCurveKeyPair());
  GROVE_RETURN_IF_ERROR(actors::WriteCurveKeyPair(dir, name, pair));
  std::printf("%s/%s.key  (secret, mode 0600)\n%s/%s.pub  %s\n", dir.c_str(), name.c_str(),
              dir.c_str(), name.c_str(), pair.public_key.c_str());
  if (authorize) {
    const std::filesystem::path authorized = std::filesystem::path(dir) / "authorized";
    std::error_code ec;
    std::filesystem::create_directories(authorized, ec);
    if (ec) return Status::IOError("create " + authorized.string() + ": " + ec.message());
    std::filesystem::copy_file(std::filesystem::path(dir) / (name + ".pub"),
                               authorized / (name + ".pub"), ec);
    if (ec) return Status::IOError("authorize " + name + ": " + ec.message());
    std::printf("%s/%s.pub  (admitted by the cluster's servers)\n", authorized.c_str(), name.c_str());
  }
  return Status::OK();
}

}  // namespace

int CmdKeygen(int argc, char** argv) {
  std::string out, name = "client";
  bool authorize = false, cluster = false;
  FlagSet flags(
      "grove keygen --out DIR [--name NAME] [--authorize] | grove keygen --out DIR --cluster",
      "Writes a CurveZMQ key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub (the\n"
      "40-character Z85 public key). --authorize also lists NAME.pub in DIR/authorized/,\n"
      "the keys the cluster's servers admit. --cluster writes a whole keys_dir for\n"
      "[security] keys_dir: server.key/.pub, client.key/.pub and authorized/client.pub.\n"
      "Existing keys are never overwritten.");
  flags.String("out", &out, "directory for the key files (created, mode 0700)");
  flags.String("name", &name, "key pair name: NAME.key and NAME.pub");
  flags.Bool("authorize", &authorize, "also copy NAME.pub into DIR/authorized/");
  flags.Bool("cluster", &cluster, "write server + client pairs and authorize the client");
  Status parsed = flags.Parse(argc, argv, 2);
  if (flags.help()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  if (!parsed.ok()) return Fail(parsed);
  if (out.empty()) return Fail(Status::InvalidArgument("--out DIR is required"));
  if (!flags.positional().empty()) {
    return Fail(Status::InvalidArgument("unexpected argument '" + flags.positional()[0] + "'"));
  }
  if (cluster) {
    Status s = MakePair(out, "server", false);
    if (s.ok()) s = MakePair(out, "client", true);
    return s.ok() ? 0 : Fail(s);
  }
  Status s = MakePair(out, name, authorize);
  return s.ok() ? 0 : Fail(s);
}

}  // namespace grove::cli
