// Corrupt or foreign data on disk must give a clear error Status at open:
// never a crash, never an empty store that silently replaces the data.
#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include "replay/group_store.h"
#include "tests/replay/scratch_dir.h"

namespace grove::replay {
namespace {

namespace fs = std::filesystem;
using testing::ScratchDir;

Result<std::unique_ptr<GroupStore>> OpenAt(const std::string& path) {
  GroupStoreOptions o;
  o.path = path;
  o.write_buffer_bytes = 1 << 20;
  return GroupStore::Open(o);
}

// A closed store with `n` groups flushed into SST files.
void MakeStore(const std::string& path, int n) {
  auto store = OpenAt(path);
  ASSERT_TRUE(store.ok()) << store.status();
  std::mt19937_64 rng(1);
  for (int i = 0; i < n; ++i) {
    std::string payload(8000, '\0');
    for (auto& c : payload) c = static_cast<char>(rng());
    ASSERT_TRUE((*store)->Insert({"g" + std::to_string(i), i % 4, payload, 0}).ok());
  }
  ASSERT_TRUE((*store)->LiveFileBytes().ok());  // flushes memtables to SSTs
}

std::vector<fs::path> FilesWithPrefixOrExt(const std::string& dir, const std::string& prefix, const std::string& ext) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if ((!prefix.empty() && name.rfind(prefix, 0) == 0) || (!ext.empty() && e.path().extension() == ext)) {
      out.push_back(e.path());
    }
  }
  std::sort(out.begin(), out.end(), [](const fs::path& a, const fs::path& b) {
    return fs::file_size(a) > fs::file_size(b);
  });
  return out;
}

void Overwrite(const fs::path& file, uint64_t offset, size_t n, uint64_t seed) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f.good()) << file;
  f.seekp(static_cast<std::streamoff>(offset));
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < n; ++i) f.put(static_cast<char>(rng()));
}

void ExpectClearError(const Result<std::unique_ptr<GroupStore>>& r, const std::string& path,
                      std::initializer_list<StatusCode> codes) {
  ASSERT_FALSE(r.ok()) << "opened damaged store at " << path;
  bool code_ok = false;
  for (StatusCode c : codes) code_ok |= r.status().code() == c;
  EXPECT_TRUE(code_ok) << r.status();
  EXPECT_NE(r.status().message().find(path), std::string::npos) << "message should name the path: " << r.status();
}

TEST(CorruptionTest, PathThatIsAFile) {
  ScratchDir dir;
  std::ofstream(dir.Sub("file")) << "hello";
  ExpectClearError(OpenAt(dir.Sub("file")), dir.Sub("file"), {StatusCode::kInvalidArgument});
}

TEST(CorruptionTest, NonEmptyDirectoryWithoutADatabase) {
  ScratchDir dir;
  fs::create_directories(dir.Sub("notdb"));
  std::ofstream(dir.Sub("notdb") + "/important.txt") << "someone's data";
  ExpectClearError(OpenAt(dir.Sub("notdb")), dir.Sub("notdb"), {StatusCode::kFailedPrecondition});
  EXPECT_TRUE(fs::exists(dir.Sub("notdb") + "/important.txt"));  // nothing was touched
}

TEST(CorruptionTest, ForeignRocksDbIsRefused) {
  ScratchDir dir;
  {
    rocksdb::Options o;
    o.create_if_missing = true;
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(o, dir.Sub("foreign"), &db).ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "k", "v").ok());
    delete db;
  }
  Result<std::unique_ptr<GroupStore>> r = OpenAt(dir.Sub("foreign"));
  ExpectClearError(r, dir.Sub("foreign"), {StatusCode::kFailedPrecondition});
  EXPECT_NE(r.status().message().find("not a grove replay store"), std::string::npos) << r.status();
}

// Opens the raw RocksDB of a grove store with its column families.
struct RawDb {
  explicit RawDb(const std::string& path) {
    rocksdb::DBOptions o;
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
        {rocksdb::kDefaultColumnFamilyName, {}}, {"samples", {}}, {"ids", {}}, {"meta", {}}};
    rocksdb::DB* raw = nullptr;
    rocksdb::Status s = rocksdb::DB::Open(o, path, cfs, &handles, &raw);
    EXPECT_TRUE(s.ok()) << s.ToString();
    db.reset(raw);
  }
  ~RawDb() {
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
  }
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
};

TEST(CorruptionTest, WrongFormatVersionOrMissingFormatRecord) {
  ScratchDir dir;
  MakeStore(dir.Sub("db"), 3);
  {
    RawDb raw(dir.Sub("db"));
    ASSERT_TRUE(raw.db->Put(rocksdb::WriteOptions(), raw.handles[3], "format", "grove-replay-store format 99").ok());
  }
  Result<std::unique_ptr<GroupStore>> r = OpenAt(dir.Sub("db"));
  ExpectClearError(r, dir.Sub("db"), {StatusCode::kFailedPrecondition});
  EXPECT_NE(r.status().message().find("format 99"), std::string::npos) << r.status();
  {
    RawDb raw(dir.Sub("db"));
    ASSERT_TRUE(raw.db->Delete(rocksdb::WriteOptions(), raw.handles[3], "format").ok());
  }
  ExpectClearError(OpenAt(dir.Sub("db")), dir.Sub("db"), {StatusCode::kFailedPrecondition});
}

TEST(CorruptionTest, RecordThatFailsToParse) {
  ScratchDir dir;
  MakeStore(dir.Sub("db"), 3);
  {
    RawDb raw(dir.Sub("db"));
    // A key that sorts among real records (version 1) with a value of another format.
    std::string key = EncodeSampleKey(SampleKey{1, 2});
    ASSERT_TRUE(raw.db->Put(rocksdb::WriteOptions(), raw.handles[1], key, "\x07garbage-value-here").ok());
  }
  Result<std::unique_ptr<GroupStore>> r = OpenAt(dir.Sub("db"));
  ExpectClearError(r, dir.Sub("db"), {StatusCode::kCorruption});
  EXPECT_NE(r.status().message().find("record format"), std::string::npos) << r.status();
}

TEST(CorruptionTest, IndexWithoutItsRecord) {
  ScratchDir dir;
  MakeStore(dir.Sub("db"), 3);
  {
    RawDb raw(dir.Sub("db"));
    std::unique_ptr<rocksdb::Iterator> it(raw.db->NewIterator(rocksdb::ReadOptions(), raw.handles[1]));
    it->SeekToFirst();
    ASSERT_TRUE(it->Valid());
    ASSERT_TRUE(raw.db->Delete(rocksdb::WriteOptions(), raw.handles[1], it->key()).ok());
  }
  ExpectClearError(OpenAt(dir.Sub("db")), dir.Sub("db"), {StatusCode::kCorruption});
}

TEST(CorruptionTest, GarbageInsideAnSstFile) {
  ScratchDir dir;
  MakeStore(dir.Sub("db"), 40);
  std::vector<fs::path> ssts = FilesWithPrefixOrExt(dir.Sub("db"), "", ".sst");
  ASSERT_FALSE(ssts.empty());
  // The largest SST holds the samples; damage data blocks in its middle.
  Overwrite(ssts[0], fs::file_size(ssts[0]) / 3, 4096, 11);
  ExpectClearError(OpenAt(dir.Sub("db")), dir.Sub("db"), {StatusCode::kCorruption});
}

TEST(CorruptionTest, TruncatedSstFile) {
  ScratchDir dir;
  MakeStore(dir.Sub("db"), 40);
  std::vector<fs::path> ssts = FilesWithPrefixOrExt(dir.Sub("db"), "", ".sst");
  ASSERT_FALSE(ssts.empty());
  fs::resize_file(ssts[0], fs::file_size(ssts[0]) / 2);
  ExpectClearError(OpenAt(dir.Sub("db")), dir.Sub("db"), {StatusCode::kCorruption, StatusCode::kIOError});
}

TEST(CorruptionTest, GarbageManifest) {
  ScratchDir dir;
  MakeStore(dir.Sub("db"), 5);
  std::vector<fs::path> manifests = FilesWithPrefixOrExt(dir.Sub("db"), "MANIFEST-", "");
  ASSERT_FALSE(manifests.empty());
  for (const auto& m : manifests) Overwrite(m, 0, fs::file_size(m), 5);
  ExpectClearError(OpenAt(dir.Sub("db")), dir.Sub("db"),
                   {StatusCode::kCorruption, StatusCode::kIOError, StatusCode::kInvalidArgument});
}

TEST(CorruptionTest, TruncatedManifest) {
  ScratchDir dir;
  MakeStore(dir.Sub("db"), 5);
  std::vector<fs::path> manifests = FilesWithPrefixOrExt(dir.Sub("db"), "MANIFEST-", "");
  ASSERT_FALSE(manifests.empty());
  for (const auto& m : manifests) fs::resize_file(m, fs::file_size(m) / 3);
  Result<std::unique_ptr<GroupStore>> r = OpenAt(dir.Sub("db"));
  ExpectClearError(r, dir.Sub("db"),
                   {StatusCode::kCorruption, StatusCode::kIOError, StatusCode::kInvalidArgument,
                    StatusCode::kFailedPrecondition});
}

TEST(CorruptionTest, MissingCurrentFile) {
  ScratchDir dir;
  MakeStore(dir.Sub("db"), 5);
  fs::remove(dir.Sub("db") + "/CURRENT");
  ExpectClearError(OpenAt(dir.Sub("db")), dir.Sub("db"), {StatusCode::kFailedPrecondition});
}

}  // namespace
}  // namespace grove::replay
