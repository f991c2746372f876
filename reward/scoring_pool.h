// ScoringPool: scores batches with N forked worker processes, so that no
// verifier can stall or kill the caller.
//
// Each worker is a fork of the caller made at Start() (and again whenever one
// dies), holding its own copy of the verifier; it runs with an address-space
// limit (setrlimit RLIMIT_AS) and in its own process group. The pool sends a
// worker one sample at a time and waits at most `sample_timeout` for it.
// Whatever the verifier does, each sample gets a result:
//   throws            -> 0, "verifier threw: ..."
//   crashes / is OOM  -> 0, "verifier crashed (signal 11)"; worker re-created
//   hangs             -> 0, "verifier timed out after N ms"; worker killed, re-created
//   NaN / inf reward  -> 0, "verifier returned a non-finite reward"
// External-program verifiers inside the verifier keep their own (shorter)
// deadline; their programs die with the worker.
//
// Contract: Score() is not reentrant; call it from one thread at a time.
// fork() copies only the calling thread, so create the pool, and call
// Score(), from a thread that holds no lock the verifier needs (in practice:
// start the pool before starting other threads that use verifiers in-process).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "reward/verifier.h"

namespace grove::reward {

struct ScoringPoolOptions {
  int num_workers = 2;
  std::chrono::milliseconds sample_timeout{5000};
  size_t memory_limit_bytes = size_t{4} << 30;  // per worker; 0 = no limit
  // Samples sent ahead to each worker, so that it never waits on the caller.
  // The time limit runs for one sample at a time (from when the worker can
  // start it); when a worker dies, the samples queued behind the one that
  // killed it are re-sent elsewhere at no cost to them.
  int pipeline_depth = 4;
};

struct ScoringPoolStats {
  size_t scored = 0;
  size_t failed = 0;    // crashed, timed out, threw, or non-finite
  size_t restarts = 0;  // workers re-created
};

class ScoringPool {
 public:
  static Result<std::unique_ptr<ScoringPool>> Start(std::shared_ptr<const Verifier> verifier,
                                                    ScoringPoolOptions options);
  ~ScoringPool();  // kills and reaps every worker
  ScoringPool(const ScoringPool&) = delete;
  ScoringPool& operator=(const ScoringPool&) = delete;

  // One result per input, in input order. Never fails as a whole.
  std::vector<VerifyOutput> Score(std::span<const VerifyInput> batch);

  const ScoringPoolStats& stats() const { return stats_; }
  const ScoringPoolOptions& options() const { return options_; }

 private:
  struct Worker {
    pid_t pid = -1;
    int fd = -1;
    std::deque<size_t> inflight;  // sent, unanswered, in order; the front is being scored
    std::chrono::steady_clock::time_point deadline;  // for the front
    std::string inbox;
  };

  ScoringPool(std::shared_ptr<const Verifier> verifier, ScoringPoolOptions options);
  Status Spawn(Worker& w);
  void Kill(Worker& w);
  // How the worker ended, for reasons. Leaves w.inflight for the caller.
  std::string Reap(Worker& w, bool killed);

  std::shared_ptr<const Verifier> verifier_;
  ScoringPoolOptions options_;
  std::vector<Worker> workers_;
  ScoringPoolStats stats_;
};

}  // namespace grove::reward
