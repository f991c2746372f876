// grove run ROLE: one actor in this process, as launchers start them.
#include <cstdio>
#include <filesystem>

#include <glog/logging.h>

#include "actors/curve_security.h"
#include "actors/process.h"
#include "cluster/cli_flags.h"
#include "cluster/commands.h"
#include "cluster/roles.h"

namespace grove::cli {

int CmdRun(int argc, char** argv) {
  RoleArgs args;
  int64_t restarts = 0;
  std::vector<std::string> sets;
  std::string roles_text;
  for (const auto& r : Roles()) roles_text += std::string("\n  ") + r.name + ": " + r.summary;
  FlagSet flags("grove run ROLE --id ID [--coordinator tcp://H:P] [--config FILE] [flags]",
                "Runs one actor of ROLE in this process until it is drained or stopped.\n"
                "Roles in this build:" + roles_text);
  flags.String("id", &args.id, "actor id, unique in the cluster (default: the role name)");
  flags.String("coordinator", &args.coordinator, "coordinator endpoint tcp://HOST:PORT");
  flags.String("config", &args.config_path, "experiment config (TOML)");
  flags.Repeated("set", &sets, "config override a.b=VALUE");
  flags.String("bind", &args.bind, "endpoint to serve on (port 0: any free port)");
  flags.Int("restarts", &restarts, "how often the launcher restarted this id");
  flags.String("run_dir", &args.run_dir, "run directory");
  flags.String("endpoint_file", &args.endpoint_file,
               "write the bound endpoint here once serving");
  Status parsed = flags.Parse(argc, argv, 2);
  if (flags.help()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  if (!parsed.ok() || flags.positional().size() != 1) {
    std::fprintf(stderr, "grove run: %s\n\n%s",
                 parsed.ok() ? "name exactly one ROLE" : parsed.message().c_str(),
                 flags.Usage().c_str());
    return 2;
  }
  args.role = flags.positional()[0];
  const RoleEntry* role = FindRole(args.role);
  if (role == nullptr) {
    std::fprintf(stderr, "grove run: no role '%s' in this build.%s\n", args.role.c_str(),
                 ("\nRoles:" + roles_text).c_str());
    return 2;
  }
  if (args.role != "coordinator" && args.coordinator.empty()) {
    std::fprintf(stderr, "grove run: %s needs --coordinator tcp://HOST:PORT (grove status shows it)\n",
                 args.role.c_str());
    return 2;
  }
  if (args.id.empty()) args.id = args.role;
  args.restarts = static_cast<uint32_t>(std::max<int64_t>(0, restarts));
  if (!args.config_path.empty()) {
    auto config = Config::LoadFile(args.config_path);
    if (!config.ok()) {
      std::fprintf(stderr, "grove run: %s\n", config.status().ToString().c_str());
      return 2;
    }
    args.config = std::move(*config);
  }
  for (const auto& s : sets) {
    Status st = args.config.Override(s);
    if (!st.ok()) {
      std::fprintf(stderr, "grove run: --set %s: %s\n", s.c_str(), st.ToString().c_str());
      return 2;
    }
  }
  actors::InitActorLogging(argv[0], args.id);
  // Before the role opens any socket: with [security] curve = true every
  // socket of this process serves and connects with CurveZMQ.
  Status security = actors::InstallProcessSecurity(args.config);
  if (!security.ok()) {
    LOG(ERROR) << "security: " << security;
    std::fprintf(stderr, "grove run: [security]: %s\n", security.ToString().c_str());
    return 2;
  }
  return role->main(args);
}

}  // namespace grove::cli
