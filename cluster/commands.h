// The `grove` subcommands. Each is `int Cmd<Name>(int argc, char** argv)`
// with argv[0] = "grove" and argv[1] = the subcommand; each answers --help.
#pragma once

namespace grove::cli {

int CmdUp(int argc, char** argv);
int CmdStatus(int argc, char** argv);
int CmdScale(int argc, char** argv);
int CmdDown(int argc, char** argv);
int CmdRun(int argc, char** argv);
int CmdEval(int argc, char** argv);     // grove eval
int CmdLogs(int argc, char** argv);     // grove logs ROLE[/ID] [-f]
int CmdKeygen(int argc, char** argv);   // grove keygen --out DIR [--name NAME]

}  // namespace grove::cli
