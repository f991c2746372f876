// A test-only program for the NCCL weight tests (not a role of grove): a
// learner that publishes PeerWeights versions through NcclWeightBroadcaster,
// a rollout worker that receives them through NcclWeightReceiver and checks
// each bit for bit, or the reader side of the CUDA IPC test. Each registers
// with the coordinator and heartbeats like a real actor, and appends one
// line per event to --out, which the test reads.
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <cuda_runtime_api.h>
#include <gflags/gflags.h>
#include <glog/logging.h>

#include "actors/actor_client.h"
#include "actors/codec.h"
#include "actors/cuda_ipc.h"
#include "learner/nccl_weight_broadcaster.h"
#include "rollout/nccl_weight_receiver.h"
#include "tests/weights_nccl/weights_peer.h"

DEFINE_string(role, "", "learner | worker | ipc_reader");
DEFINE_string(coordinator, "", "coordinator endpoint");
DEFINE_string(id, "", "actor id");
DEFINE_int32(device, 0, "CUDA device");
DEFINE_uint64(seed, 1, "weights seed");
DEFINE_uint64(floats, 1 << 20, "floats per version");
DEFINE_uint64(bucket_bytes, 1 << 20, "NCCL bucket");
DEFINE_int64(deadline_ms, 3000, "group formation / transfer deadline");
DEFINE_int64(poll_ms, 50, "coordinator poll interval");
DEFINE_int64(versions, 5, "learner: versions to publish; worker: exit once it holds this one");
DEFINE_int64(interval_ms, 500, "learner: time between versions");
DEFINE_int64(run_ms, 20000, "learner: run this long; worker: give up after this long");
DEFINE_int64(die_at_version, -1, "worker: SIGKILL itself after this version's header arrived");
DEFINE_bool(install, false,
            "worker: after each version, install it as an engine would: a device buffer, the upload, "
            "cudaDeviceSynchronize (waits for every kernel of this process, a parked NCCL receive too)");
DEFINE_bool(to_device, false,
            "worker: versions stay on the GPU (NcclReceiverOptions::to_device); each is downloaded and compared, "
            "held --hold_ms while newer ones arrive, and compared again");
DEFINE_int64(hold_ms, 0, "worker with --to_device: how long to hold each version before comparing it again");
DEFINE_string(out, "", "event log");
DEFINE_string(frame, "", "ipc_reader: the WeightAnnounce frame to read");
DEFINE_string(frame2, "", "ipc_reader: the announce to read when the first one's slot moved on (Aborted)");
DEFINE_int64(rewrite_with_version, -1,
             "ipc_reader: in the middle of the first copy, rewrite the slot with PeerWeights of this version "
             "(a learner reusing the slot while this reader reads it)");

namespace {

using namespace grove;

void Event(const std::string& line) {
  std::ofstream f(FLAGS_out, std::ios::app);
  f << line << "\n";
}

std::unique_ptr<actors::ActorClient> Register(wire::Role role) {
  actors::ActorClientOptions o;
  o.role = role;
  o.id = FLAGS_id;
  o.coordinator = FLAGS_coordinator;
  auto c = std::make_unique<actors::ActorClient>(o);
  Status s = c->Start();
  if (!s.ok()) {
    Event("error register " + s.ToString());
    return nullptr;
  }
  return c;
}

int RunLearner() {
  auto client = Register(wire::Role::LEARNER);
  if (!client) return 1;
  learner::NcclBroadcasterOptions o;
  o.coordinator = FLAGS_coordinator;
  o.learner_id = FLAGS_id;
  o.device = FLAGS_device;
  o.bucket_bytes = FLAGS_bucket_bytes;
  o.deadline_ms = FLAGS_deadline_ms;
  o.poll_ms = FLAGS_poll_ms;
  auto b = learner::NcclWeightBroadcaster::Start(o);
  if (!b.ok()) {
    Event("error start " + b.status().ToString());
    return 1;
  }
  const auto start = std::chrono::steady_clock::now();
  auto elapsed_ms = [&] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
  };
  int64_t version = 0;
  learner::NcclBroadcasterStats last;
  int64_t next_publish = 0;
  while (elapsed_ms() < FLAGS_run_ms) {
    if (version < FLAGS_versions && elapsed_ms() >= next_publish) {
      ++version;
      (*b)->Publish(std::make_shared<actors::WeightSnapshot>(testing::PeerWeights(FLAGS_seed, version, FLAGS_floats)));
      client->SetPolicyVersion(version);
      Event("published " + std::to_string(version));
      next_publish = elapsed_ms() + FLAGS_interval_ms;
    }
    learner::NcclBroadcasterStats s = (*b)->stats();
    if (s.versions_sent != last.versions_sent || s.failures != last.failures || s.epoch != last.epoch) {
      std::ostringstream line;
      line << "stats epoch " << s.epoch << " size " << s.group_size << " sent " << s.last_sent_version
           << " count " << s.versions_sent << " failures " << s.failures << " ms " << s.last_broadcast_ms;
      Event(line.str());
      last = s;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  Event("done");
  b->reset();
  client->Shutdown(wire::ActorState::STOPPED, "run_ms elapsed", true);
  return 0;
}

// The device side of an engine's install: allocate, upload, wait for the
// whole device, free. Returns a CUDA error's name, or "" when it finished.
std::string InstallOnDevice(const actors::WeightSnapshot& snap) {
  const size_t bytes = snap.flat.size() * sizeof(float);
  void* dev = nullptr;
  cudaError_t e = cudaSetDevice(FLAGS_device);
  if (e == cudaSuccess) e = cudaMalloc(&dev, bytes);
  if (e == cudaSuccess) e = cudaMemcpy(dev, snap.flat.data(), bytes, cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (dev != nullptr && cudaFree(dev) != cudaSuccess && e == cudaSuccess) e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorName(e);
}

int RunWorker() {
  auto client = Register(wire::Role::ROLLOUT);
  if (!client) return 1;
  rollout::NcclReceiverOptions o;
  o.coordinator = FLAGS_coordinator;
  o.worker_id = FLAGS_id;
  o.device = FLAGS_device;
  o.deadline_ms = FLAGS_deadline_ms;
  o.poll_ms = FLAGS_poll_ms;
  actors::ActorClient* c = client.get();
  o.learner_version = [c] { return c->coordinator_policy_version(); };
  o.to_device = FLAGS_to_device;
  if (FLAGS_die_at_version >= 0) {
    o.after_header = [](int64_t v) {
      if (v == FLAGS_die_at_version) {
        Event("dying at " + std::to_string(v));
        raise(SIGKILL);
      }
    };
  }
  auto r = rollout::NcclWeightReceiver::Start(o);
  if (!r.ok()) {
    Event("error start " + r.status().ToString());
    return 1;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(FLAGS_run_ms);
  int64_t have = -1;
  bool all_ok = true;
  while (std::chrono::steady_clock::now() < deadline && have < FLAGS_versions) {
    const float* on_device = nullptr;
    std::optional<actors::WeightSnapshot> got = (*r)->TakeNewer(have, &on_device);
    if (!got) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    actors::WeightSnapshot expect = testing::PeerWeights(FLAGS_seed, got->version, FLAGS_floats);
    // A version kept on the device: its flat is empty; its bytes come down
    // for the comparison.
    auto download = [&]() -> std::string {
      if (on_device == nullptr) return "no device copy";
      got->flat.resize(expect.flat.size());
      const cudaError_t e =
          cudaMemcpy(got->flat.data(), on_device, got->flat.size() * sizeof(float), cudaMemcpyDeviceToHost);
      return e == cudaSuccess ? "" : cudaGetErrorName(e);
    };
    if (FLAGS_to_device) {
      const bool kept_off_host = got->flat.empty();
      const std::string err = download();
      if (!kept_off_host || !err.empty()) {
        Event("got " + std::to_string(got->version) + " MISMATCH: " + (kept_off_host ? err : "a host copy"));
        all_ok = false;
        break;
      }
    }
    bool same = got->flat.size() == expect.flat.size() &&
                std::memcmp(got->flat.data(), expect.flat.data(), expect.flat.size() * sizeof(float)) == 0 &&
                got->checksum == expect.checksum && got->tensors.size() == expect.tensors.size();
    for (size_t i = 0; same && i < expect.tensors.size(); ++i) {
      same = got->tensors[i].name == expect.tensors[i].name && got->tensors[i].offset == expect.tensors[i].offset &&
             got->tensors[i].count == expect.tensors[i].count && got->tensors[i].shape == expect.tensors[i].shape;
    }
    all_ok = all_ok && same;
    rollout::NcclReceiverStats s = (*r)->stats();
    Event("got " + std::to_string(got->version) + (same ? " ok" : " MISMATCH") + " epoch " +
          std::to_string(s.epoch) + " rank " + std::to_string(s.rank) + " ms " + std::to_string(s.last_receive_ms));
    if (FLAGS_to_device && FLAGS_hold_ms > 0) {
      // Newer versions arrive meanwhile; the held one's bytes must stay.
      std::this_thread::sleep_for(std::chrono::milliseconds(FLAGS_hold_ms));
      const std::string err = download();
      const bool kept = err.empty() && std::memcmp(got->flat.data(), expect.flat.data(),
                                                    expect.flat.size() * sizeof(float)) == 0;
      all_ok = all_ok && kept;
      Event("held " + std::to_string(got->version) + (kept ? " ok" : " MISMATCH " + err) + " newest received " +
            std::to_string((*r)->stats().last_version));
    }
    if (FLAGS_install) {
      // Give the receiver thread time to post whatever it posts next.
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      const std::string err = InstallOnDevice(*got);
      Event("installed " + std::to_string(got->version) + (err.empty() ? " ok" : " " + err));
    }
    have = got->version;
    client->SetPolicyVersion(have);
  }
  Event(have >= FLAGS_versions ? "done" : "timeout at " + std::to_string(have));
  r->reset();
  client->Shutdown(wire::ActorState::STOPPED, "done", true);
  return have >= FLAGS_versions && all_ok ? 0 : 1;
}

Result<std::string> ReadFrame(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("cannot read " + path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Reads a WeightAnnounce frame carrying a CUDA IPC handle, copies the slot
// into this process's device memory (verified there), then to the host,
// checks the announce's checksum, and writes the bytes to --out. With
// --rewrite_with_version the slot is rewritten mid-copy: the torn read must
// be seen, and --frame2 (the newer announce) is read instead. Prints
// "torn N" on stderr. Exit codes: 2 decode, 3 receive, 4 output.
int RunIpcReader() {
  actors::IpcReadOptions ro;
  ro.device = FLAGS_device;
  if (FLAGS_rewrite_with_version >= 0) {
    ro.mid_copy = [](int, void* slot) {
      static bool rewritten = false;  // once: the first copy of the first announce
      if (rewritten) return;
      rewritten = true;
      actors::WeightSnapshot next = testing::PeerWeights(FLAGS_seed, FLAGS_rewrite_with_version, FLAGS_floats);
      uint64_t* scratch = nullptr;
      Status s = cudaMalloc(reinterpret_cast<void**>(&scratch), sizeof(uint64_t)) == cudaSuccess
                     ? actors::WriteIpcWeightSlot(slot, next.flat.data(), false, next.flat.size() * sizeof(float),
                                                  next.version, next.checksum, scratch, nullptr)
                     : Status::Unavailable("cudaMalloc");
      if (scratch != nullptr) cudaFree(scratch);
      if (!s.ok()) std::fprintf(stderr, "rewrite: %s\n", s.ToString().c_str());
    };
  }
  actors::IpcReadStats stats;
  int tries = 0;
  for (const std::string& path : {FLAGS_frame, FLAGS_frame2}) {
    if (path.empty()) break;
    ++tries;
    Result<std::string> frame = ReadFrame(path);
    if (!frame.ok()) {
      std::fprintf(stderr, "frame: %s\n", frame.status().ToString().c_str());
      return 2;
    }
    auto decoded = actors::DecodeFrame(frame->data(), frame->size(), {actors::BodyKind::WEIGHT_ANNOUNCE}, nullptr);
    if (!decoded.ok()) {
      std::fprintf(stderr, "decode: %s\n", decoded.status().ToString().c_str());
      return 2;
    }
    Result<actors::WeightSnapshot> snap =
        actors::ReceiveIpcWeights(decoded->envelope().getBody().getWeightAnnounce(), uint64_t{1} << 32, ro, &stats);
    std::fprintf(stderr, "torn %d\n", stats.torn);
    if (!snap.ok()) {
      std::fprintf(stderr, "receive: %s\n", snap.status().ToString().c_str());
      if (snap.status().code() == StatusCode::kAborted && tries == 1 && !FLAGS_frame2.empty()) continue;
      return 3;
    }
    std::fprintf(stderr, "read version %lld\n", static_cast<long long>(snap->version));
    std::ofstream out(FLAGS_out, std::ios::binary);
    out.write(reinterpret_cast<const char*>(snap->flat.data()), snap->flat.size() * sizeof(float));
    return out.good() ? 0 : 4;
  }
  return 3;
}

}  // namespace

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  google::InitGoogleLogging(argv[0]);
  FLAGS_logtostderr = true;
  if (FLAGS_role == "learner") return RunLearner();
  if (FLAGS_role == "worker") return RunWorker();
  if (FLAGS_role == "ipc_reader") return RunIpcReader();
  std::fprintf(stderr, "--role must be learner, worker or ipc_reader\n");
  return 2;
}
