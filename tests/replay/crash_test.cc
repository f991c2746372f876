// Crash test in the manner of RocksDB's db_stress: a writer process
// (replay_crash_writer) inserts groups as fast as it can and marks batches
// consumed, reporting every acknowledgement over a pipe; this test kill -9s it
// at random moments, several rounds, alternating sync modes, and after each
// round checks that every acknowledged group is stored exactly once with its
// content, and that the learner's cursor is where the writer last saw it (or
// one mark further, if the kill came between a durable mark and its report).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "replay/group_store.h"
#include "tests/replay/crash_payload.h"
#include "tests/replay/scratch_dir.h"
#include "tests/replay/sync_journal_fs.h"

namespace grove::replay {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct RoundReport {
  std::vector<std::string> acked;
  bool have_cursor = false;
  DataCursor cursor;
  int exit_signal = 0;
  std::string stderr_tail;
};

std::string WriterPath() {
  return (fs::read_symlink("/proc/self/exe").parent_path() / "replay_crash_writer").string();
}

void ParseLine(const std::string& line, RoundReport* report) {
  if (line.size() > 2 && line[0] == 'A') {
    report->acked.push_back(line.substr(2));
  } else if (line.size() > 2 && line[0] == 'C') {
    std::istringstream in(line.substr(2));
    DataCursor c;
    in >> c.learner_version >> c.consumed;
    report->cursor = c;
    report->have_cursor = true;
  } else {
    ADD_FAILURE() << "unexpected line from writer: " << line;
  }
}

// Runs one writer round and kill -9s it `kill_after` after its first ack.
RoundReport RunRound(const std::string& db, const std::string& mode, int round, std::chrono::milliseconds kill_after,
                     const std::string& journal) {
  int out_pipe[2], err_pipe[2];
  EXPECT_EQ(pipe(out_pipe), 0);
  EXPECT_EQ(pipe(err_pipe), 0);
  const std::string writer = WriterPath();
  std::vector<std::string> args = {writer, "--db=" + db, "--sync_mode=" + mode, "--round=" + std::to_string(round)};
  if (!journal.empty()) args.push_back("--sync_journal=" + journal);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    close(out_pipe[0]);
    close(err_pipe[0]);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(writer.c_str(), argv.data());
    _exit(127);
  }
  close(out_pipe[1]);
  close(err_pipe[1]);
  fcntl(err_pipe[0], F_SETFL, O_NONBLOCK);
  RoundReport report;
  std::string buffer;
  std::optional<Clock::time_point> kill_at;
  const auto give_up = Clock::now() + std::chrono::seconds(20);
  bool killed = false;
  char chunk[65536];
  while (true) {
    if (!killed && ((kill_at && Clock::now() >= *kill_at) || Clock::now() > give_up)) {
      kill(pid, SIGKILL);
      killed = true;
    }
    // Short reads with a poll-like wait: the pipe is drained to EOF after the kill.
    fd_set fds;
    FD_ZERO(&fds);
    FD_SET(out_pipe[0], &fds);
    timeval tv{0, 2000};
    if (select(out_pipe[0] + 1, &fds, nullptr, nullptr, &tv) <= 0) continue;
    ssize_t n = read(out_pipe[0], chunk, sizeof(chunk));
    if (n <= 0) break;  // EOF: the writer is dead and everything it wrote is read
    buffer.append(chunk, static_cast<size_t>(n));
    size_t start = 0, end;
    while ((end = buffer.find('\n', start)) != std::string::npos) {
      ParseLine(buffer.substr(start, end - start), &report);
      start = end + 1;
    }
    buffer.erase(0, start);
    if (!kill_at && !report.acked.empty()) kill_at = Clock::now() + kill_after;
  }
  // A partial last line was cut by the kill mid-write: not an acknowledgement.
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) report.exit_signal = WTERMSIG(status);
  ssize_t n;
  while ((n = read(err_pipe[0], chunk, sizeof(chunk))) > 0) report.stderr_tail.append(chunk, static_cast<size_t>(n));
  close(out_pipe[0]);
  close(err_pipe[0]);
  return report;
}

// Runs `rounds` kill -9 rounds against one store. With lose_unsynced, every
// WAL is also cut back to its last fsync'd length after each kill, as a
// machine crash that loses the page cache would leave it.
void RunRounds(int rounds, bool lose_unsynced) {
  ASSERT_TRUE(fs::exists(WriterPath())) << WriterPath();
  testing::ScratchDir dir;
  const std::string db = dir.Sub("db");
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::set<std::string> all_acked;
  constexpr int kThreads = 4;  // the writer's default
  DataCursor last_cursor;
  uint64_t cut_total = 0;
  for (int round = 0; round < rounds; ++round) {
    const std::string mode = round % 2 == 0 ? "group_commit" : "per_write";
    const auto kill_after = std::chrono::milliseconds(50 + rng() % 700);
    const std::string journal = lose_unsynced ? dir.Sub("journal" + std::to_string(round)) : "";
    RoundReport r = RunRound(db, mode, round, kill_after, journal);
    ASSERT_EQ(r.exit_signal, SIGKILL) << "writer died on its own in round " << round << ": " << r.stderr_tail;
    ASSERT_FALSE(r.acked.empty()) << r.stderr_tail;
    all_acked.insert(r.acked.begin(), r.acked.end());
    if (lose_unsynced) cut_total += testing::TruncateWalsToSynced(db, journal);

    GroupStoreOptions o;
    o.path = db;
    Result<std::unique_ptr<GroupStore>> opened = GroupStore::Open(o);  // verifies every record and the index
    ASSERT_TRUE(opened.ok()) << "round " << round << ": " << opened.status();
    GroupStore& store = **opened;

    // Every acknowledged group is present, with its content. The open above
    // proved samples and id index one-to-one, so present means exactly once.
    std::vector<SampleKey> keys;
    std::vector<std::string> ids(all_acked.begin(), all_acked.end());
    for (const std::string& id : ids) {
      Result<std::optional<SampleKey>> key = store.Find(id);
      ASSERT_TRUE(key.ok()) << key.status();
      ASSERT_TRUE(key->has_value()) << "acknowledged group " << id << " lost in round " << round;
      EXPECT_EQ((*key)->policy_version, CrashGroupVersion(id));
      keys.push_back(**key);
    }
    Result<std::vector<GroupRecord>> records = store.Read(keys);
    ASSERT_TRUE(records.ok()) << records.status();
    for (size_t i = 0; i < ids.size(); ++i) {
      ASSERT_EQ((*records)[i].group_id, ids[i]);
      ASSERT_EQ((*records)[i].payload, CrashPayload(ids[i])) << ids[i];
    }
    // Stored once each: the store holds at most the acked groups plus the
    // inserts in flight at each kill (one per writer thread per round; a
    // group-commit batch may have been durable without being reported).
    const StoreCounters c = store.Counters();
    EXPECT_GE(c.stored, all_acked.size());
    if (!lose_unsynced) {  // otherwise unacknowledged ones may be lost, and their resends stored later
      EXPECT_LE(c.stored, all_acked.size() + uint64_t{kThreads} * (round + 1)) << "round " << round;
    }

    // The cursor: where the writer last saw it, or exactly one mark further.
    if (r.have_cursor) last_cursor = r.cursor;
    DataCursor cursor = store.Cursor("learner").value();
    const bool same = cursor.learner_version == last_cursor.learner_version && cursor.consumed == last_cursor.consumed;
    const bool one_more = cursor.learner_version == last_cursor.learner_version + 1 &&
                          cursor.consumed > last_cursor.consumed && cursor.consumed <= last_cursor.consumed + 16;
    EXPECT_TRUE(same || one_more) << "round " << round << ": cursor (" << cursor.learner_version << ", "
                                  << cursor.consumed << ") vs last reported (" << last_cursor.learner_version
                                  << ", " << last_cursor.consumed << ")";
    // Marks and cursor move in one WriteBatch: one consumer, so they agree.
    EXPECT_EQ(c.consumed, cursor.consumed) << "round " << round;
    last_cursor = cursor;
    uint64_t unsettled = 0;
    ASSERT_TRUE(store.ForEachUnsettled([&](const UnsettledGroup&) { ++unsettled; }).ok());
    EXPECT_EQ(unsettled + c.consumed, c.stored) << "round " << round;
    printf("round %d (%s%s): %zu acked this round, %zu in all, stored %lu, cursor (%ld, %lu)\n", round,
           mode.c_str(), lose_unsynced ? ", unsynced WAL lost" : "", r.acked.size(), all_acked.size(),
           static_cast<unsigned long>(c.stored), static_cast<long>(cursor.learner_version),
           static_cast<unsigned long>(cursor.consumed));
  }
  if (lose_unsynced) printf("unsynced WAL bytes cut over all rounds: %lu\n", static_cast<unsigned long>(cut_total));
}

TEST(ReplayCrashTest, AcknowledgedGroupsSurviveKill9ExactlyOnce) { RunRounds(8, /*lose_unsynced=*/false); }

TEST(ReplayCrashTest, AcknowledgedGroupsSurviveLosingUnsyncedWal) { RunRounds(6, /*lose_unsynced=*/true); }

}  // namespace
}  // namespace grove::replay
