// The `grove` program: one table maps each subcommand to its function.
// Add a subcommand (verify, eval, plot, ...) by adding a line.
#include <cstdio>
#include <cstring>

#include "cluster/commands.h"
#include "cluster/metrics_plot.h"
#include "reward/verify_command.h"

namespace {

struct Subcommand {
  const char* name;
  int (*main)(int argc, char** argv);
  const char* summary;
};

// These take argv with their own name first (argv[0] = "verify").
int VerifyCommand(int argc, char** argv) { return grove::reward::VerifyMain(argc - 1, argv + 1); }
int PlotCommand(int argc, char** argv) { return grove::cluster::PlotMain(argc - 1, argv + 1); }

const Subcommand kSubcommands[] = {
    {"up", &grove::cli::CmdUp, "start a local cluster from a config (foreground or --detach)"},
    {"status", &grove::cli::CmdStatus, "show the cluster's health (--json, --watch)"},
    {"scale", &grove::cli::CmdScale, "run N actors of a role: grove scale rollout=4"},
    {"down", &grove::cli::CmdDown, "drain and stop the cluster"},
    {"logs", &grove::cli::CmdLogs, "print an actor's log: grove logs rollout/1 [-f]"},
    {"run", &grove::cli::CmdRun, "run one actor: grove run ROLE --id ID --coordinator tcp://H:P"},
    {"verify", &VerifyCommand, "score completions offline: grove verify --verifiers format:0.1,exact:1 --input F"},
    {"eval", &grove::cli::CmdEval, "held-out accuracy of a checkpoint: grove eval --checkpoint DIR"},
    {"keygen", &grove::cli::CmdKeygen, "CurveZMQ keys for [security]: grove keygen --out DIR --cluster"},
    {"plot", &PlotCommand, "draw reward, accuracy and KL of a run: grove plot RUN_DIR"},
};

void PrintHelp(FILE* out) {
  std::fprintf(out, "usage: grove SUBCOMMAND [flags]   (grove SUBCOMMAND --help for its flags)\n\n");
  for (const auto& s : kSubcommands) std::fprintf(out, "  %-8s %s\n", s.name, s.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    PrintHelp(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  for (const auto& s : kSubcommands) {
    if (std::strcmp(argv[1], s.name) == 0) return s.main(argc, argv);
  }
  std::fprintf(stderr, "grove: unknown subcommand '%s'\n\n", argv[1]);
  PrintHelp(stderr);
  return 2;
}
