// `grove run coordinator`: serves until SIGTERM/SIGINT.
#include <cstdio>
#include <fstream>

#include <glog/logging.h>

#include "actors/process.h"
#include "cluster/coordinator.h"
#include "cluster/metrics_http.h"
#include "cluster/prometheus_text.h"
#include "cluster/status_view.h"
#include "cluster/roles.h"
#include "cluster/task_prompt_source.h"

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
  // Prompts come from the [task] section's generator; a config without one
  // runs a cluster that only reports health (work requests: "retry later").
  std::unique_ptr<PromptSource> source;
  if (args.config.Has("task")) {
    Config task_cfg = args.config.Section("task");
    auto name = task_cfg.String("name", "arithmetic");
    if (!name.ok()) {
      LOG(ERROR) << name.status();
      return 2;
    }
    auto task = reward::MakeTask(*name, task_cfg);
    if (!task.ok()) {
      LOG(ERROR) << task.status();
      return 2;
    }
    source = std::make_unique<TaskPromptSource>(std::move(*task));
  }
  Coordinator coordinator(*options, std::move(source));
  auto endpoint = coordinator.Bind();
  if (!endpoint.ok()) {
    LOG(ERROR) << endpoint.status();
    return 1;
  }
  LOG(INFO) << "coordinator serving at " << *endpoint << " (epoch " << coordinator.epoch()
            << ", heartbeat " << options->timing.heartbeat_interval_ms << " ms, suspect after "
            << options->timing.suspect_misses << ", dead after "
            << options->timing.liveness_misses << ")";
  // /metrics asks this coordinator for its status like `grove status` does,
  // on the server's own thread, so the exposition always equals what
  // `grove status --json` shows and the coordinator's loop stays
  // single-threaded.
  MetricsServer metrics([endpoint = *endpoint]() -> Result<std::string> {
    GROVE_ASSIGN_OR_RETURN(nlohmann::json status, FetchStatus(endpoint, 2000));
    return RenderPrometheus(status);
  });
  if (!options->metrics_bind.empty() && options->metrics_bind != "off") {
    auto address = metrics.Start(options->metrics_bind);
    if (!address.ok()) {
      LOG(ERROR) << address.status();
      return 1;
    }
    LOG(INFO) << "metrics at http://" << *address << "/metrics";
    // Written before the endpoint file: whoever waits for that one finds
    // this one complete.
    if (!args.run_dir.empty()) {
      Status s = WriteFileAtomically(args.run_dir + "/coordinator.metrics", *address + "\n");
      if (!s.ok()) {
        LOG(ERROR) << s;
        return 1;
      }
    }
  }
  if (!args.endpoint_file.empty()) {
    Status s = WriteFileAtomically(args.endpoint_file, *endpoint + "\n");
    if (!s.ok()) {
      LOG(ERROR) << s;
      return 1;
    }
  }
  actors::InstallDrainSignalHandlers();
  coordinator.Serve([] { return actors::DrainSignalled(); });
  metrics.Stop();
  LOG(INFO) << "coordinator stopped";
  return 0;
}

}  // namespace grove
