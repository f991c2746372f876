// What a new policy version costs a rollout worker that shares the
// learner's GPU (issue 10, "the time a rollout worker stalls per version"),
// through the code the roles run, in two processes on GPU 0:
//   learner (this process): a WeightPublisher with the IpcWeightExport, a
//     random fp32 version of the model (--config, default the GPU reference
//     model) published --versions times (a changed value each time), with a
//     device copy of it beside (as the GPU learner's fp32 masters) that the
//     export copies from device to device;
//   worker (this program again, --role=worker): a GpuGenerator and, per
//     version, both paths the worker has:
//     device (what the roles run): WeightSource::TakeNewer (announce, IPC
//       copy into the worker's device buffer, headers + device checksum),
//       then GenerationBackend's InstallFromDevice path: Formats and
//       GpuGenerator::LoadWeightsFromDevice;
//     host (the old path, still there for CPU engines):
//       FetchNewerWeights (IPC copy, then to the host, host checksum), then
//       Formats and GpuGenerator::LoadWeights (upload, quantize).
//   --quantize=plan: the worker is the GPU engine of a plan-mode rollout
//     worker (MakeGpuBackend: GpuPlanMeasurer on this GPU, random-token
//     calibration prompts) and each version takes the device path only,
//     GenerationBackend::InstallFromDevice: the weight-change trigger on the
//     device, a plan when due (the first version; every
//     --plan_every_versions), LoadWeightsFromDevice. (The host path would
//     remake the plan on every version here: a plan made from device
//     weights keeps no host copy to compare with; docs/rollout.md has its
//     cost.)
// The worker prints one row per version and path: receive, install, stall;
// the learner prints its side (checksum, publish = device copy for IPC).
// The worker tells the learner it is done with a version through a pipe, so
// the learner's next version never lands in a slot being read.
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>
#include <gflags/gflags.h>

#include "actors/cuda_ipc.h"
#include "actors/rpc_client.h"
#include "learner/ipc_weight_export.h"
#include "learner/weight_publisher.h"
#include "model/config.h"
#include "model/param_layout.h"
#include "rollout/generation_backend.h"
#include "rollout/gpu_generation_backend.h"
#include "rollout/gpu_generator.h"
#include "rollout/policy_quantizer.h"
#include "rollout/weight_fetch.h"

DEFINE_string(config, "configs/model/gpu-ref.toml", "model config (its [model] section)");
DEFINE_int32(versions, 3, "versions published");
DEFINE_string(quantize, "int8", "the worker's [rollout] quantize: none, int8, int4 or plan");
DEFINE_int32(plan_every_versions, 0, "plan mode: the worker's [rollout] plan_every_versions (0: by weight change)");
DEFINE_string(role, "learner", "learner (starts the worker) | worker");
DEFINE_string(endpoint, "", "worker: the learner's publisher");

extern char** environ;

namespace {

using namespace grove;
using Clock = std::chrono::steady_clock;
double Ms(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

void Die(const Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "ipc_stall_bench %s: %s: %s\n", FLAGS_role.c_str(), what, s.ToString().c_str());
  std::exit(1);
}

constexpr int kDoneFd = 3;  // the worker's end of the pipe back to the learner

int RunWorker(const model::ModelConfig& c) {
  rollout::QuantizeSettings qs;
  Result<Config> qc = Config::Parse("[rollout]\nquantize = \"" + FLAGS_quantize + "\"\nplan_every_versions = " +
                                        std::to_string(FLAGS_plan_every_versions) + "\n",
                                    "--quantize");
  Die(qc.status(), "quantize flag");
  Result<rollout::QuantizeSettings> parsed = rollout::ParseQuantizeSettings(qc->Section("rollout"));
  Die(parsed.status(), "quantize flag");
  const bool plan = parsed->mode == rollout::QuantizeMode::kPlan;
  rollout::PolicyQuantizer quantizer(*parsed, {}, 0);
  std::unique_ptr<rollout::GpuGenerator> gen;
  std::unique_ptr<rollout::GenerationBackend> backend;  // plan mode
  if (plan) {
    // Calibration prompts: plan_sequences of 16 random tokens (what the
    // plan costs depends on their count and lengths, not on the task).
    std::vector<std::vector<int32_t>> prompts(size_t(parsed->plan_sequences));
    uint64_t x = 17;
    for (auto& p : prompts)
      for (int i = 0; i < 16; ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        p.push_back(int32_t((x >> 33) % uint64_t(c.vocab_size)));
      }
    auto q = std::make_unique<rollout::PolicyQuantizer>(*parsed, std::move(prompts), 0);
    rollout::BackendSettings bs;
    bs.device = rollout::RolloutDevice::kGpu;
    bs.max_batch = 8;
    bs.kv_memory_fraction = 0.05;
    Result<std::unique_ptr<rollout::GenerationBackend>> b = rollout::MakeGpuBackend(bs, 0, c, q);
    Die(b.status(), "MakeGpuBackend");
    backend = std::move(*b);
    if (!backend->installs_from_device())
      Die(Status::FailedPrecondition("plan mode without its GPU measurer installs from the host only"), "backend");
  } else {
    rollout::GpuGeneratorOptions o;
    o.max_batch = 8;
    o.kv_memory_fraction = 0.05;
    Result<std::unique_ptr<rollout::GpuGenerator>> g = rollout::GpuGenerator::Create(c, o);
    Die(g.status(), "GpuGenerator::Create");
    gen = std::move(*g);
  }
  actors::RpcClient rpc("rollout-0");
  Die(rpc.Connect(FLAGS_endpoint), "connect");
  // The device path, as rollout_actor sets it up (transport auto, the
  // learner on this GPU: CUDA IPC, kept on the device).
  Result<Config> wc = Config::Parse("[weights]\ntransport = \"auto\"\n", "bench");
  Die(wc.status(), "weights config");
  rollout::FetchOptions fo;
  fo.timeout_ms = 120000;
  fo.max_bytes = uint64_t{64} << 30;
  fo.ipc_to_device = true;
  Result<std::unique_ptr<rollout::WeightSource>> source =
      rollout::WeightSource::Start(*wc, "rollout-0", "tcp://127.0.0.1:1", 0, fo);
  Die(source.status(), "WeightSource");
  // The host path: FetchNewerWeights with this GPU's UUID.
  rollout::FetchOptions host_fo = fo;
  Result<std::string> uuid = actors::CudaDeviceUuid(0);
  Die(uuid.status(), "device UUID");
  host_fo.device_uuid = *uuid;
  host_fo.ipc_device = 0;
  host_fo.ipc_to_device = false;
  std::printf("| version | path | worker receive ms | install ms | device load ms | stall ms |\n");
  std::printf("| --- | --- | --- | --- | --- | --- |\n");
  std::fflush(stdout);
  int64_t have = -1;
  const auto deadline = Clock::now() + std::chrono::minutes(5);
  while (have < FLAGS_versions && Clock::now() < deadline) {
    const auto t0 = Clock::now();
    Result<std::optional<actors::WeightSnapshot>> got = (*source)->TakeNewer(&rpc, have);
    if (!got.ok() && got.status().code() == StatusCode::kFailedPrecondition) {  // nothing published yet
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    Die(got.status(), "fetch (device path)");
    if (!got->has_value()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    const double receive_ms = Ms(t0);
    actors::WeightSnapshot& snap = **got;
    const float* on_device = (*source)->device_weights();
    if (on_device == nullptr) Die(Status::Internal("the version came to the host, not through CUDA IPC"), "fetch");
    const auto t1 = Clock::now();
    if (plan) {
      const int64_t plans_before = backend->quantizer().plans_made();
      Die(backend->InstallFromDevice(snap.version, snap.tensors, on_device), "InstallFromDevice");
      const double install_ms = Ms(t1);
      const rollout::PolicyQuantizer& pq = backend->quantizer();
      char what[64];
      if (pq.plans_made() > plans_before) std::snprintf(what, sizeof what, "plan made in %.3f s", pq.plan_seconds());
      else std::snprintf(what, sizeof what, "plan kept, change %.2e", pq.last_weight_change());
      std::printf("| %lld | device, %s | %.1f | %.1f | %.1f | %.1f |\n", (long long)snap.version, what, receive_ms,
                  install_ms, 1e3 * backend->last_device_load_seconds(), receive_ms + install_ms);
      std::fflush(stdout);
      have = snap.version;
      const std::string line = std::to_string(have) + "\n";
      if (write(kDoneFd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
        Die(Status::IOError("pipe to the learner"), "done");
      continue;
    }
    Result<rollout::FormatChooser> choose = quantizer.Formats(snap.version, c, snap.tensors, {}, nullptr);
    Die(choose.status(), "formats");
    Result<double> load = gen->LoadWeightsFromDevice(on_device, *choose);
    Die(load.status(), "LoadWeightsFromDevice");
    const double install_ms = Ms(t1);
    std::printf("| %lld | device | %.1f | %.1f | %.1f | %.1f |\n", (long long)snap.version, receive_ms, install_ms,
                1e3 * *load, receive_ms + install_ms);
    std::fflush(stdout);
    // The same version again, the old way.
    const auto h0 = Clock::now();
    Result<std::optional<actors::WeightSnapshot>> host = rollout::FetchNewerWeights(rpc, snap.version - 1, host_fo);
    Die(host.status(), "fetch (host path)");
    if (!host->has_value() || (*host)->version != snap.version) Die(Status::Internal("host path: another version"), "fetch");
    const double host_receive_ms = Ms(h0);
    const auto h1 = Clock::now();
    Result<rollout::FormatChooser> host_choose =
        quantizer.Formats((*host)->version, c, (*host)->tensors, (*host)->flat, nullptr);
    Die(host_choose.status(), "formats");
    Result<double> host_load = gen->LoadWeights((*host)->flat, *host_choose);
    Die(host_load.status(), "LoadWeights");
    const double host_install_ms = Ms(h1);
    std::printf("| %lld | host | %.1f | %.1f | %.1f | %.1f |\n", (long long)snap.version, host_receive_ms,
                host_install_ms, 1e3 * *host_load, host_receive_ms + host_install_ms);
    std::fflush(stdout);
    have = snap.version;
    const std::string line = std::to_string(have) + "\n";
    if (write(kDoneFd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
      Die(Status::IOError("pipe to the learner"), "done");
  }
  return have >= FLAGS_versions ? 0 : 1;
}

int RunLearner(const model::ModelConfig& c, const char* self) {
  const model::ParamLayout layout(c);
  auto t0 = Clock::now();
  std::vector<float> flat(static_cast<size_t>(layout.total()));
  // Values do not change what the transfer or the quantization costs: a
  // cheap fill (a 64-bit LCG's high bits, in about [-0.05, 0.05)).
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (float& v : flat) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<float>(static_cast<int32_t>(x >> 32)) * (0.05f / 2147483648.0f);
  }
  std::vector<actors::TensorSpec> tensors;
  for (const model::TensorInfo& t : layout.tensors())
    tensors.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  std::printf("model %s: %lld parameters = %.2f GB fp32 (filled in %.0f ms); worker quantize = %s\n",
              FLAGS_config.c_str(), (long long)layout.total(), 4e-9 * double(layout.total()), Ms(t0),
              FLAGS_quantize.c_str());

  Result<std::unique_ptr<learner::WeightPublisher>> pub =
      learner::WeightPublisher::Start("tcp://127.0.0.1:0", "learner-0", uint64_t{1} << 20);
  Die(pub.status(), "publisher");
  Result<std::unique_ptr<learner::DeviceWeightExport>> device_export = learner::IpcWeightExport::Create(0);
  Die(device_export.status(), "IPC export");
  (*pub)->SetDeviceExport(std::move(*device_export));

  int fds[2];
  if (pipe(fds) != 0) Die(Status::IOError("pipe"), "pipe");
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], kDoneFd);
  posix_spawn_file_actions_addclose(&fa, fds[0]);
  const std::string a_config = "--config=" + FLAGS_config, a_versions = "--versions=" + std::to_string(FLAGS_versions),
                    a_quant = "--quantize=" + FLAGS_quantize, a_end = "--endpoint=" + (*pub)->endpoint(),
                    a_every = "--plan_every_versions=" + std::to_string(FLAGS_plan_every_versions);
  std::vector<char*> argv = {const_cast<char*>(self), const_cast<char*>("--role=worker"),
                             const_cast<char*>(a_config.c_str()), const_cast<char*>(a_versions.c_str()),
                             const_cast<char*>(a_quant.c_str()), const_cast<char*>(a_end.c_str()),
                             const_cast<char*>(a_every.c_str()), nullptr};
  pid_t child = 0;
  if (posix_spawn(&child, self, &fa, nullptr, argv.data(), environ) != 0) Die(Status::IOError("spawn"), "worker");
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);

  // The GPU learner's fp32 masters stand-in: the version on the device,
  // which the export copies from (device to device) once a worker asked.
  float* masters = nullptr;
  if (cudaMalloc(reinterpret_cast<void**>(&masters), flat.size() * sizeof(float)) != cudaSuccess)
    Die(Status::ResourceExhausted("device copy of the weights"), "cudaMalloc");
  std::vector<std::string> rows;
  std::string pending;
  bool ok = true;
  for (int v = 1; v <= FLAGS_versions && ok; ++v) {
    flat[static_cast<size_t>(v) % flat.size()] += 1.0f;  // a new version, a new checksum
    auto snap = std::make_shared<actors::WeightSnapshot>();
    snap->version = v;
    snap->tensors = tensors;
    auto tc = Clock::now();
    snap->flat = flat;
    snap->checksum = actors::WeightChecksum(snap->flat.data(), snap->flat.size());
    const double checksum_ms = Ms(tc);
    if (cudaMemcpy(masters, flat.data(), flat.size() * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess)
      Die(Status::Unavailable("upload of the weights"), "cudaMemcpy");
    auto tp = Clock::now();
    (*pub)->Publish(snap, masters);  // the device copy for IPC (once asked), then the announce
    const double publish_ms = Ms(tp);
    char buf[96];
    std::snprintf(buf, sizeof buf, "| %d | %.1f | %.1f |", v, checksum_ms, publish_ms);
    rows.push_back(buf);
    // Wait for the worker to be done with v (it never reads a buffer the next publish overwrites).
    bool done = false;
    while (!done && ok) {
      pollfd p{fds[0], POLLIN, 0};
      if (poll(&p, 1, 300000) <= 0) {
        ok = false;
        break;
      }
      const ssize_t n = read(fds[0], buf, sizeof buf);
      if (n <= 0) {
        ok = false;
        break;
      }
      pending.append(buf, static_cast<size_t>(n));
      for (size_t nl; (nl = pending.find('\n')) != std::string::npos; pending.erase(0, nl + 1))
        if (std::atoll(pending.substr(0, nl).c_str()) >= v) done = true;
    }
  }
  int status = 0;
  waitpid(child, &status, 0);
  cudaFree(masters);
  std::printf("\n| version | learner copy + checksum ms | learner publish (device copy) ms |\n| --- | --- | --- |\n");
  std::printf("(version 1: no worker had asked yet, nothing copied; the first request copies it from the host)\n");
  for (const std::string& r : rows) std::printf("%s\n", r.c_str());
  if (!ok) std::fprintf(stderr, "ipc_stall_bench: the worker stopped answering\n");
  return ok && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  gflags::SetUsageMessage("ipc_stall_bench: a rollout worker's stall per version with the learner on its GPU");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  Result<model::ModelConfig> c = model::ModelConfig::LoadFile(FLAGS_config);
  Die(c.status(), "config");
  if (FLAGS_versions < 1) Die(Status::InvalidArgument("--versions must be >= 1"), "flags");
  if (FLAGS_role == "worker") return RunWorker(*c);
  if (FLAGS_role != "learner") Die(Status::InvalidArgument("--role must be learner or worker"), "flags");
  if (rollout::GpuGenerator::DeviceCount() == 0) {
    std::printf("ipc_stall_bench: no CUDA device, nothing to measure\n");
    return 0;
  }
  return RunLearner(*c, "/proc/self/exe");
}
