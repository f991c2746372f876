// A test-only actor program: registers with the coordinator through the
// real runtime (ActorProcess), serves a data socket that answers
// statusRequest with commandReply{matched = frames served} and counts bad
// frames, and publishes its figures in heartbeats. Started by the
// multi-process tests directly and by `grove up` via [launcher.programs].
// Not a test itself: the tests that start it make the assertions.
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "actors/curve_security.h"
#include "actors/process.h"

DEFINE_string(role, "rollout", "role to register as");
DEFINE_string(id, "test-actor", "actor id");
DEFINE_string(coordinator, "", "coordinator endpoint");
DEFINE_string(config, "", "config; only its [security] section is used");
DEFINE_string(run_dir, "", "ignored (the launcher passes it)");
DEFINE_int32(restarts, 0, "restart count from the launcher");
DEFINE_string(endpoint_file, "", "write the data endpoint here");
DEFINE_int32(crash_after_ms, -1, "abort() after this many ms (tests restarts)");
DEFINE_int32(max_frame_bytes, 1 << 20, "data socket frame limit");

// For tests through `grove up`, which passes only the standard flags:
// GROVE_TEST_<ROLE>_EXIT="after_ms:code" makes actors of that role finish
// after after_ms with exit code `code` (e.g. a learner ending a run).
bool ExitPlan(const std::string& role, int* after_ms, int* code) {
  std::string name = "GROVE_TEST_" + role + "_EXIT";
  for (auto& c : name) c = static_cast<char>(std::toupper(c));
  const char* v = std::getenv(name.c_str());
  return v != nullptr && std::sscanf(v, "%d:%d", after_ms, code) == 2;
}

using grove::actors::BodyKind;

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  grove::actors::InitActorLogging(argv[0], FLAGS_id);
  if (!FLAGS_config.empty()) {
    // As `grove run` does: CurveZMQ on every socket when [security] says so.
    auto config = grove::Config::LoadFile(FLAGS_config);
    grove::Status security =
        config.ok() ? grove::actors::InstallProcessSecurity(*config) : config.status();
    if (!security.ok()) {
      LOG(ERROR) << "security: " << security;
      return 2;
    }
  }

  grove::actors::SocketOptions socket_options;
  socket_options.max_frame_bytes = static_cast<size_t>(FLAGS_max_frame_bytes);
  grove::actors::RouterSocket data(socket_options);
  auto endpoint = data.Bind("tcp://127.0.0.1:0");
  CHECK(endpoint.ok()) << endpoint.status();

  grove::RoleArgs args;
  args.role = FLAGS_role;
  args.id = FLAGS_id;
  args.coordinator = FLAGS_coordinator;
  args.restarts = static_cast<uint32_t>(FLAGS_restarts);
  grove::wire::Role role = grove::wire::Role::ROLLOUT;
  if (FLAGS_role == "verifier") role = grove::wire::Role::VERIFIER;
  if (FLAGS_role == "replay") role = grove::wire::Role::REPLAY;
  if (FLAGS_role == "learner") role = grove::wire::Role::LEARNER;
  auto proc = grove::actors::ActorProcess::Start(args, role, *endpoint);
  if (!proc.ok()) {
    LOG(ERROR) << proc.status();
    return 1;
  }
  if (!FLAGS_endpoint_file.empty()) {
    std::ofstream(FLAGS_endpoint_file + ".tmp") << *endpoint << "\n";
    std::rename((FLAGS_endpoint_file + ".tmp").c_str(), FLAGS_endpoint_file.c_str());
  }
  auto& client = (*proc)->client();
  const int64_t started = grove::actors::MonotonicMs();
  uint64_t served = 0;
  int exit_after_ms = -1, exit_code = 0;
  const bool planned_exit = ExitPlan(FLAGS_role, &exit_after_ms, &exit_code);
  while (!(*proc)->draining()) {
    if (planned_exit && grove::actors::MonotonicMs() - started > exit_after_ms) {
      if (exit_code != 0) LOG(ERROR) << "planned failure: exit " << exit_code;
      return (*proc)->Finish(exit_code, "");
    }
    if (FLAGS_crash_after_ms >= 0 && grove::actors::MonotonicMs() - started > FLAGS_crash_after_ms) {
      std::abort();
    }
    if (auto in = data.Receive(20)) {
      auto frame = grove::actors::DecodeFrame(
          in->payload.data(), in->payload.size(), {BodyKind::STATUS_REQUEST}, &data.stats(),
          grove::actors::DecodeLimits{.max_frame_bytes = socket_options.max_frame_bytes});
      if (frame.ok()) {
        ++served;
        capnp::MallocMessageBuilder reply;
        grove::actors::InitEnvelope(reply, FLAGS_id, frame->envelope().getRequestId())
            .getBody()
            .initCommandReply()
            .setMatched(static_cast<uint32_t>(served));
        (void)data.Send(in->peer, grove::actors::EncodeFrame(reply));
      }
    }
    client.SetCounter("served", static_cast<double>(served));
    client.SetCounter("registrations", static_cast<double>(client.registrations()));
    for (int e = 0; e < grove::actors::kFrameErrorCount; ++e) {
      auto err = static_cast<grove::actors::FrameError>(e);
      client.SetCounter("bad_frames_" + std::string(grove::actors::FrameErrorName(err)),
                        static_cast<double>(data.stats().Get(err)));
    }
  }
  (*proc)->ReportDraining();
  (*proc)->WaitFor(0);
  return (*proc)->Finish(0, "");
}
