// The scoring pool: results in order, and a verifier that throws, crashes,
// hangs, exhausts memory or returns NaN costs only its own sample.
#include <unistd.h>

#include <csignal>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "reward/scoring_pool.h"

namespace grove::reward {
namespace {

// Behaves according to the completion: a number n scores n; "segv", "hang",
// "throw", "nan", "oom" misbehave.
class Scripted final : public Verifier {
 public:
  VerifyOutput Verify(const VerifyInput& in) const override {
    if (in.completion == "segv") std::raise(SIGSEGV);
    if (in.completion == "abort") std::abort();
    if (in.completion == "hang") {
      while (true) pause();
    }
    if (in.completion == "throw") throw std::runtime_error("scripted failure");
    if (in.completion == "nan") return VerifyOutput::Make(std::numeric_limits<double>::quiet_NaN(), "nan");
    if (in.completion == "oom") {
      std::vector<std::vector<char>> hog;
      for (int i = 0; i < 64; ++i) hog.emplace_back(size_t{1} << 30, 'x');  // 64 GiB, far over the limit
      return VerifyOutput::Make(1.0, "allocated");
    }
    VerifyOutput out = VerifyOutput::Make(std::stod(std::string(in.completion)), "value");
    out.scores.push_back({"length", static_cast<double>(in.prompt.size())});
    return out;
  }
};

std::unique_ptr<ScoringPool> StartPool(int workers, int timeout_ms) {
  ScoringPoolOptions options;
  options.num_workers = workers;
  options.sample_timeout = std::chrono::milliseconds(timeout_ms);
  options.memory_limit_bytes = size_t{1} << 30;
  auto pool = ScoringPool::Start(std::make_shared<Scripted>(), options);
  EXPECT_TRUE(pool.ok()) << pool.status();
  return std::move(*pool);
}

std::vector<VerifyInput> Inputs(const std::vector<std::string>& completions, const std::string& prompt = "pp") {
  std::vector<VerifyInput> in;
  for (const std::string& c : completions) in.push_back(VerifyInput{prompt, c, ""});
  return in;
}

TEST(ScoringPool, ResultsComeBackInInputOrder) {
  for (int workers : {1, 2, 3}) {
    auto pool = StartPool(workers, 5000);
    SCOPED_TRACE(workers);
    std::vector<std::string> completions;
    for (int i = 0; i < 200; ++i) completions.push_back(std::to_string(i * 0.25));
    std::vector<VerifyOutput> out = pool->Score(Inputs(completions));
    ASSERT_EQ(out.size(), completions.size());
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_EQ(out[i].reward, static_cast<double>(i) * 0.25);
      ASSERT_EQ(out[i].scores.size(), 1u);
      EXPECT_EQ(out[i].scores[0].value, 2.0);
    }
    EXPECT_EQ(pool->stats().failed, 0u);
  }
}

TEST(ScoringPool, MisbehaviourCostsOnlyThatSample) {
  auto pool = StartPool(2, 1500);  // generous: live samples must never time out under load
  std::vector<std::string> completions = {"1", "segv", "2", "hang", "3", "throw", "4", "nan", "5", "oom", "6", "abort", "7"};
  std::vector<VerifyOutput> out = pool->Score(Inputs(completions));
  ASSERT_EQ(out.size(), completions.size());
  for (size_t i = 0; i < out.size(); i += 2) EXPECT_EQ(out[i].reward, static_cast<double>(i / 2 + 1)) << i;
  for (size_t i = 1; i < out.size(); i += 2) EXPECT_EQ(out[i].reward, 0.0) << completions[i];
  EXPECT_NE(out[1].reason.find("crashed (signal 11"), std::string::npos) << out[1].reason;
  EXPECT_EQ(out[3].reason, "verifier timed out after 1500 ms");
  EXPECT_NE(out[5].reason.find("verifier threw: scripted failure"), std::string::npos) << out[5].reason;
  EXPECT_EQ(out[7].reason, "verifier returned a non-finite reward");
  EXPECT_NE(out[9].reason.find("bad_alloc"), std::string::npos) << out[9].reason;  // memory limit held
  EXPECT_NE(out[11].reason.find("crashed (signal 6"), std::string::npos) << out[11].reason;
  EXPECT_EQ(pool->stats().failed, 6u);

  // The pool is whole again afterwards; dead workers are re-created when
  // next needed (a batch larger than one pipeline needs both): one each for
  // segv, hang and abort.
  std::vector<std::string> more;
  for (int i = 0; i < 20; ++i) more.push_back(std::to_string(i));
  out = pool->Score(Inputs(more));
  for (int i = 0; i < 20; ++i) EXPECT_EQ(out[static_cast<size_t>(i)].reward, i);
  EXPECT_EQ(pool->stats().restarts, 3u);
}

// Samples queued behind one that hangs or crashes did not run; they are
// re-sent to a live worker and score normally, at any pipeline depth.
TEST(ScoringPool, SamplesBehindAFailureAreNotCharged) {
  for (int depth : {1, 2, 8}) {
    SCOPED_TRACE(depth);
    ScoringPoolOptions options;
    options.num_workers = 2;
    options.pipeline_depth = depth;
    // Generous: on a loaded 2-core machine a re-created worker can take a few
    // hundred ms to answer, and a live sample must never be charged a timeout.
    options.sample_timeout = std::chrono::milliseconds(1500);
    auto pool = ScoringPool::Start(std::make_shared<Scripted>(), options);
    ASSERT_TRUE(pool.ok());
    std::vector<std::string> completions = {"hang", "1", "2", "3", "segv", "4", "5", "6", "7", "hang", "8"};
    std::vector<VerifyOutput> out = (*pool)->Score(Inputs(completions));
    for (size_t i = 0; i < completions.size(); ++i) {
      if (completions[i] == "hang" || completions[i] == "segv") {
        EXPECT_EQ(out[i].reward, 0.0) << i;
      } else {
        EXPECT_EQ(out[i].reward, std::stod(completions[i])) << i << ": " << out[i].reason;
      }
    }
    EXPECT_EQ((*pool)->stats().failed, 3u);
  }
}

TEST(ScoringPool, EmptyBatchAndRecreatedWorker) {
  auto pool = StartPool(1, 5000);
  EXPECT_TRUE(pool->Score({}).empty());
  EXPECT_EQ(pool->Score(Inputs({"1"}))[0].reward, 1.0);
  std::vector<VerifyOutput> out = pool->Score(Inputs({"segv"}));
  EXPECT_EQ(out[0].reward, 0.0);
  out = pool->Score(Inputs({"2", "3"}));
  EXPECT_EQ(out[0].reward, 2.0);
  EXPECT_EQ(out[1].reward, 3.0);
}

TEST(ScoringPool, LargeSamplesTravelIntact) {
  auto pool = StartPool(2, 5000);
  std::string big_prompt(12 << 20, 'p');
  std::vector<VerifyOutput> out = pool->Score(Inputs({"1", "2"}, big_prompt));
  EXPECT_EQ(out[0].scores[0].value, static_cast<double>(big_prompt.size()));
  EXPECT_EQ(out[1].reward, 2.0);
}

// A large sample queued behind a hanging one must not block the pool in
// send() past the time limit.
TEST(ScoringPool, LargeSampleBehindAHangDoesNotStall) {
  ScoringPoolOptions options;
  options.num_workers = 1;
  options.pipeline_depth = 8;
  options.sample_timeout = std::chrono::milliseconds(1500);
  auto pool = ScoringPool::Start(std::make_shared<Scripted>(), options);
  ASSERT_TRUE(pool.ok());
  std::string big(8 << 20, 'p');
  std::vector<VerifyInput> in = {{"", "hang", ""}, {big, "1", ""}, {"", "2", ""}, {big, "3", ""}};
  std::vector<VerifyOutput> out = (*pool)->Score(in);
  EXPECT_EQ(out[0].reason, "verifier timed out after 1500 ms");
  EXPECT_EQ(out[1].reward, 1.0);
  EXPECT_EQ(out[1].scores[0].value, static_cast<double>(big.size()));
  EXPECT_EQ(out[2].reward, 2.0);
  EXPECT_EQ(out[3].reward, 3.0);
}

TEST(ScoringPool, RejectsBadOptions) {
  ScoringPoolOptions options;
  options.num_workers = 0;
  EXPECT_FALSE(ScoringPool::Start(std::make_shared<Scripted>(), options).ok());
  options.num_workers = 1;
  options.pipeline_depth = 0;
  EXPECT_FALSE(ScoringPool::Start(std::make_shared<Scripted>(), options).ok());
  options.pipeline_depth = 4;
  options.num_workers = 1;
  EXPECT_FALSE(ScoringPool::Start(nullptr, options).ok());
}

}  // namespace
}  // namespace grove::reward
