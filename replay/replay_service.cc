#include "replay/replay_service.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>

#include <glog/logging.h>

namespace grove::replay {
namespace {

using Clock = std::chrono::steady_clock;

struct IndexEntry {
  std::string group_id;
  std::string leased_by;       // empty: not leased
  Clock::time_point lease_end;  // meaningful when leased and a timeout is set
};

}  // namespace

struct ReplayService::Impl {
  ReplayOptions options;
  std::unique_ptr<GroupStore> store;

  mutable std::mutex mu;
  std::condition_variable room_cv;  // signalled when unsettled groups leave the index
  std::map<SampleKey, IndexEntry> index;  // unsettled groups, oldest first
  std::unordered_map<std::string, SampleKey> key_of;
  uint64_t inserts_in_flight = 0;
  uint64_t inserted = 0;  // since open, recovered groups included (rate limiter)
  uint64_t served = 0;
  uint64_t duplicates = 0;
  uint64_t below_floor = 0;
  uint64_t refused_full = 0;
  uint64_t leased = 0;
  bool closed = false;
  // The last bound SampleBatch applied: versions below it are never served.
  std::optional<int64_t> last_stale_threshold;

  bool LeaseActive(const IndexEntry& e, Clock::time_point now) const {
    if (e.leased_by.empty()) return false;
    return options.lease_timeout.count() == 0 || now < e.lease_end;
  }

  void EraseLocked(std::map<SampleKey, IndexEntry>::iterator it) {
    if (!it->second.leased_by.empty()) --leased;
    key_of.erase(it->second.group_id);
    index.erase(it);
  }

  bool HasRoomLocked() const { return index.size() + inserts_in_flight < options.max_unconsumed; }

  Status QueueFull() const {
    return Status::ResourceExhausted("queue full: " + std::to_string(index.size() + inserts_in_flight) +
                                     " groups are waiting for the learner (max_unconsumed " +
                                     std::to_string(options.max_unconsumed) + "); retry later");
  }

  // Called with `lock` held and room reserved; returns with `lock` held.
  Result<InsertOutcome> InsertReserved(const GroupRecord& record, std::unique_lock<std::mutex>& lock) {
    ++inserts_in_flight;
    lock.unlock();
    Result<InsertResult> result = store->Insert(record);
    lock.lock();
    --inserts_in_flight;
    room_cv.notify_all();
    if (!result.ok()) return result.status();
    switch (result->outcome) {
      case InsertOutcome::kStored:
        index.emplace(result->key, IndexEntry{record.group_id, {}, {}});
        key_of.emplace(record.group_id, result->key);
        ++inserted;
        break;
      case InsertOutcome::kDuplicate:
        ++duplicates;
        break;
      case InsertOutcome::kBelowRetentionFloor:
        ++below_floor;
        break;
    }
    return result->outcome;
  }

  // Returns an outcome when the insert is settled without the store
  // (closed, known duplicate), nullopt when it should proceed.
  std::optional<Result<InsertOutcome>> Precheck(const GroupRecord& record) {
    if (closed) return Result<InsertOutcome>(Status::Aborted("replay service is closed"));
    if (record.group_id.empty()) return Result<InsertOutcome>(Status::InvalidArgument("group id is empty"));
    if (key_of.count(record.group_id)) {
      ++duplicates;
      return Result<InsertOutcome>(InsertOutcome::kDuplicate);
    }
    return std::nullopt;
  }
};

Result<std::unique_ptr<ReplayService>> ReplayService::Open(const ReplayOptions& options) {
  if (options.max_unconsumed == 0) return Status::InvalidArgument("replay max_unconsumed must be positive");
  if (options.min_size_to_serve > options.max_unconsumed) {
    return Status::InvalidArgument("replay min_size_to_serve (" + std::to_string(options.min_size_to_serve) +
                                   ") exceeds max_unconsumed (" + std::to_string(options.max_unconsumed) +
                                   "): no batch could ever be served");
  }
  if (!(options.samples_per_insert >= 0.0) || !(options.samples_per_insert_error_buffer >= 0.0)) {
    return Status::InvalidArgument("replay samples_per_insert and its error buffer must be >= 0");
  }
  if (options.samples_per_insert > 0.0 && options.samples_per_insert_error_buffer < 1.0) {
    return Status::InvalidArgument("replay samples_per_insert_error_buffer must be >= 1 when the ratio is on");
  }
  if (options.lease_timeout.count() < 0) return Status::InvalidArgument("replay lease_timeout is negative");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  GROVE_ASSIGN_OR_RETURN(impl->store, GroupStore::Open(options.store));
  Impl* p = impl.get();
  GROVE_RETURN_IF_ERROR(p->store->ForEachUnsettled([p](const UnsettledGroup& g) {
    p->index.emplace(g.key, IndexEntry{g.group_id, {}, {}});
    p->key_of.emplace(g.group_id, g.key);
  }));
  p->inserted = p->index.size();
  LOG(INFO) << "replay store " << options.store.path << " open: " << p->index.size()
            << " unsettled groups, sync mode " << SyncModeName(options.store.sync_mode);
  return std::unique_ptr<ReplayService>(new ReplayService(std::move(impl)));
}

ReplayService::ReplayService(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ReplayService::~ReplayService() { Close(); }

GroupStore& ReplayService::store() { return *impl_->store; }

Result<InsertOutcome> ReplayService::Insert(const GroupRecord& record) {
  std::unique_lock<std::mutex> lock(impl_->mu);
  if (auto early = impl_->Precheck(record)) return std::move(*early);
  if (!impl_->HasRoomLocked()) {
    ++impl_->refused_full;
    return impl_->QueueFull();
  }
  return impl_->InsertReserved(record, lock);
}

Result<InsertOutcome> ReplayService::InsertWait(const GroupRecord& record, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(impl_->mu);
  const auto deadline = Clock::now() + timeout;
  while (true) {
    if (auto early = impl_->Precheck(record)) return std::move(*early);
    if (impl_->HasRoomLocked()) return impl_->InsertReserved(record, lock);
    if (impl_->room_cv.wait_until(lock, deadline) == std::cv_status::timeout && !impl_->HasRoomLocked()) {
      if (auto early = impl_->Precheck(record)) return std::move(*early);
      ++impl_->refused_full;
      return impl_->QueueFull();
    }
  }
}

Result<SampledBatch> ReplayService::SampleBatch(size_t batch_size, int64_t learner_version,
                                                int64_t max_staleness, std::string_view consumer) {
  if (max_staleness < 0) return Status::InvalidArgument("max_staleness is negative");
  if (consumer.empty()) return Status::InvalidArgument("consumer id is empty");
  if (batch_size == 0) return Status::InvalidArgument("batch size is 0");
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mu);
  if (m.closed) return Status::Aborted("replay service is closed");
  const auto now = Clock::now();
  SampledBatch batch;

  // Drop what is too stale: version < learner_version - max_staleness.
  // Computed in 128 bits so extreme versions cannot overflow.
  const __int128 threshold128 = static_cast<__int128>(learner_version) - max_staleness;
  const int64_t threshold = threshold128 < std::numeric_limits<int64_t>::min()
                                ? std::numeric_limits<int64_t>::min()
                                : static_cast<int64_t>(threshold128);
  std::vector<SampleKey> stale;
  for (auto it = m.index.begin(); it != m.index.end() && it->first.policy_version < threshold; ++it) {
    if (!m.LeaseActive(it->second, now)) stale.push_back(it->first);
  }
  if (!stale.empty()) {
    GROVE_ASSIGN_OR_RETURN(uint64_t marked, m.store->MarkDroppedStale(stale));
    (void)marked;  // a key here is unsettled by construction; count what left the index
    for (const SampleKey& k : stale) m.EraseLocked(m.index.find(k));
    batch.dropped_stale = stale.size();
    m.room_cv.notify_all();
  }
  if (!m.last_stale_threshold || threshold > *m.last_stale_threshold) m.last_stale_threshold = threshold;

  // Rate limiting.
  size_t allowed = batch_size;
  if (m.index.size() < m.options.min_size_to_serve) {
    batch.ready = false;
    batch.wait_reason = "waiting for min_size_to_serve: " + std::to_string(m.index.size()) + " of " +
                        std::to_string(m.options.min_size_to_serve) + " groups";
    return batch;
  }
  if (m.options.samples_per_insert > 0.0) {
    const double budget = std::floor(m.options.samples_per_insert * static_cast<double>(m.inserted) +
                                     m.options.samples_per_insert_error_buffer) -
                          static_cast<double>(m.served);
    if (budget < 1.0) {
      batch.ready = false;
      batch.wait_reason = "samples_per_insert bound: " + std::to_string(m.served) + " served for " +
                          std::to_string(m.inserted) + " inserted";
      return batch;
    }
    allowed = std::min<double>(allowed, budget);
  }

  std::vector<SampleKey> keys;
  for (auto& [key, entry] : m.index) {
    if (keys.size() == allowed) break;
    if (key.policy_version < threshold) continue;  // leased stale ones: never served again
    if (m.LeaseActive(entry, now)) continue;
    if (entry.leased_by.empty()) ++m.leased;
    entry.leased_by.assign(consumer);
    entry.lease_end = now + m.options.lease_timeout;
    keys.push_back(key);
  }
  if (keys.empty()) {
    batch.ready = false;
    batch.wait_reason = "no unleased groups to serve";
    return batch;
  }
  m.served += keys.size();
  lock.unlock();

  Result<std::vector<GroupRecord>> records = m.store->Read(keys);
  if (!records.ok()) {
    lock.lock();
    for (const SampleKey& k : keys) {
      auto it = m.index.find(k);
      if (it != m.index.end() && !it->second.leased_by.empty()) {
        it->second.leased_by.clear();
        --m.leased;
      }
    }
    m.served -= keys.size();
    return records.status();
  }
  batch.groups = std::move(*records);
  return batch;
}

Result<uint64_t> ReplayService::MarkConsumed(const std::vector<std::string>& group_ids, int64_t learner_version,
                                             std::string_view consumer) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.closed) return Status::Aborted("replay service is closed");
  }
  GROVE_ASSIGN_OR_RETURN(std::vector<SampleKey> marked, m.store->MarkConsumed(group_ids, learner_version, consumer));
  {
    std::lock_guard<std::mutex> lock(m.mu);
    for (const SampleKey& k : marked) {
      auto it = m.index.find(k);
      if (it != m.index.end()) m.EraseLocked(it);
    }
    m.room_cv.notify_all();
  }
  if (m.options.retire_on_consume) {
    Result<int64_t> floor = RetireServedOut();
    // Retention is housekeeping: a failure here must not fail the mark, which
    // is already durable; it is retried after the next mark.
    if (!floor.ok()) LOG(WARNING) << "replay retention skipped: " << floor.status();
  }
  return static_cast<uint64_t>(marked.size());
}

Result<DataCursor> ReplayService::Cursor(std::string_view consumer) const { return impl_->store->Cursor(consumer); }

uint64_t ReplayService::ReleaseLeases(std::string_view consumer) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  uint64_t released = 0;
  for (auto& [key, entry] : m.index) {
    if (entry.leased_by.empty() || entry.leased_by != consumer) continue;
    entry.leased_by.clear();
    --m.leased;
    ++released;
  }
  return released;
}

Result<int64_t> ReplayService::RetireServedOut() {
  Impl& m = *impl_;
  int64_t below;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (!m.last_stale_threshold) return m.store->Counters().retention_floor;
    below = *m.last_stale_threshold;
    if (!m.index.empty()) below = std::min(below, m.index.begin()->first.policy_version);
  }
  GROVE_RETURN_IF_ERROR(m.store->RetireBelow(below, m.options.retire_min_groups));
  return m.store->Counters().retention_floor;
}

ReplayCounters ReplayService::Counters() const {
  const StoreCounters s = impl_->store->Counters();
  std::lock_guard<std::mutex> lock(impl_->mu);
  ReplayCounters c;
  c.stored = s.stored;
  c.stored_bytes = s.stored_bytes;
  c.consumed = s.consumed;
  c.dropped_stale = s.dropped_stale + impl_->below_floor;
  c.duplicates = impl_->duplicates;
  c.served = impl_->served;
  c.queue_depth = impl_->index.size();
  c.leased = impl_->leased;
  c.refused_full = impl_->refused_full;
  c.retention_floor = s.retention_floor;
  return c;
}

void ReplayService::Close() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->closed = true;
  impl_->room_cv.notify_all();
}

}  // namespace grove::replay
