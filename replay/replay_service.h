// ReplayService: the replay store as the replay actor serves it, in process.
// It wraps a GroupStore with what the learner and writers need: batches under
// a staleness bound, Reverb-style rate limiting, leases on served groups,
// consumed marks with the learner's data cursor, and counters for
// `grove status`. Every method is thread-safe; the actor only translates
// wire messages (actors/schema/data.capnp) to these calls.
//
// Memory is bounded: the service keeps one small index entry (key, id, lease)
// per unsettled group, and refuses inserts once max_unconsumed groups are
// unsettled, so writers wait for the learner instead of the queue growing.
// Payloads stay on disk until a batch reads them.
//
// Example:
//   GROVE_ASSIGN_OR_RETURN(auto replay, ReplayService::Open(options));
//   GROVE_ASSIGN_OR_RETURN(InsertOutcome o, replay->Insert({"g-17", /*version=*/3, bytes}));
//   GROVE_ASSIGN_OR_RETURN(SampledBatch b, replay->SampleBatch(64, /*learner=*/5, /*k=*/2, "learner-0"));
//   ... train on b.groups ...
//   GROVE_RETURN_IF_ERROR(replay->MarkConsumed(IdsOf(b.groups), 6, "learner-0").status());
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "replay/group_store.h"

namespace grove::replay {

struct ReplayOptions {
  GroupStoreOptions store;
  // Inserts are refused (ResourceExhausted "queue full") while this many
  // groups are stored but neither consumed nor dropped. Bounds memory and disk.
  uint64_t max_unconsumed = 4096;
  // No batch is served while fewer groups than this are unsettled.
  uint64_t min_size_to_serve = 1;
  // Reverb's sample-to-insert ratio: at most samples_per_insert * inserts +
  // error_buffer groups are served (counting since open; groups recovered at
  // open count as inserts). 0 turns the bound off.
  double samples_per_insert = 0.0;
  double samples_per_insert_error_buffer = 0.0;
  // A served group is leased to its consumer and served to no one while the
  // lease lasts; it ends with MarkConsumed, after lease_timeout (0: never),
  // or with the process (a restarted service serves unmarked groups again).
  std::chrono::milliseconds lease_timeout{0};
  // After MarkConsumed, retire (range-delete and compact) the versions that
  // can no longer be served: below both the oldest unsettled group and the
  // last learner_version - max_staleness seen by SampleBatch.
  bool retire_on_consume = true;
  // ... but only once at least this many groups can go at once: each
  // retirement compacts the files overlapping the range.
  uint64_t retire_min_groups = 1024;
};

struct SampledBatch {
  std::vector<GroupRecord> groups;  // oldest (version, arrival) first
  uint64_t dropped_stale = 0;       // groups dropped for staleness by this call
  bool ready = true;                // false: the rate limiter held the batch back
  std::string wait_reason;          // why not ready, for logs and the wire reply
};

struct ReplayCounters {
  uint64_t stored = 0;         // persisted: groups ever stored
  uint64_t stored_bytes = 0;   // persisted: their payload bytes
  uint64_t duplicates = 0;     // since open: inserts answered duplicate
  uint64_t served = 0;         // since open: groups handed out in batches
  uint64_t dropped_stale = 0;  // persisted marks + inserts below the retention floor since open
  uint64_t consumed = 0;       // persisted: groups marked consumed
  uint64_t queue_depth = 0;    // unsettled groups now (leased ones included)
  uint64_t leased = 0;         // of those, served and waiting for MarkConsumed
  uint64_t refused_full = 0;   // since open: inserts refused because the queue was full
  int64_t retention_floor = INT64_MIN;
};

class ReplayService {
 public:
  // Opens the store and rebuilds the in-memory index of unsettled groups.
  // InvalidArgument for inconsistent options; any GroupStore::Open error.
  static Result<std::unique_ptr<ReplayService>> Open(const ReplayOptions& options);
  ~ReplayService();
  ReplayService(const ReplayService&) = delete;
  ReplayService& operator=(const ReplayService&) = delete;

  // Durably stores a group (GroupStore's sync contract) and returns kStored, or
  // kDuplicate if its id is already stored, or kBelowRetentionFloor (counted as
  // dropped stale). ResourceExhausted("queue full ...") when max_unconsumed
  // groups are unsettled: the sender retries later. Aborted after Close().
  Result<InsertOutcome> Insert(const GroupRecord& record);
  // As Insert, but waits up to `timeout` for room instead of refusing at once.
  Result<InsertOutcome> InsertWait(const GroupRecord& record, std::chrono::milliseconds timeout);

  // Up to `batch_size` unleased unsettled groups, oldest first, leased to
  // `consumer`. First every unleased group with learner_version - version >
  // max_staleness is marked dropped (durably) and counted in dropped_stale, so
  // no returned group is staler than max_staleness. ready=false (with no
  // groups) when the rate limiter holds the batch back or nothing is servable.
  Result<SampledBatch> SampleBatch(size_t batch_size, int64_t learner_version, int64_t max_staleness,
                                   std::string_view consumer);

  // Marks the groups consumed and moves the consumer's cursor, atomically (see
  // GroupStore::MarkConsumed). Returns how many were newly marked.
  Result<uint64_t> MarkConsumed(const std::vector<std::string>& group_ids, int64_t learner_version,
                                std::string_view consumer);
  Result<DataCursor> Cursor(std::string_view consumer) const;
  // Ends every lease `consumer` holds, so its unmarked groups are served
  // again (oldest first). For a consumer that restarts: what it held leased
  // died with its previous process, and with lease_timeout 0 would otherwise
  // never be served (nor dropped as stale) again. Returns how many.
  uint64_t ReleaseLeases(std::string_view consumer);

  // Retires every version that can no longer be served (see retire_on_consume);
  // returns the retention floor afterwards.
  Result<int64_t> RetireServedOut();

  ReplayCounters Counters() const;
  // Refuses further calls with Aborted and wakes waiting writers (drain on
  // SIGTERM). Calls in progress finish; the store closes in the destructor.
  void Close();

  GroupStore& store();

 private:
  struct Impl;
  explicit ReplayService(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace grove::replay
