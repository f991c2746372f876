// Weight broadcast over NCCL between two GPUs of one host (two threads, one
// rank each, the same NcclGroup code the learner and workers run):
//   1. the GPU reference model's weights as the learner holds them today,
//      fp32, --params (1.68e9) x 4 bytes = 6.7 GB, broadcast in buckets of
//      several sizes against one ncclBroadcast of the whole buffer, in the
//      same run: time and GB/s (algorithm bandwidth: bytes / time);
//   2. one full version through the learner's and worker's path
//      (SendWeights / ReceiveWeights): the worker's stall is receive +
//      device->host copy + checksum, then the CPU int8 re-quantization that
//      runs on the host copy until the GPU rollout lands.
// Prints a table. Needs 2 GPUs; keeps NCCL_NVLS_ENABLE=0.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>
#include <gflags/gflags.h>

#include "actors/nccl_group.h"
#include "actors/nccl_weights.h"
#include "rollout/int8_quantizer.h"

DEFINE_double(params, 1.68e9, "parameters (fp32 each)");
DEFINE_int32(reps, 5, "timed broadcasts per configuration (after one warm-up)");
DEFINE_string(buckets_mb, "4,16,64,256", "bucket sizes to time, MiB");
DEFINE_bool(stall, true, "also time one full version through SendWeights/ReceiveWeights");
DEFINE_bool(quantize, true, "include the CPU int8 re-quantization in the stall");

namespace {

using namespace grove;
using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

void Die(const Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
  std::exit(1);
}

// Runs fn(rank) on two threads and joins them.
template <typename Fn>
void OnBothRanks(Fn fn) {
  std::thread t1([&] { fn(1); });
  fn(0);
  t1.join();
}

}  // namespace

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  if (actors::CudaDeviceCount() < 2) {
    std::printf("needs 2 GPUs, found %d\n", actors::CudaDeviceCount());
    return 0;
  }
  const size_t floats = static_cast<size_t>(FLAGS_params);
  const size_t bytes = floats * sizeof(float);
  std::unique_ptr<actors::NcclGroup> groups[2];
  // (Re-)forms the group of two, e.g. after a configuration failed and
  // aborted it, so one failure costs one row, not the run.
  auto form = [&] {
    auto fresh = actors::NcclGroup::NewUniqueId();
    Die(fresh.status(), "unique id");
    OnBothRanks([&](int r) {
      groups[r].reset();
      auto g = actors::NcclGroup::Form(*fresh, r, 2, r, actors::NcclDeadlineIn(60000));
      Die(g.status(), "form");
      groups[r] = std::move(*g);
    });
  };
  form();
  void* buf[2] = {nullptr, nullptr};
  OnBothRanks([&](int r) {
    cudaSetDevice(r);
    if (cudaMalloc(&buf[r], bytes) != cudaSuccess) Die(Status::ResourceExhausted("cudaMalloc"), "alloc");
    cudaMemset(buf[r], r == 0 ? 0x3c : 0, bytes);
    cudaDeviceSynchronize();
  });
  std::printf("weights: %.3g params fp32 = %.2f GB; 2 ranks (GPU 0 -> GPU 1)\n", FLAGS_params, bytes / 1e9);
  std::printf("%-22s %10s %10s %10s %10s\n", "broadcast", "best ms", "mean ms", "GB/s", "vs single");

  std::vector<size_t> buckets{0};
  for (const char* p = FLAGS_buckets_mb.c_str(); *p;) {
    buckets.push_back(static_cast<size_t>(std::strtoull(p, const_cast<char**>(&p), 10)) << 20);
    if (*p == ',') ++p;
  }
  double single_best = 0;
  for (size_t bucket : buckets) {
    std::vector<double> ms;
    Status failed;
    for (int rep = 0; rep <= FLAGS_reps && failed.ok(); ++rep) {
      double t[2] = {0, 0};
      Status st[2];
      OnBothRanks([&](int r) {
        auto t0 = Clock::now();
        st[r] = groups[r]->Broadcast(buf[r], bytes, bucket, actors::NcclDeadlineIn(20000));
        t[r] = Ms(t0);
      });
      failed = !st[0].ok() ? st[0] : st[1];
      if (rep > 0) ms.push_back(std::max(t[0], t[1]));  // both ranks done
    }
    if (!failed.ok()) {
      std::printf("%zu MiB buckets (0: single): failed: %s\n", bucket >> 20, failed.ToString().c_str());
      form();
      continue;
    }
    const double best = *std::min_element(ms.begin(), ms.end());
    double mean = 0;
    for (double m : ms) mean += m / ms.size();
    if (bucket == 0) single_best = best;
    char name[64];
    if (bucket == 0) {
      std::snprintf(name, sizeof(name), "single buffer");
    } else {
      std::snprintf(name, sizeof(name), "buckets of %zu MiB", bucket >> 20);
    }
    std::printf("%-22s %10.2f %10.2f %10.1f %9.0f%%\n", name, best, mean, bytes / best / 1e6,
                single_best > 0 ? 100.0 * single_best / best : 0.0);
  }
  // The received bytes are the sent ones (a cheap spot check; the tests check every bit).
  std::vector<unsigned char> probe(4096);
  cudaSetDevice(1);
  cudaMemcpy(probe.data(), static_cast<char*>(buf[1]) + bytes - probe.size(), probe.size(), cudaMemcpyDeviceToHost);
  bool same = std::all_of(probe.begin(), probe.end(), [](unsigned char c) { return c == 0x3c; });
  std::printf("received tail matches: %s\n", same ? "yes" : "NO");
  for (int r = 0; r < 2; ++r) {
    cudaSetDevice(r);
    cudaFree(buf[r]);
  }
  if (!FLAGS_stall) return same ? 0 : 1;

  // One version through the real send/receive path, with a tensor layout
  // like the model's (2-D matrices of 2048 columns, quantized per row).
  actors::WeightSnapshot snap;
  snap.version = 1;
  snap.flat.resize(floats);
  {
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < floats; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      snap.flat[i] = static_cast<float>(static_cast<int32_t>(x >> 32)) * 1e-10f;
    }
  }
  const int64_t cols = 2048;
  const size_t rows_per = 8192, per = rows_per * cols;
  for (size_t off = 0, i = 0; off < floats; off += per, ++i) {
    const size_t n = std::min(per, floats - off);
    if (n % cols == 0) {
      snap.tensors.push_back({"layers." + std::to_string(i) + ".experts.w", {static_cast<int64_t>(n / cols), cols}, off, n});
    } else {
      snap.tensors.push_back({"layers." + std::to_string(i) + ".norm", {static_cast<int64_t>(n)}, off, n});
    }
  }
  auto tc = Clock::now();
  snap.checksum = actors::WeightChecksum(snap.flat.data(), snap.flat.size());
  const double checksum_ms = Ms(tc);
  const size_t bucket = size_t{64} << 20;
  actors::NcclSendTiming send;
  actors::NcclReceiveTiming recv;
  double receive_total = 0, quant_ms = 0;
  bool verified = false;
  OnBothRanks([&](int r) {
    actors::NcclStaging staging;
    if (r == 0) {
      Die(actors::SendWeights(*groups[0], snap, staging, bucket, actors::NcclDeadlineIn(120000), nullptr, &send), "send");
      return;
    }
    auto t0 = Clock::now();
    auto got = actors::ReceiveWeights(*groups[1], staging, {}, actors::NcclDeadlineIn(120000), nullptr, &recv);
    Die(got.status(), "receive");
    receive_total = Ms(t0);
    verified = got->checksum == snap.checksum;
    if (FLAGS_quantize) {
      auto tq = Clock::now();
      rollout::QuantizationReport rep = rollout::QuantizeInt8InPlace(got->tensors, got->flat);
      quant_ms = Ms(tq);
      std::printf("re-quantized %ld of %ld params (%.2f bits/weight)\n", static_cast<long>(rep.params_quantized),
                  static_cast<long>(rep.params_total), rep.bits_per_weight);
    }
  });
  std::printf("\none version, %.2f GB fp32, buckets of 64 MiB (learner: SendWeights, worker: ReceiveWeights)\n", bytes / 1e9);
  std::printf("  learner host->device staging      %9.1f ms\n", send.stage_ms);
  std::printf("  learner broadcast (hdr+ann+data)  %9.1f ms\n", send.broadcast_ms);
  std::printf("  worker: broadcast after header    %9.1f ms\n", recv.broadcast_ms);
  std::printf("  worker: host buffer + D2H copy    %9.1f ms\n", recv.copy_ms);
  std::printf("  worker: checksum verify           %9.1f ms (learner's checksum: %.1f ms)\n", recv.verify_ms, checksum_ms);
  std::printf("  worker: receive total (from call) %9.1f ms, verified %s\n", receive_total, verified ? "yes" : "NO");
  if (FLAGS_quantize) std::printf("  worker: CPU int8 re-quantization  %9.1f ms\n", quant_ms);
  std::printf("  worker stall per version          %9.1f ms (broadcast + copy + verify%s)\n",
              recv.broadcast_ms + recv.copy_ms + recv.verify_ms + quant_ms, FLAGS_quantize ? " + quantize" : "");
  return same && verified ? 0 : 1;
}
