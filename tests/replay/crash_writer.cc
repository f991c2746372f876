// Test-only writer for replay_crash_test: inserts groups into a ReplayService
// as fast as it can from several threads while one consumer thread serves and
// marks batches, and reports every acknowledgement on stdout, one line each,
// written only after the call returned OK:
//   A <group id>                       the group is durably stored
//   C <learner version> <consumed>     the consumer's cursor after a durable mark
// The parent kill -9s this process at random moments and checks the store.
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "replay/replay_service.h"
#include "tests/replay/crash_payload.h"
#include "tests/replay/sync_journal_fs.h"

DEFINE_string(db, "", "replay store directory");
DEFINE_string(sync_mode, "group_commit", "per_write or group_commit");
DEFINE_int32(round, 0, "round number; ids are r<round>-t<thread>-<n>");
DEFINE_int32(threads, 4, "inserting threads");
DEFINE_int32(resend, 20, "ids of the previous round each thread sends again first");
DEFINE_string(sync_journal, "", "if set, journal every WAL fsync here (see sync_journal_fs.h)");

namespace {

std::mutex out_mu;

void Report(const std::string& line) {
  std::lock_guard<std::mutex> lock(out_mu);
  std::string s = line + "\n";
  const char* p = s.data();
  size_t left = s.size();
  while (left > 0) {
    ssize_t n = ::write(1, p, left);
    if (n <= 0) _exit(3);  // the parent is gone
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  FLAGS_logtostderr = true;
  FLAGS_minloglevel = 1;
  google::InitGoogleLogging(argv[0]);
  using namespace grove::replay;
  ReplayOptions options;
  options.store.path = FLAGS_db;
  auto mode = ParseSyncMode(FLAGS_sync_mode);
  if (!mode.ok()) {
    fprintf(stderr, "%s\n", mode.status().ToString().c_str());
    return 2;
  }
  options.store.sync_mode = *mode;
  options.max_unconsumed = 1 << 20;
  std::shared_ptr<grove::replay::testing::SyncJournalFileSystem> journal_fs;
  std::unique_ptr<rocksdb::Env> journal_env;
  if (!FLAGS_sync_journal.empty()) {
    journal_fs = std::make_shared<grove::replay::testing::SyncJournalFileSystem>(rocksdb::FileSystem::Default(),
                                                                                FLAGS_sync_journal);
    if (!journal_fs->ok()) return 2;
    journal_env = rocksdb::NewCompositeEnv(journal_fs);
    options.store.env = journal_env.get();
  }
  auto opened = ReplayService::Open(options);
  if (!opened.ok()) {
    fprintf(stderr, "open: %s\n", opened.status().ToString().c_str());
    return 2;
  }
  ReplayService& replay = **opened;
  auto cursor = replay.Cursor("learner");
  if (!cursor.ok()) return 2;
  int64_t learner_version = std::max<int64_t>(cursor->learner_version, 0);

  std::vector<std::thread> threads;
  for (int t = 0; t < FLAGS_threads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::string> ids;
      if (FLAGS_round > 0) {
        for (int n = 0; n < FLAGS_resend; ++n) ids.push_back(CrashGroupId(FLAGS_round - 1, t, n));
      }
      for (int n = 0;; ++n) {
        const std::string id = n < static_cast<int>(ids.size()) ? ids[n] : CrashGroupId(FLAGS_round, t, n);
        GroupRecord r{id, CrashGroupVersion(id), CrashPayload(id), 0};
        auto result = replay.Insert(r);
        if (!result.ok()) {
          fprintf(stderr, "insert %s: %s\n", id.c_str(), result.status().ToString().c_str());
          _exit(4);
        }
        if (*result != InsertOutcome::kBelowRetentionFloor) Report("A " + id);
      }
    });
  }
  // The consumer: serve, "train", mark, report the durable cursor.
  while (true) {
    auto batch = replay.SampleBatch(16, learner_version, int64_t{1} << 40, "learner");
    if (!batch.ok()) _exit(5);
    if (batch->groups.empty()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      continue;
    }
    std::vector<std::string> ids;
    for (const auto& g : batch->groups) {
      if (g.payload != CrashPayload(g.group_id)) {
        fprintf(stderr, "payload of %s differs\n", g.group_id.c_str());
        _exit(6);
      }
      ids.push_back(g.group_id);
    }
    ++learner_version;
    auto marked = replay.MarkConsumed(ids, learner_version, "learner");
    if (!marked.ok()) _exit(7);
    auto c = replay.Cursor("learner");
    if (!c.ok()) _exit(8);
    Report("C " + std::to_string(c->learner_version) + " " + std::to_string(c->consumed));
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}
