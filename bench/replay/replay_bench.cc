// replay_bench: what the replay store sustains on this machine.
//
// Appends: W writer threads (the verifiers' fan-in) insert scored groups of
// G completions x T tokens, sized like a real ScoredGroup payload: per token
// an int32 token id, an f32 log-prob and k u16 routed experts per MoE layer
// (default 16 x 256 x (4 + 4 + 2*2*2) bytes = 64 KiB). Reports appends/s and
// MB/s in both sync modes. Serving: the learner's SampleBatch + MarkConsumed
// round trip, latency percentiles.
//
//   build/bench/replay_bench [--dir=/tmp/x] [--seconds=3] [--writers=8]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <thread>
#include <vector>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "replay/replay_service.h"

DEFINE_string(dir, "", "scratch directory (default: a fresh one under /tmp)");
DEFINE_double(seconds, 3.0, "seconds per append measurement");
DEFINE_int32(writers, 8, "concurrent inserting threads");
DEFINE_int32(completions, 16, "completions per group (G)");
DEFINE_int32(tokens, 256, "tokens per completion");
DEFINE_int32(layers, 2, "MoE layers whose routing is recorded");
DEFINE_int32(topk, 2, "experts per token per layer");
DEFINE_int32(batch, 64, "groups per served batch");
DEFINE_int32(serve_rounds, 200, "served batches to time");

namespace {

using namespace grove::replay;
using Clock = std::chrono::steady_clock;

size_t PayloadBytes() {
  return static_cast<size_t>(FLAGS_completions) * FLAGS_tokens * (4 + 4 + 2 * FLAGS_layers * FLAGS_topk);
}

struct AppendResult {
  double seconds;
  uint64_t groups;
  uint64_t bytes;
  std::vector<double> latencies_ms;
};

AppendResult MeasureAppends(ReplayService& replay, const std::vector<std::string>& payloads, int writers,
                            double seconds, int64_t version) {
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> groups{0}, bytes{0};
  std::vector<std::vector<double>> lat(writers);
  std::vector<std::thread> threads;
  const auto start = Clock::now();
  static std::atomic<uint64_t> next_id{0};
  for (int w = 0; w < writers; ++w) {
    threads.emplace_back([&, w] {
      for (uint64_t i = 0; !stop; ++i) {
        const std::string& payload = payloads[(w + i) % payloads.size()];
        GroupRecord r{"g" + std::to_string(next_id++), version, payload, 0};
        const auto t0 = Clock::now();
        auto result = replay.Insert(r);
        lat[w].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        if (!result.ok()) {
          fprintf(stderr, "insert failed: %s\n", result.status().ToString().c_str());
          std::exit(1);
        }
        ++groups;
        bytes += payload.size();
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : threads) t.join();
  AppendResult r{std::chrono::duration<double>(Clock::now() - start).count(), groups.load(), bytes.load(), {}};
  for (auto& l : lat) r.latencies_ms.insert(r.latencies_ms.end(), l.begin(), l.end());
  std::sort(r.latencies_ms.begin(), r.latencies_ms.end());
  return r;
}

// Bytes this process caused to be written to storage (Linux /proc/self/io),
// to report write amplification: disk bytes per payload byte.
uint64_t ProcessWriteBytes() {
  FILE* f = fopen("/proc/self/io", "r");
  if (!f) return 0;
  char key[64];
  unsigned long long value;
  uint64_t out = 0;
  while (fscanf(f, "%63s %llu", key, &value) == 2) {
    if (std::string(key) == "write_bytes:") out = value;
  }
  fclose(f);
  return out;
}

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  return sorted[std::min(sorted.size() - 1, static_cast<size_t>(p * sorted.size()))];
}

}  // namespace

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  FLAGS_logtostderr = true;
  FLAGS_minloglevel = 1;
  google::InitGoogleLogging(argv[0]);
  namespace fs = std::filesystem;
  const fs::path root = FLAGS_dir.empty() ? fs::temp_directory_path() / ("replay_bench_" + std::to_string(getpid()))
                                          : fs::path(FLAGS_dir);
  fs::remove_all(root);
  fs::create_directories(root);

  std::mt19937_64 rng(1);
  std::vector<std::string> payloads(16);
  for (auto& p : payloads) {
    p.resize(PayloadBytes());
    for (auto& c : p) c = static_cast<char>(rng());
  }
  printf("replay_bench: payload %zu bytes/group (%d completions x %d tokens x (4+4+2*%d*%d)), %d writers, "
         "%u hardware threads\n",
         PayloadBytes(), FLAGS_completions, FLAGS_tokens, FLAGS_layers, FLAGS_topk, FLAGS_writers,
         std::thread::hardware_concurrency());
  printf("%-13s %8s %10s %9s %9s %9s %9s %6s\n", "mode", "writers", "appends/s", "MB/s", "p50 ms", "p99 ms", "groups",
         "w-amp");
  for (SyncMode mode : {SyncMode::kGroupCommit, SyncMode::kPerWrite}) {
    for (int writers : {1, FLAGS_writers}) {
      const fs::path db = root / (std::string(SyncModeName(mode)) + "_" + std::to_string(writers));
      ReplayOptions o;
      o.store.path = db.string();
      o.store.sync_mode = mode;
      o.max_unconsumed = 1 << 30;
      auto replay = ReplayService::Open(o);
      if (!replay.ok()) {
        fprintf(stderr, "%s\n", replay.status().ToString().c_str());
        return 1;
      }
      const uint64_t written_before = ProcessWriteBytes();
      AppendResult r = MeasureAppends(**replay, payloads, writers, FLAGS_seconds, 1);
      const double amp = static_cast<double>(ProcessWriteBytes() - written_before) / std::max<uint64_t>(1, r.bytes);
      printf("%-13s %8d %10.0f %9.1f %9.2f %9.2f %9lu %6.2f\n", std::string(SyncModeName(mode)).c_str(), writers,
             r.groups / r.seconds, r.bytes / r.seconds / 1e6, Percentile(r.latencies_ms, 0.5),
             Percentile(r.latencies_ms, 0.99), static_cast<unsigned long>(r.groups), amp);
      replay->reset();
      fs::remove_all(db);
    }
  }

  // Serving: a store with enough unsettled groups, batches served and marked.
  {
    const fs::path db = root / "serve";
    ReplayOptions o;
    o.store.path = db.string();
    o.max_unconsumed = 1 << 30;
    auto replay = ReplayService::Open(o);
    if (!replay.ok()) return 1;
    const int total = FLAGS_batch * FLAGS_serve_rounds;
    std::vector<std::thread> fill;
    std::atomic<int> next{0};
    for (int w = 0; w < FLAGS_writers; ++w) {
      fill.emplace_back([&] {
        for (int i; (i = next++) < total;) {
          if (!(*replay)->Insert({"s" + std::to_string(i), i / 512, payloads[i % payloads.size()], 0}).ok()) std::exit(1);
        }
      });
    }
    for (auto& t : fill) t.join();
    std::vector<double> serve_ms, mark_ms;
    for (int round = 0; round < FLAGS_serve_rounds; ++round) {
      const auto t0 = Clock::now();
      auto batch = (*replay)->SampleBatch(FLAGS_batch, total / 512, 1 << 20, "learner");
      const auto t1 = Clock::now();
      if (!batch.ok() || batch->groups.size() != static_cast<size_t>(FLAGS_batch)) {
        fprintf(stderr, "serve failed\n");
        return 1;
      }
      std::vector<std::string> ids;
      for (auto& g : batch->groups) ids.push_back(g.group_id);
      if (!(*replay)->MarkConsumed(ids, round + 1, "learner").ok()) return 1;
      const auto t2 = Clock::now();
      serve_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      mark_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
    }
    std::sort(serve_ms.begin(), serve_ms.end());
    std::sort(mark_ms.begin(), mark_ms.end());
    const double batch_mb = FLAGS_batch * PayloadBytes() / 1e6;
    printf("\nserve: batch of %d groups (%.1f MB) from %d stored\n", FLAGS_batch, batch_mb, total);
    printf("  SampleBatch   p50 %.2f ms  p99 %.2f ms  (%.0f MB/s at p50)\n", Percentile(serve_ms, 0.5),
           Percentile(serve_ms, 0.99), batch_mb / (Percentile(serve_ms, 0.5) / 1e3));
    printf("  MarkConsumed  p50 %.2f ms  p99 %.2f ms  (synced, incl. retention)\n", Percentile(mark_ms, 0.5),
           Percentile(mark_ms, 0.99));
  }
  fs::remove_all(root);
  return 0;
}
