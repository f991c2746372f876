// What a published version costs the learner on the host before anyone
// sends it: a buffer of the model's size, the copy of the weights into it,
// the checksum. A fresh buffer per version (before SnapshotPool) against a
// recycled one, with two older versions held as the publisher holds them.
// Prints ms per version for each; --floats is the model's size (default: the
// 1.7B GPU reference model), --versions how many to time.
#include <gflags/gflags.h>

#include <chrono>
#include <cstdio>
#include <deque>
#include <memory>
#include <vector>

#include "actors/weight_transfer.h"
#include "learner/snapshot_pool.h"

DEFINE_int64(floats, 1675855808, "floats per version (the 1.7B reference model by default)");
DEFINE_int32(versions, 5, "versions to time (after one warm-up)");

namespace {

double Ms(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  using grove::actors::WeightSnapshot;
  const size_t n = size_t(FLAGS_floats);
  std::vector<float> weights(n, 0.5f);  // the trainer's copy
  std::printf("%zu floats (%.2f GB) per version, %d versions after 3 of warm-up, two older ones held\n", n,
              n * 4.0 / 1e9, FLAGS_versions);
  std::printf("%-16s %10s %10s %10s %10s\n", "buffer", "alloc ms", "copy ms", "checksum", "total ms");
  for (const bool pooled : {false, true}) {
    grove::learner::SnapshotPool pool(2);
    std::deque<std::shared_ptr<const WeightSnapshot>> held;
    double alloc = 0, copy = 0, sum = 0;
    // The first three versions warm up: three buffers are live at once (two
    // held, one being made), so the pool makes three before it recycles.
    const int warmup = 3;
    for (int v = 0; v < warmup + FLAGS_versions; ++v) {
      auto t0 = std::chrono::steady_clock::now();
      std::shared_ptr<WeightSnapshot> snap;
      if (pooled) {
        snap = pool.Take(n);
      } else {
        snap = std::make_shared<WeightSnapshot>();
        snap->flat.resize(n);
      }
      const double a = Ms(t0);
      t0 = std::chrono::steady_clock::now();
      std::copy(weights.begin(), weights.end(), snap->flat.begin());
      const double c = Ms(t0);
      t0 = std::chrono::steady_clock::now();
      snap->checksum = grove::actors::WeightChecksum(snap->flat.data(), n);
      const double s = Ms(t0);
      if (v >= warmup) {
        alloc += a;
        copy += c;
        sum += s;
      }
      held.push_back(std::move(snap));
      if (held.size() > 2) held.pop_front();
    }
    const double k = FLAGS_versions;
    std::printf("%-16s %10.1f %10.1f %10.1f %10.1f\n", pooled ? "SnapshotPool" : "fresh per version", alloc / k,
                copy / k, sum / k, (alloc + copy + sum) / k);
  }
  return 0;
}
