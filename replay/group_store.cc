#include "replay/group_store.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>

#include <glog/logging.h>
#include <rocksdb/db.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

namespace grove::replay {
namespace {

namespace fs = std::filesystem;

constexpr const char* kSamplesCf = "samples";
constexpr const char* kIdsCf = "ids";
constexpr const char* kMetaCf = "meta";
constexpr std::string_view kFormatKey = "format";
constexpr std::string_view kCountersKey = "counters";
// Bump when the on-disk layout changes; a store of another format is refused.
constexpr std::string_view kFormatRecord = "grove-replay-store format 1";

constexpr char kIdPrefix = 'i';       // ids: 'i' + group id -> sample key
constexpr char kVersionPrefix = 'v';  // ids: 'v' + sample key -> group id
constexpr char kMarkPrefix = 'm';     // meta: 'm' + sample key -> settle mark
constexpr char kCursorPrefix = 'c';   // meta: 'c' + consumer -> cursor

constexpr char kMarkConsumed = 'C';
constexpr char kMarkDroppedStale = 'S';

std::string Prefixed(char prefix, std::string_view rest) {
  std::string out;
  out.reserve(1 + rest.size());
  out.push_back(prefix);
  out.append(rest);
  return out;
}

Status FromRocks(const rocksdb::Status& s, std::string_view context) {
  if (s.ok()) return Status::OK();
  std::string message = std::string(context) + ": " + s.ToString();
  if (s.IsCorruption()) return Status::Corruption(message);
  if (s.IsNotFound()) return Status::NotFound(message);
  if (s.IsInvalidArgument()) return Status::InvalidArgument(message);
  if (s.IsIOError()) return Status::IOError(message);
  if (s.IsNoSpace()) return Status::ResourceExhausted(message);
  return Status::IOError(message);
}

// Persistent counters: fixed-width little-endian fields, written in every
// WriteBatch that changes them so they move atomically with the data.
struct PersistentCounters {
  uint64_t stored = 0;
  uint64_t stored_bytes = 0;
  uint64_t consumed = 0;
  uint64_t dropped_stale = 0;
  uint64_t next_arrival = 1;
  int64_t retention_floor = INT64_MIN;

  static constexpr size_t kSize = 6 * 8;
  std::string Encode() const {
    std::string out(kSize, '\0');
    uint64_t fields[6] = {stored, stored_bytes, consumed, dropped_stale, next_arrival,
                          static_cast<uint64_t>(retention_floor)};
    std::memcpy(out.data(), fields, kSize);
    return out;
  }
  static Result<PersistentCounters> Decode(std::string_view bytes) {
    if (bytes.size() != kSize) {
      return Status::Corruption("counters record is " + std::to_string(bytes.size()) + " bytes, expected " +
                                std::to_string(kSize));
    }
    uint64_t fields[6];
    std::memcpy(fields, bytes.data(), kSize);
    PersistentCounters c;
    c.stored = fields[0];
    c.stored_bytes = fields[1];
    c.consumed = fields[2];
    c.dropped_stale = fields[3];
    c.next_arrival = fields[4];
    c.retention_floor = static_cast<int64_t>(fields[5]);
    if (c.next_arrival == 0) return Status::Corruption("counters record has arrival sequence 0");
    return c;
  }
};

std::string EncodeCursor(const DataCursor& c) {
  std::string out(16, '\0');
  std::memcpy(out.data(), &c.learner_version, 8);
  std::memcpy(out.data() + 8, &c.consumed, 8);
  return out;
}

Result<DataCursor> DecodeCursor(std::string_view bytes, std::string_view consumer) {
  if (bytes.size() != 16) {
    return Status::Corruption("data cursor of consumer '" + std::string(consumer) + "' is " +
                              std::to_string(bytes.size()) + " bytes, expected 16");
  }
  DataCursor c;
  std::memcpy(&c.learner_version, bytes.data(), 8);
  std::memcpy(&c.consumed, bytes.data() + 8, 8);
  return c;
}

struct PendingInsert {
  const GroupRecord* record = nullptr;
  Result<InsertResult> result = Status::Internal("insert not committed");
  bool done = false;
};

}  // namespace

Result<SyncMode> ParseSyncMode(std::string_view name) {
  if (name == "per_write") return SyncMode::kPerWrite;
  if (name == "group_commit") return SyncMode::kGroupCommit;
  return Status::InvalidArgument("replay sync mode '" + std::string(name) +
                                 "' is not one of: per_write, group_commit");
}

std::string_view SyncModeName(SyncMode mode) {
  return mode == SyncMode::kPerWrite ? "per_write" : "group_commit";
}

struct GroupStore::Impl {
  GroupStoreOptions options;
  std::unique_ptr<rocksdb::DB> db;
  rocksdb::ColumnFamilyHandle* samples = nullptr;
  rocksdb::ColumnFamilyHandle* ids = nullptr;
  rocksdb::ColumnFamilyHandle* meta = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;

  // Serializes every write so dedupe lookups and counters are consistent.
  mutable std::mutex write_mu;
  PersistentCounters counters;  // guarded by write_mu
  std::atomic<uint64_t> duplicates{0};

  // Group commit is a two-stage pipeline. The committer writes each batch of
  // waiting inserts (unsynced) and hands it to the syncer; the syncer fsyncs
  // the WAL (SyncWAL) and only then answers the batches written before that
  // fsync began. While one fsync runs, the next batch is being written, so the
  // disk sees back-to-back large syncs instead of one small sync per batch.
  std::mutex queue_mu;
  std::condition_variable queue_cv;  // wakes the committer
  std::condition_variable sync_cv;   // wakes the syncer
  std::condition_variable done_cv;   // wakes waiting inserters
  std::deque<PendingInsert*> queue;      // waiting to be written
  std::vector<PendingInsert*> unsynced;  // written, waiting for an fsync
  bool stopping = false;
  bool committer_done = false;
  std::thread committer;
  std::thread syncer;

  ~Impl() {
    if (committer.joinable()) {
      {
        std::lock_guard<std::mutex> lock(queue_mu);
        stopping = true;
      }
      queue_cv.notify_all();
      committer.join();
      {
        std::lock_guard<std::mutex> lock(queue_mu);
        committer_done = true;
      }
      sync_cv.notify_all();
      syncer.join();
    }
    if (db) {
      for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
      rocksdb::Status s = db->Close();
      if (!s.ok()) LOG(WARNING) << "replay store " << options.path << ": close: " << s.ToString();
      db.reset();
    }
  }

  Status Context(const rocksdb::Status& s, std::string_view what) const {
    return FromRocks(s, "replay store at " + options.path + ": " + std::string(what));
  }

  // Writes `batch` with the counters `next` and, on success, makes them
  // current. sync=false only for group commit, whose syncer fsyncs after.
  Status WriteWithCounters(rocksdb::WriteBatch* batch, const PersistentCounters& next, bool sync = true) {
    rocksdb::Status s = batch->Put(meta, rocksdb::Slice(kCountersKey.data(), kCountersKey.size()), next.Encode());
    rocksdb::WriteOptions wo;
    wo.sync = sync;
    if (s.ok()) s = db->Write(wo, batch);
    if (!s.ok()) return Context(s, "synced write");
    counters = next;
    return Status::OK();
  }

  // Commits a batch of inserts as one WriteBatch, synced unless `sync` is
  // false (then the caller must fsync the WAL before answering any item,
  // duplicates included: their first copy may be in the same unsynced
  // stretch of the WAL). Caller holds write_mu.
  void CommitLocked(const std::vector<PendingInsert*>& items, bool sync) {
    rocksdb::WriteBatch batch;
    PersistentCounters next = counters;
    std::unordered_map<std::string_view, SampleKey> in_batch;
    std::vector<PendingInsert*> written;
    uint64_t duplicates_here = 0;
    for (PendingInsert* item : items) {
      const GroupRecord& r = *item->record;
      if (r.group_id.empty()) {
        item->result = Status::InvalidArgument("group id is empty");
        continue;
      }
      if (auto it = in_batch.find(r.group_id); it != in_batch.end()) {
        item->result = InsertResult{InsertOutcome::kDuplicate, it->second};
        ++duplicates_here;
        continue;
      }
      std::string existing;
      rocksdb::Status s = db->Get(rocksdb::ReadOptions(), ids, Prefixed(kIdPrefix, r.group_id), &existing);
      if (s.ok()) {
        Result<SampleKey> key = DecodeSampleKey(existing);
        if (!key.ok()) {
          item->result = key.status().WithContext("id index entry of '" + r.group_id + "'");
        } else {
          item->result = InsertResult{InsertOutcome::kDuplicate, *key};
          ++duplicates_here;
        }
        continue;
      }
      if (!s.IsNotFound()) {
        item->result = Context(s, "dedupe lookup");
        continue;
      }
      if (r.policy_version < next.retention_floor) {
        item->result = InsertResult{InsertOutcome::kBelowRetentionFloor, SampleKey{r.policy_version, 0}};
        continue;
      }
      SampleKey key{r.policy_version, next.next_arrival++};
      const std::string encoded_key = EncodeSampleKey(key);
      // The payload is copied once, into the batch, not into a value string first.
      const std::string header = EncodeSampleValueHeader(r.group_id, r.policy_version);
      const rocksdb::Slice key_slice(encoded_key);
      const rocksdb::Slice value_parts[2] = {rocksdb::Slice(header), rocksdb::Slice(r.payload)};
      batch.Put(samples, rocksdb::SliceParts(&key_slice, 1), rocksdb::SliceParts(value_parts, 2));
      batch.Put(ids, Prefixed(kIdPrefix, r.group_id), encoded_key);
      batch.Put(ids, Prefixed(kVersionPrefix, encoded_key), r.group_id);
      next.stored += 1;
      next.stored_bytes += r.payload.size();
      in_batch.emplace(r.group_id, key);
      item->result = InsertResult{InsertOutcome::kStored, key};
      written.push_back(item);
    }
    duplicates += duplicates_here;
    if (written.empty()) return;
    Status status = WriteWithCounters(&batch, next, sync);
    if (!status.ok()) {
      for (PendingInsert* item : written) item->result = status;
    }
  }

  void CommitterLoop() {
    std::unique_lock<std::mutex> lock(queue_mu);
    while (true) {
      queue_cv.wait(lock, [&] { return stopping || !queue.empty(); });
      if (queue.empty() && stopping) return;
      std::vector<PendingInsert*> items;
      size_t bytes = 0;
      while (!queue.empty() && (items.empty() || bytes < options.group_commit_max_bytes)) {
        bytes += queue.front()->record->payload.size();
        items.push_back(queue.front());
        queue.pop_front();
      }
      lock.unlock();
      {
        std::lock_guard<std::mutex> write_lock(write_mu);
        CommitLocked(items, /*sync=*/false);
      }
      lock.lock();
      unsynced.insert(unsynced.end(), items.begin(), items.end());
      sync_cv.notify_one();
    }
  }

  void SyncerLoop() {
    std::unique_lock<std::mutex> lock(queue_mu);
    while (true) {
      sync_cv.wait(lock, [&] { return committer_done || !unsynced.empty(); });
      if (unsynced.empty() && committer_done) return;
      // Everything in `items` was written before this fsync starts.
      std::vector<PendingInsert*> items;
      items.swap(unsynced);
      lock.unlock();
      const rocksdb::Status s = db->SyncWAL();
      if (!s.ok()) {
        const Status failed = Context(s, "fsync of the write-ahead log");
        for (PendingInsert* item : items) {
          if (item->result.ok()) item->result = failed;
        }
      }
      lock.lock();
      for (PendingInsert* item : items) item->done = true;
      done_cv.notify_all();
    }
  }

  Result<std::optional<SampleKey>> FindLocked(std::string_view group_id) const {
    std::string existing;
    rocksdb::Status s = db->Get(rocksdb::ReadOptions(), ids, Prefixed(kIdPrefix, group_id), &existing);
    if (s.IsNotFound()) return std::optional<SampleKey>();
    if (!s.ok()) return Context(s, "id lookup");
    GROVE_ASSIGN_OR_RETURN(SampleKey key, DecodeSampleKey(existing));
    return std::optional<SampleKey>(key);
  }

  // NotFound -> nullopt; otherwise the mark byte.
  Result<std::optional<char>> GetMark(const std::string& encoded_key) const {
    std::string mark;
    rocksdb::Status s = db->Get(rocksdb::ReadOptions(), meta, Prefixed(kMarkPrefix, encoded_key), &mark);
    if (s.IsNotFound()) return std::optional<char>();
    if (!s.ok()) return Context(s, "settle mark lookup");
    if (mark.size() != 1 || (mark[0] != kMarkConsumed && mark[0] != kMarkDroppedStale)) {
      return Status::Corruption("replay store at " + options.path + ": settle mark is not a known mark");
    }
    return std::optional<char>(mark[0]);
  }

  Status Verify() const;
};

namespace {

// A directory holds a RocksDB database when it has a CURRENT file.
bool LooksLikeRocksDb(const fs::path& dir) { return fs::exists(dir / "CURRENT"); }

}  // namespace

Result<std::unique_ptr<GroupStore>> GroupStore::Open(const GroupStoreOptions& options) {
  if (options.path.empty()) return Status::InvalidArgument("replay store path is empty");
  const fs::path dir(options.path);
  std::error_code ec;
  bool creating = false;
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir, ec)) {
      return Status::InvalidArgument("replay store path " + options.path + " is not a directory");
    }
    if (!LooksLikeRocksDb(dir)) {
      if (!fs::is_empty(dir, ec)) {
        return Status::FailedPrecondition("replay store path " + options.path +
                                          " is a non-empty directory that holds no RocksDB database "
                                          "(no CURRENT file): not a grove replay store");
      }
      creating = true;
    }
  } else {
    creating = true;
  }
  if (creating && !options.create_if_missing) {
    return Status::NotFound("no replay store at " + options.path + " and create_if_missing is off");
  }
  if (creating) {
    // RocksDB creates only the last path component.
    fs::create_directories(dir, ec);
    if (ec) return Status::IOError("cannot create replay store directory " + options.path + ": " + ec.message());
  }

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = creating;
  db_options.create_missing_column_families = creating;
  db_options.paranoid_checks = true;
  db_options.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  db_options.max_background_jobs = 2;
  db_options.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  db_options.keep_log_file_num = 2;
  // Write flushed SST data back in 1 MiB steps instead of one large fsync at
  // the end of each flush, which would stall the WAL fsyncs behind it.
  db_options.bytes_per_sync = 1 << 20;
  if (options.env != nullptr) db_options.env = options.env;

  if (!creating) {
    std::vector<std::string> names;
    rocksdb::Status s = rocksdb::DB::ListColumnFamilies(db_options, options.path, &names);
    if (!s.ok()) return FromRocks(s, "replay store at " + options.path + ": reading MANIFEST");
    std::set<std::string> have(names.begin(), names.end());
    std::set<std::string> want = {rocksdb::kDefaultColumnFamilyName, kSamplesCf, kIdsCf, kMetaCf};
    if (have != want) {
      // A damaged MANIFEST can also list too few column families (its bad
      // records are skipped by the listing): a read-only open, which changes
      // nothing on disk, tells the two apart.
      std::vector<rocksdb::ColumnFamilyDescriptor> listed;
      for (const auto& n : names) listed.emplace_back(n, rocksdb::ColumnFamilyOptions());
      std::vector<rocksdb::ColumnFamilyHandle*> listed_handles;
      rocksdb::DB* probe = nullptr;
      rocksdb::Status probe_status =
          rocksdb::DB::OpenForReadOnly(db_options, options.path, listed, &listed_handles, &probe);
      if (probe) {
        for (auto* h : listed_handles) probe->DestroyColumnFamilyHandle(h);
        delete probe;
      }
      if (!probe_status.ok()) return FromRocks(probe_status, "cannot open replay store at " + options.path);
      std::string list;
      for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
      return Status::FailedPrecondition("RocksDB database at " + options.path +
                                        " is not a grove replay store (its column families are: " + list +
                                        "; a replay store has default, samples, ids, meta)");
    }
  }

  rocksdb::BlockBasedTableOptions table;
  table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  rocksdb::ColumnFamilyOptions samples_options;
  samples_options.write_buffer_size = options.write_buffer_bytes;
  samples_options.max_write_buffer_number = 3;
  samples_options.target_file_size_base = 64 << 20;
  // Groups are usually consumed and range-deleted soon after they arrive.
  // Letting more flushed files wait in L0 means retention often deletes them
  // before any compaction rewrites them: less write amplification on a disk
  // that already carries every byte twice (WAL, flush).
  samples_options.level0_file_num_compaction_trigger = 8;
  samples_options.max_bytes_for_level_base = 1 << 30;
  // Payloads are token ids, float log-probs and expert ids: they compress
  // little, and compression would spend CPU this workload needs for fsyncs.
  samples_options.compression = rocksdb::kNoCompression;
  rocksdb::ColumnFamilyOptions small_options;
  small_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  small_options.write_buffer_size = 16 << 20;

  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors = {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {kSamplesCf, samples_options},
      {kIdsCf, small_options},
      {kMetaCf, small_options},
  };
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, options.path, descriptors, &impl->handles, &raw);
  if (!s.ok()) return FromRocks(s, "cannot open replay store at " + options.path);
  impl->db.reset(raw);
  impl->samples = impl->handles[1];
  impl->ids = impl->handles[2];
  impl->meta = impl->handles[3];

  if (creating) {
    rocksdb::WriteBatch batch;
    batch.Put(impl->meta, rocksdb::Slice(kFormatKey.data(), kFormatKey.size()),
              rocksdb::Slice(kFormatRecord.data(), kFormatRecord.size()));
    std::lock_guard<std::mutex> lock(impl->write_mu);
    GROVE_RETURN_IF_ERROR(impl->WriteWithCounters(&batch, PersistentCounters()));
  } else {
    std::string format;
    s = impl->db->Get(rocksdb::ReadOptions(), impl->meta, rocksdb::Slice(kFormatKey.data(), kFormatKey.size()),
                      &format);
    if (s.IsNotFound()) {
      return Status::FailedPrecondition("RocksDB database at " + options.path +
                                        " has no grove format record: not a grove replay store");
    }
    if (!s.ok()) return impl->Context(s, "reading the format record");
    if (format != kFormatRecord) {
      return Status::FailedPrecondition("replay store at " + options.path + " is '" + format.substr(0, 80) +
                                        "'; this build reads '" + std::string(kFormatRecord) + "'");
    }
    std::string counters;
    s = impl->db->Get(rocksdb::ReadOptions(), impl->meta,
                      rocksdb::Slice(kCountersKey.data(), kCountersKey.size()), &counters);
    if (!s.ok()) return impl->Context(s, "reading the counters record");
    Result<PersistentCounters> decoded = PersistentCounters::Decode(counters);
    if (!decoded.ok()) return decoded.status().WithContext("replay store at " + options.path);
    impl->counters = *decoded;
    if (options.verify_records_at_open) GROVE_RETURN_IF_ERROR(impl->Verify());
  }
  if (options.sync_mode == SyncMode::kGroupCommit) {
    impl->committer = std::thread([p = impl.get()] { p->CommitterLoop(); });
    impl->syncer = std::thread([p = impl.get()] { p->SyncerLoop(); });
  }
  return std::unique_ptr<GroupStore>(new GroupStore(std::move(impl)));
}

// Reads every sample (block checksums verified) and checks that samples and
// both halves of the id index agree one-to-one, and that arrivals are below
// the persisted arrival sequence.
Status GroupStore::Impl::Verify() const {
  const std::string where = "replay store at " + options.path;
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  ro.fill_cache = false;
  std::unique_ptr<rocksdb::Iterator> sample_it(db->NewIterator(ro, samples));
  std::unique_ptr<rocksdb::Iterator> version_it(db->NewIterator(ro, ids));
  version_it->Seek(std::string(1, kVersionPrefix));
  uint64_t count = 0;
  for (sample_it->SeekToFirst(); sample_it->Valid(); sample_it->Next(), ++count) {
    Result<SampleKey> key = DecodeSampleKey(sample_it->key().ToStringView());
    if (!key.ok()) return key.status().WithContext(where);
    Result<GroupRecord> record = DecodeSampleValue(sample_it->value().ToStringView(), *key);
    if (!record.ok()) return record.status().WithContext(where);
    if (key->arrival >= counters.next_arrival) {
      return Status::Corruption(where + ": record arrival " + std::to_string(key->arrival) +
                                " is not below the stored arrival sequence " +
                                std::to_string(counters.next_arrival));
    }
    const std::string version_key = Prefixed(kVersionPrefix, sample_it->key().ToStringView());
    if (!version_it->Valid() || version_it->key().ToStringView() != version_key ||
        version_it->value().ToStringView() != record->group_id) {
      return Status::Corruption(where + ": id index has no matching entry for group '" + record->group_id + "'");
    }
    version_it->Next();
    Result<std::optional<SampleKey>> found = FindLocked(record->group_id);
    if (!found.ok()) return found.status().WithContext(where);
    if (!found->has_value() || **found != *key) {
      return Status::Corruption(where + ": id index does not point group '" + record->group_id +
                                "' at its record");
    }
  }
  if (!sample_it->status().ok()) return Context(sample_it->status(), "reading samples");
  if (version_it->Valid() && !version_it->key().empty() && version_it->key()[0] == kVersionPrefix) {
    return Status::Corruption(where + ": id index holds entries whose records are missing");
  }
  if (!version_it->status().ok()) return Context(version_it->status(), "reading the id index");
  LOG(INFO) << where << ": verified " << count << " records";
  return Status::OK();
}

GroupStore::GroupStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GroupStore::~GroupStore() = default;

const GroupStoreOptions& GroupStore::options() const { return impl_->options; }

Result<InsertResult> GroupStore::Insert(const GroupRecord& record) {
  if (record.group_id.empty()) return Status::InvalidArgument("group id is empty");
  PendingInsert pending;
  pending.record = &record;
  if (impl_->options.sync_mode == SyncMode::kPerWrite) {
    std::lock_guard<std::mutex> lock(impl_->write_mu);
    impl_->CommitLocked({&pending}, /*sync=*/true);
    return std::move(pending.result);
  }
  std::unique_lock<std::mutex> lock(impl_->queue_mu);
  if (impl_->stopping) return Status::Aborted("replay store is closing");
  impl_->queue.push_back(&pending);
  impl_->queue_cv.notify_one();
  impl_->done_cv.wait(lock, [&] { return pending.done; });
  return std::move(pending.result);
}

Result<std::vector<GroupRecord>> GroupStore::Read(const std::vector<SampleKey>& keys) const {
  std::vector<std::string> encoded;
  encoded.reserve(keys.size());
  for (const SampleKey& k : keys) encoded.push_back(EncodeSampleKey(k));
  std::vector<rocksdb::Slice> slices(encoded.begin(), encoded.end());
  std::vector<rocksdb::PinnableSlice> values(keys.size());
  std::vector<rocksdb::Status> statuses(keys.size());
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  impl_->db->MultiGet(ro, impl_->samples, keys.size(), slices.data(), values.data(), statuses.data());
  std::vector<GroupRecord> out;
  out.reserve(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    if (statuses[i].IsNotFound()) {
      return Status::NotFound("replay store has no record at version " + std::to_string(keys[i].policy_version) +
                              ", arrival " + std::to_string(keys[i].arrival));
    }
    if (!statuses[i].ok()) return impl_->Context(statuses[i], "reading a record");
    GROVE_ASSIGN_OR_RETURN(GroupRecord r, DecodeSampleValue(values[i].ToStringView(), keys[i]));
    out.push_back(std::move(r));
  }
  return out;
}

Result<std::optional<SampleKey>> GroupStore::Find(std::string_view group_id) const {
  return impl_->FindLocked(group_id);
}

Status GroupStore::ForEachUnsettled(const std::function<void(const UnsettledGroup&)>& fn) const {
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  std::unique_ptr<rocksdb::Iterator> version_it(impl_->db->NewIterator(ro, impl_->ids));
  std::unique_ptr<rocksdb::Iterator> mark_it(impl_->db->NewIterator(ro, impl_->meta));
  mark_it->Seek(std::string(1, kMarkPrefix));
  for (version_it->Seek(std::string(1, kVersionPrefix));
       version_it->Valid() && version_it->key()[0] == kVersionPrefix; version_it->Next()) {
    rocksdb::Slice encoded = version_it->key();
    encoded.remove_prefix(1);
    GROVE_ASSIGN_OR_RETURN(SampleKey key, DecodeSampleKey(encoded.ToStringView()));
    // Both iterators walk sample keys in the same order: advance marks to here.
    while (mark_it->Valid() && mark_it->key()[0] == kMarkPrefix &&
           mark_it->key().ToStringView().substr(1) < encoded.ToStringView()) {
      mark_it->Next();
    }
    const bool settled = mark_it->Valid() && mark_it->key()[0] == kMarkPrefix &&
                         mark_it->key().ToStringView().substr(1) == encoded.ToStringView();
    if (!settled) fn(UnsettledGroup{key, version_it->value().ToString()});
  }
  if (!version_it->status().ok()) return impl_->Context(version_it->status(), "reading the id index");
  if (!mark_it->status().ok()) return impl_->Context(mark_it->status(), "reading settle marks");
  return Status::OK();
}

Result<std::vector<SampleKey>> GroupStore::MarkConsumed(const std::vector<std::string>& group_ids,
                                                        int64_t learner_version, std::string_view consumer) {
  if (consumer.empty()) return Status::InvalidArgument("consumer id is empty");
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  GROVE_ASSIGN_OR_RETURN(DataCursor cursor, Cursor(consumer));
  rocksdb::WriteBatch batch;
  std::vector<SampleKey> marked;
  std::set<SampleKey> seen;
  for (const std::string& id : group_ids) {
    GROVE_ASSIGN_OR_RETURN(std::optional<SampleKey> key, impl_->FindLocked(id));
    if (!key) return Status::NotFound("cannot mark group '" + id + "' consumed: the replay store does not hold it");
    if (!seen.insert(*key).second) continue;
    const std::string encoded = EncodeSampleKey(*key);
    GROVE_ASSIGN_OR_RETURN(std::optional<char> mark, impl_->GetMark(encoded));
    if (mark) continue;
    batch.Put(impl_->meta, Prefixed(kMarkPrefix, encoded), std::string(1, kMarkConsumed));
    marked.push_back(*key);
  }
  cursor.learner_version = learner_version;
  cursor.consumed += marked.size();
  batch.Put(impl_->meta, Prefixed(kCursorPrefix, consumer), EncodeCursor(cursor));
  PersistentCounters next = impl_->counters;
  next.consumed += marked.size();
  GROVE_RETURN_IF_ERROR(impl_->WriteWithCounters(&batch, next));
  return marked;
}

Result<uint64_t> GroupStore::MarkDroppedStale(const std::vector<SampleKey>& keys) {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  rocksdb::WriteBatch batch;
  uint64_t marked = 0;
  std::set<SampleKey> seen;
  for (const SampleKey& key : keys) {
    if (!seen.insert(key).second) continue;
    const std::string encoded = EncodeSampleKey(key);
    GROVE_ASSIGN_OR_RETURN(std::optional<char> mark, impl_->GetMark(encoded));
    if (mark) continue;
    batch.Put(impl_->meta, Prefixed(kMarkPrefix, encoded), std::string(1, kMarkDroppedStale));
    ++marked;
  }
  if (marked == 0) return marked;
  PersistentCounters next = impl_->counters;
  next.dropped_stale += marked;
  GROVE_RETURN_IF_ERROR(impl_->WriteWithCounters(&batch, next));
  return marked;
}

Result<DataCursor> GroupStore::Cursor(std::string_view consumer) const {
  std::string value;
  rocksdb::Status s = impl_->db->Get(rocksdb::ReadOptions(), impl_->meta, Prefixed(kCursorPrefix, consumer), &value);
  if (s.IsNotFound()) return DataCursor();
  if (!s.ok()) return impl_->Context(s, "reading a data cursor");
  return DecodeCursor(value, consumer);
}

Status GroupStore::RetireBelow(int64_t below_version, uint64_t min_groups) {
  std::unique_lock<std::mutex> lock(impl_->write_mu);
  const int64_t floor = impl_->counters.retention_floor;
  if (below_version <= floor) return Status::OK();
  const std::string lo = VersionLowerBound(floor);
  const std::string hi = VersionLowerBound(below_version);
  const std::string lo_v = Prefixed(kVersionPrefix, lo), hi_v = Prefixed(kVersionPrefix, hi);
  const std::string lo_m = Prefixed(kMarkPrefix, lo), hi_m = Prefixed(kMarkPrefix, hi);

  rocksdb::WriteBatch batch;
  rocksdb::ReadOptions ro;
  rocksdb::Slice upper(hi_v);
  ro.iterate_upper_bound = &upper;
  std::unique_ptr<rocksdb::Iterator> it(impl_->db->NewIterator(ro, impl_->ids));
  for (it->Seek(lo_v); it->Valid(); it->Next()) {
    const std::string encoded = it->key().ToString().substr(1);
    GROVE_ASSIGN_OR_RETURN(std::optional<char> mark, impl_->GetMark(encoded));
    if (!mark) {
      GROVE_ASSIGN_OR_RETURN(SampleKey key, DecodeSampleKey(encoded));
      return Status::FailedPrecondition("cannot retire versions below " + std::to_string(below_version) +
                                        ": group '" + it->value().ToString() + "' (version " +
                                        std::to_string(key.policy_version) + ") is neither consumed nor dropped");
    }
    batch.Delete(impl_->ids, Prefixed(kIdPrefix, it->value().ToStringView()));
  }
  if (!it->status().ok()) return impl_->Context(it->status(), "scanning the retired range");
  // Too little in the range: leave the floor where it is rather than pay a
  // synced write and three compactions for it.
  if (batch.Count() < std::max<uint64_t>(min_groups, 1)) return Status::OK();
  batch.DeleteRange(impl_->samples, lo, hi);
  batch.DeleteRange(impl_->ids, lo_v, hi_v);
  batch.DeleteRange(impl_->meta, lo_m, hi_m);
  PersistentCounters next = impl_->counters;
  next.retention_floor = below_version;
  GROVE_RETURN_IF_ERROR(impl_->WriteWithCounters(&batch, next));
  lock.unlock();  // inserts may proceed while the retired range is compacted

  // Compact exactly the retired ranges so their files are rewritten without
  // the deleted data now, not whenever compaction would reach them.
  rocksdb::CompactRangeOptions cro;
  cro.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
  rocksdb::Slice s_lo(lo), s_hi(hi), v_lo(lo_v), v_hi(hi_v), m_lo(lo_m), m_hi(hi_m);
  rocksdb::Status s = impl_->db->CompactRange(cro, impl_->samples, &s_lo, &s_hi);
  if (s.ok()) s = impl_->db->CompactRange(cro, impl_->ids, &v_lo, &v_hi);
  if (s.ok()) s = impl_->db->CompactRange(cro, impl_->meta, &m_lo, &m_hi);
  if (!s.ok()) return impl_->Context(s, "compacting the retired range");
  return Status::OK();
}

StoreCounters GroupStore::Counters() const {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  StoreCounters c;
  c.stored = impl_->counters.stored;
  c.stored_bytes = impl_->counters.stored_bytes;
  c.consumed = impl_->counters.consumed;
  c.dropped_stale = impl_->counters.dropped_stale;
  c.duplicates = impl_->duplicates.load();
  c.retention_floor = impl_->counters.retention_floor;
  return c;
}

Result<uint64_t> GroupStore::LiveFileBytes() {
  rocksdb::FlushOptions fo;
  rocksdb::Status s = impl_->db->Flush(fo, impl_->handles);
  if (!s.ok()) return impl_->Context(s, "flush");
  uint64_t total = 0;
  for (auto* h : impl_->handles) {
    uint64_t bytes = 0;
    if (!impl_->db->GetIntProperty(h, "rocksdb.live-sst-files-size", &bytes)) {
      return Status::Internal("RocksDB does not report rocksdb.live-sst-files-size");
    }
    total += bytes;
  }
  return total;
}

}  // namespace grove::replay
