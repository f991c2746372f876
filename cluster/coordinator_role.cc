// `grove run coordinator`: serves until SIGTERM/SIGINT.
#include <cstdio>
#include <fstream>

#include <glog/logging.h>

#include "actors/process.h"
#include "cluster/coordinator.h"
#include "cluster/roles.h"

namespace grove {

namespace {

// Writes via a temporary file and rename, so a reader never sees half.
Status WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    if (!out) return Status::IOError("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return Status::IOError("cannot rename " + tmp);
  return Status::OK();
}

}  // namespace

int RunCoordinator(const RoleArgs& args) {
  auto options = CoordinatorOptions::FromConfig(args.config);
  if (!options.ok()) {
    LOG(ERROR) << options.status();
    return 2;
  }
  if (!args.bind.empty()) options->bind = args.bind;
  // Prompt sources (task generators) are plugged in by the reward/ work; until
  // one is configured, work requests are answered "retry later".
  Coordinator coordinator(*options, nullptr);
  auto endpoint = coordinator.Bind();
  if (!endpoint.ok()) {
    LOG(ERROR) << endpoint.status();
    return 1;
  }
  LOG(INFO) << "coordinator serving at " << *endpoint << " (epoch " << coordinator.epoch()
            << ", heartbeat " << options->timing.heartbeat_interval_ms << " ms, suspect after "
            << options->timing.suspect_misses << ", dead after "
            << options->timing.liveness_misses << ")";
  if (!args.endpoint_file.empty()) {
    Status s = WriteFileAtomically(args.endpoint_file, *endpoint + "\n");
    if (!s.ok()) {
      LOG(ERROR) << s;
      return 1;
    }
  }
  actors::InstallDrainSignalHandlers();
  coordinator.Serve([] { return actors::DrainSignalled(); });
  LOG(INFO) << "coordinator stopped";
  return 0;
}

}  // namespace grove
