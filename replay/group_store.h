// GroupStore: the durable half of the replay store. Scored groups live in
// RocksDB, keyed by (policy version, arrival); an id index makes re-sent
// groups cost one lookup and be stored once; consumed marks, learner data
// cursors and counters live beside them so one WriteBatch can change them
// together.
//
// Column families (each separates one concern):
//   samples  key = SampleKey (16 bytes, big-endian)   value = record (group_record.h)
//   ids      'i' + group_id -> SampleKey               (dedupe)
//            'v' + SampleKey -> group_id               (the same index in version order,
//                                                       so retention can drop it by range)
//   meta     "format" -> format record; "counters" -> persistent counters
//            'm' + SampleKey -> settle mark (consumed / dropped as stale)
//            'c' + consumer  -> data cursor (learner version, consumed count)
//
// Durability contract: Insert returns OK only after the WriteBatch holding the
// record has been written to the write-ahead log and the log fsync'd. The two
// sync modes differ only in how many inserts share one fsync:
//   kPerWrite:    each insert is its own WriteBatch written with
//                 WriteOptions.sync, one at a time.
//   kGroupCommit: inserts waiting at the same moment are gathered by a
//                 committer thread into one WriteBatch (atomic: recovered whole
//                 or not at all), written unsynced; a syncer thread then calls
//                 SyncWAL and answers every batch written before that fsync
//                 began. The committer writes the next batch while the syncer
//                 fsyncs, so throughput follows disk bandwidth, not fsync
//                 latency. A duplicate is also answered only after an fsync,
//                 since its first copy may still be unsynced. An unsynced group
//                 can be visible to readers of this process before it is
//                 acknowledged; ReplayService serves only acknowledged groups.
// Either way an acknowledged insert survives a process crash and a machine
// crash (given a disk that honours fsync); an unacknowledged one may or may not
// be present after a crash, and its sender's retry is then answered "duplicate".
//
// Thread-safety: every method may be called from any thread. Writes (inserts,
// marks, retention) are serialized inside; reads run concurrently with them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "replay/group_record.h"

namespace rocksdb {
class Env;
}

namespace grove::replay {

enum class SyncMode { kPerWrite, kGroupCommit };
// "per_write" or "group_commit"; anything else is InvalidArgument.
Result<SyncMode> ParseSyncMode(std::string_view name);
std::string_view SyncModeName(SyncMode mode);

struct GroupStoreOptions {
  std::string path;  // a directory; created when absent and create_if_missing
  SyncMode sync_mode = SyncMode::kGroupCommit;
  bool create_if_missing = true;
  // One group-commit batch holds at most this many payload bytes (the rest wait
  // for the next batch), bounding the memory and latency of one write.
  size_t group_commit_max_bytes = size_t{64} << 20;
  size_t write_buffer_bytes = size_t{64} << 20;
  // Parse every stored record (and so read every block, checksums verified) at
  // open, so corruption is reported at start rather than when the learner
  // reaches it. Costs a full read of the live data; retention keeps that small.
  bool verify_records_at_open = true;
  // Not owned; null: the default. Tests inject file-system faults through it.
  rocksdb::Env* env = nullptr;
};

enum class InsertOutcome {
  kStored,                // newly stored and durable
  kDuplicate,             // a group with this id is already stored (nothing written)
  kBelowRetentionFloor,   // its version range was already retired; not stored
};

struct InsertResult {
  InsertOutcome outcome = InsertOutcome::kStored;
  SampleKey key;  // where the group lives (for kDuplicate: the first copy)
};

// A stored group that is neither consumed nor dropped as stale.
struct UnsettledGroup {
  SampleKey key;
  std::string group_id;
};

// The learner's data cursor: the learner version of its last MarkConsumed and
// how many groups it has consumed in total.
struct DataCursor {
  int64_t learner_version = -1;  // -1: the consumer never marked anything
  uint64_t consumed = 0;
};

struct StoreCounters {
  uint64_t stored = 0;         // groups stored since the store was created
  uint64_t stored_bytes = 0;   // payload bytes of those groups
  uint64_t consumed = 0;       // groups marked consumed
  uint64_t dropped_stale = 0;  // groups marked dropped for staleness
  uint64_t duplicates = 0;     // inserts answered kDuplicate (since this open)
  int64_t retention_floor = INT64_MIN;  // versions below this have been retired
};

class GroupStore {
 public:
  // Opens or creates the store. Errors, never a crash, for: a path that is a
  // file; a non-empty directory with no database in it; a RocksDB database
  // that is not a grove replay store (other column families, no format record);
  // a grove store of another format version (FailedPrecondition); damaged
  // MANIFEST, SST or records (Corruption). The message names the path.
  static Result<std::unique_ptr<GroupStore>> Open(const GroupStoreOptions& options);
  ~GroupStore();
  GroupStore(const GroupStore&) = delete;
  GroupStore& operator=(const GroupStore&) = delete;

  // Stores `record` durably (see the contract above); record.arrival is ignored
  // and assigned. InvalidArgument for an empty id. Blocks until durable.
  Result<InsertResult> Insert(const GroupRecord& record);

  // Records at `keys`, in that order. NotFound if one is missing (for example
  // retired), Corruption if one fails to parse.
  Result<std::vector<GroupRecord>> Read(const std::vector<SampleKey>& keys) const;
  // Where the group with this id lives, if stored.
  Result<std::optional<SampleKey>> Find(std::string_view group_id) const;

  // Calls `fn` for every unsettled group, oldest (version, arrival) first.
  Status ForEachUnsettled(const std::function<void(const UnsettledGroup&)>& fn) const;

  // Atomically (one synced WriteBatch) marks the named groups consumed and sets
  // the consumer's cursor to {learner_version, previous count + newly marked}.
  // Groups already settled are skipped (so a retried mark is harmless). An
  // unknown id fails the whole call with NotFound and writes nothing. Returns
  // the keys newly marked.
  Result<std::vector<SampleKey>> MarkConsumed(const std::vector<std::string>& group_ids,
                                              int64_t learner_version, std::string_view consumer);
  // Marks groups dropped for staleness (one synced WriteBatch); already
  // settled ones are skipped. Returns how many were newly marked.
  Result<uint64_t> MarkDroppedStale(const std::vector<SampleKey>& keys);

  Result<DataCursor> Cursor(std::string_view consumer) const;

  // Retention: deletes every group with policy version < `below_version`
  // (with its id entries and marks) by range deletion, then compacts those
  // ranges so the space is freed now. Every such group must be settled, else
  // FailedPrecondition naming one that is not. Later inserts below the new
  // floor are answered kBelowRetentionFloor. A no-op (the floor stays) when
  // below_version is not above the current floor or fewer than `min_groups`
  // groups (at least one) lie below it: each retirement compacts the files
  // overlapping the range, so it pays to retire in large chunks.
  Status RetireBelow(int64_t below_version, uint64_t min_groups = 1);

  StoreCounters Counters() const;
  // Bytes of live SST files (after flushing memtables): what retention frees.
  Result<uint64_t> LiveFileBytes();
  const GroupStoreOptions& options() const;

 private:
  struct Impl;
  explicit GroupStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace grove::replay
