// SyncJournalFileSystem (test-only): a RocksDB FileSystem that records, for
// every write-ahead-log file, how many bytes were fsync'd, in a journal file
// written with write(2) (so it survives kill -9 of the process). After a kill,
// TruncateWalsToSynced() cuts each WAL this process wrote back to its last
// fsync'd length: what a machine crash leaves of the log in the worst case
// (the page cache lost). The crash test uses it to check that no
// acknowledged group depended on unsynced bytes.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

namespace grove::replay::testing {

inline bool IsWal(const std::string& fname) {
  return fname.size() > 4 && fname.compare(fname.size() - 4, 4, ".log") == 0;
}

class SyncJournal {
 public:
  explicit SyncJournal(const std::string& path) : fd_(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644)) {}
  ~SyncJournal() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool ok() const { return fd_ >= 0; }
  void Record(const std::string& what, const std::string& fname, uint64_t n) {
    const std::string line =
        what + " " + std::filesystem::path(fname).filename().string() + " " + std::to_string(n) + "\n";
    std::lock_guard<std::mutex> lock(mu_);
    if (::write(fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size())) std::abort();
  }

 private:
  int fd_;
  std::mutex mu_;
};

class JournaledWal : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  JournaledWal(std::unique_ptr<rocksdb::FSWritableFile>&& file, std::string fname, SyncJournal* journal)
      : FSWritableFileOwnerWrapper(std::move(file)), fname_(std::move(fname)), journal_(journal) {}

  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o, rocksdb::IODebugContext* d) override {
    rocksdb::IOStatus s = FSWritableFileOwnerWrapper::Append(data, o, d);
    if (s.ok()) appended_ += data.size();
    return s;
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           const rocksdb::DataVerificationInfo& v, rocksdb::IODebugContext* d) override {
    rocksdb::IOStatus s = FSWritableFileOwnerWrapper::Append(data, o, v, d);
    if (s.ok()) appended_ += data.size();
    return s;
  }
  // The length is read before the sync starts: bytes appended while an fsync
  // runs are not promised by it (RocksDB's group-commit pipeline appends the
  // next batch while the syncer fsyncs), so counting them would be generous.
  rocksdb::IOStatus Sync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* d) override {
    const uint64_t before = appended_.load();
    return Synced(FSWritableFileOwnerWrapper::Sync(o, d), before);
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* d) override {
    const uint64_t before = appended_.load();
    return Synced(FSWritableFileOwnerWrapper::Fsync(o, d), before);
  }
  rocksdb::IOStatus Close(const rocksdb::IOOptions& o, rocksdb::IODebugContext* d) override {
    // A clean close is not a promise of durability: only Sync counts.
    return FSWritableFileOwnerWrapper::Close(o, d);
  }

 private:
  rocksdb::IOStatus Synced(rocksdb::IOStatus s, uint64_t length) {
    if (s.ok()) journal_->Record("sync", fname_, length);
    return s;
  }
  std::string fname_;
  SyncJournal* journal_;
  std::atomic<uint64_t> appended_{0};
};

class SyncJournalFileSystem : public rocksdb::FileSystemWrapper {
 public:
  SyncJournalFileSystem(const std::shared_ptr<rocksdb::FileSystem>& base, const std::string& journal_path)
      : FileSystemWrapper(base), journal_(journal_path) {}
  const char* Name() const override { return "SyncJournalFileSystem"; }
  bool ok() const { return journal_.ok(); }

  rocksdb::IOStatus NewWritableFile(const std::string& fname, const rocksdb::FileOptions& opts,
                                    std::unique_ptr<rocksdb::FSWritableFile>* result,
                                    rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = FileSystemWrapper::NewWritableFile(fname, opts, result, dbg);
    if (s.ok() && IsWal(fname)) {
      journal_.Record("open", fname, 0);
      *result = std::make_unique<JournaledWal>(std::move(*result), fname, &journal_);
    }
    return s;
  }

 private:
  SyncJournal journal_;
};

// Cuts every WAL opened by the journaled process back to its last synced
// length (0 if never synced). Returns the number of bytes cut.
inline uint64_t TruncateWalsToSynced(const std::string& db_dir, const std::string& journal_path) {
  std::map<std::string, uint64_t> synced;
  std::ifstream in(journal_path);
  std::string what, name;
  uint64_t n;
  while (in >> what >> name >> n) {
    if (what == "open") synced[name] = 0;
    else synced[name] = std::max(synced[name], n);
  }
  uint64_t cut = 0;
  for (const auto& [file, length] : synced) {
    const std::filesystem::path p = std::filesystem::path(db_dir) / file;
    if (!std::filesystem::exists(p)) continue;  // deleted after its data was flushed
    const uint64_t size = std::filesystem::file_size(p);
    if (size > length) {
      std::filesystem::resize_file(p, length);
      cut += size - length;
    }
  }
  return cut;
}

}  // namespace grove::replay::testing
