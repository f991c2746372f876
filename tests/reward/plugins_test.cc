// One plug-in of each kind, loaded and scored end to end through the pool,
// and misbehaving plug-ins of the shared-library and external kinds contained.
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "reward/composite_verifier.h"
#include "reward/registry.h"
#include "reward/scoring_pool.h"

namespace grove::reward {
namespace {

const std::string kPluginDir = GROVE_TEST_PLUGIN_DIR;
const std::string kSourceDir = GROVE_TEST_SOURCE_DIR;

std::unique_ptr<ScoringPool> PoolFor(const VerifierRegistry& registry, const std::string& spec, int timeout_ms = 5000) {
  auto verifier = MakeCompositeVerifier(registry, *ParseVerifierSpec(spec));
  EXPECT_TRUE(verifier.ok()) << verifier.status();
  ScoringPoolOptions options;
  options.num_workers = 2;
  options.sample_timeout = std::chrono::milliseconds(timeout_ms);
  auto pool = ScoringPool::Start(std::shared_ptr<const Verifier>(std::move(*verifier)), options);
  EXPECT_TRUE(pool.ok()) << pool.status();
  return std::move(*pool);
}

// Kind (a): examples/verifiers/compiled_in/think_length_verifier.cc is linked
// into this test and registers itself.
TEST(CompiledInPlugin, RegistersItselfAndScores) {
  VerifierRegistry registry;
  ASSERT_TRUE(registry.Has("think_length"));
  auto pool = PoolFor(registry, "format:0.1,think_length:1");
  std::vector<VerifyInput> in = {
      {"", "<think>add the ones then the tens</think><answer>19</answer>", "{\"min_words\": 4}"},
      {"", "<think>hm</think><answer>19</answer>", "{\"min_words\": 4}"},
  };
  std::vector<VerifyOutput> out = pool->Score(in);
  EXPECT_NEAR(out[0].reward, 1.1, 1e-12);
  EXPECT_NEAR(out[1].reward, 0.1, 1e-12);
  EXPECT_NE(out[1].reason.find("thinking too short"), std::string::npos) << out[1].reason;
}

// Kind (b): the shipped example, built as a .so against verifier.h only.
TEST(SharedLibraryPlugin, LoadsByPathAndScores) {
  VerifierRegistry registry;
  Result<std::string> name = registry.LoadPlugin(kPluginDir + "/libcase_insensitive_verifier.so");
  ASSERT_TRUE(name.ok()) << name.status();
  EXPECT_EQ(*name, "case_insensitive");
  auto pool = PoolFor(registry, "case_insensitive");
  std::vector<VerifyInput> in = {
      {"", "<think>capital</think><answer> PARIS </answer>", "\"Paris\""},
      {"", "<think>capital</think><answer>Lyon</answer>", "\"Paris\""},
      {"", "<think><answer>Paris</answer></think>", "\"Paris\""},
  };
  std::vector<VerifyOutput> out = pool->Score(in);
  EXPECT_EQ(out[0].reward, 1.0);
  EXPECT_EQ(out[1].reward, 0.0);
  EXPECT_EQ(out[2].reward, 0.0);
  // Loading it twice is a name clash, not a crash.
  EXPECT_EQ(registry.LoadPlugin(kPluginDir + "/libcase_insensitive_verifier.so").status().code(),
            StatusCode::kAlreadyExists);
}

TEST(SharedLibraryPlugin, RefusesBadLibraries) {
  VerifierRegistry registry;
  Result<std::string> wrong_abi = registry.LoadPlugin(kPluginDir + "/libwrong_abi_verifier.so");
  EXPECT_EQ(wrong_abi.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(wrong_abi.status().message().find("ABI 9990"), std::string::npos) << wrong_abi.status();
  EXPECT_EQ(registry.LoadPlugin(kPluginDir + "/no_such.so").status().code(), StatusCode::kNotFound);
  // A library without the plug-in symbols (here: libc's soname).
  EXPECT_EQ(registry.LoadPlugin("libm.so.6").status().code(), StatusCode::kInvalidArgument);
}

TEST(SharedLibraryPlugin, SegfaultAndHangAreContained) {
  VerifierRegistry registry;
  ASSERT_TRUE(registry.LoadPlugin(kPluginDir + "/libmisbehaving_verifier.so").ok());
  // 1500 ms: a live sample on a loaded 2-core CI machine must never be charged a timeout.
  auto pool = PoolFor(registry, "misbehaving", 1500);
  std::vector<VerifyInput> in = {{"", "ok", ""}, {"", "segfault", ""}, {"", "hang", ""}, {"", "throw", ""},
                                 {"", "nan", ""}, {"", "ok", ""}};
  std::vector<VerifyOutput> out = pool->Score(in);
  EXPECT_EQ(out[0].reward, 1.0);
  EXPECT_EQ(out[1].reward, 0.0);
  EXPECT_NE(out[1].reason.find("crashed"), std::string::npos) << out[1].reason;
  EXPECT_EQ(out[2].reason, "verifier timed out after 1500 ms");
  // The composite catches the throw and the NaN in the worker itself.
  EXPECT_EQ(out[3].reason, "threw: plug-in gave up");
  EXPECT_EQ(out[4].reason, "non-finite reward");
  EXPECT_EQ(out[5].reward, 1.0);
}

ExternalVerifierOptions External(const std::string& command, int timeout_ms = 3000) {
  ExternalVerifierOptions options;
  options.command = command;
  options.timeout = std::chrono::milliseconds(timeout_ms);
  return options;
}

// Kind (c): the shipped Python example, standard library only.
TEST(ExternalPlugin, PythonExampleScoresEndToEnd) {
  VerifierRegistry registry;
  ASSERT_TRUE(registry
                  .RegisterExternal("answer_in_set",
                                    External("python3 " + kSourceDir + "/examples/verifiers/external/answer_in_set.py",
                                             /*timeout_ms=*/10000))
                  .ok());
  // Generous deadlines: python3's start alone took over 3 s on a loaded CI box.
  auto pool = PoolFor(registry, "format:0.1,answer_in_set:1", /*timeout_ms=*/15000);
  const std::string ref = R"({"accept": ["4", "four"]})";
  std::vector<VerifyInput> in = {
      {"2+2=", "<think>2+2</think><answer>Four</answer>", ref},
      {"2+2=", "<think>2+2</think><answer>5</answer>", ref},
      {"2+2=", "<think>\xff\xfe</think><answer>4</answer>", ref},  // invalid UTF-8 travels as U+FFFD
      {"2+2=", "<think>2+2</think><answer>4</answer>", "\"not an object\""},
  };
  for (int round = 0; round < 2; ++round) {  // the second round reuses the running programs
    std::vector<VerifyOutput> out = pool->Score(in);
    EXPECT_NEAR(out[0].reward, 1.1, 1e-12) << out[0].reason;
    EXPECT_NEAR(out[1].reward, 0.1, 1e-12) << out[1].reason;
    EXPECT_NEAR(out[2].reward, 1.1, 1e-12) << out[2].reason;
    EXPECT_NEAR(out[3].reward, 0.1, 1e-12) << out[3].reason;
    ASSERT_EQ(out[0].scores.size(), 3u);
    EXPECT_EQ(out[0].scores[2].name, "answer_in_set.answer_chars");
    EXPECT_EQ(out[0].scores[2].value, 4.0);
  }
}

TEST(ExternalPlugin, HangGarbageAndExitAreContained) {
  VerifierRegistry registry;
  // Reads requests and never answers.
  ASSERT_TRUE(registry.RegisterExternal("silent", External("cat > /dev/null", 300)).ok());
  // Answers every line with something that is not JSON.
  ASSERT_TRUE(registry.RegisterExternal("garbage", External("while read -r line; do echo 'not json'; done")).ok());
  // Exits at once.
  ASSERT_TRUE(registry.RegisterExternal("quitter", External("exit 3")).ok());
  // Answers with a NaN-like value the JSON parser refuses, then a good one.
  ASSERT_TRUE(registry.RegisterExternal("no_reward", External("while read -r line; do echo '{\"reason\":\"x\"}'; done")).ok());
  for (const char* name : {"silent", "garbage", "quitter", "no_reward"}) {
    auto pool = PoolFor(registry, name, 5000);
    std::vector<VerifyOutput> out = pool->Score(std::vector<VerifyInput>(3, VerifyInput{"", "x", "1"}));
    for (const VerifyOutput& o : out) {
      EXPECT_EQ(o.reward, 0.0) << name;
      EXPECT_EQ(o.reason.find("verifier timed out after 5000"), std::string::npos) << name << ": " << o.reason;
    }
    if (std::string(name) == "silent") {
      EXPECT_EQ(out[0].reason, "external verifier timed out after 300 ms");
    }
    if (std::string(name) == "garbage") {
      EXPECT_EQ(out[0].reason, "external verifier: reply is not a JSON object");
    }
    if (std::string(name) == "quitter") {
      EXPECT_NE(out[0].reason.find("exit status 3"), std::string::npos) << out[0].reason;
    }
    if (std::string(name) == "no_reward") {
      EXPECT_EQ(out[0].reason, "external verifier: reply has no numeric reward");
    }
  }
}

// All three kinds from one experiment file, as the verifier actor will read it.
TEST(ConfigureRegistry, LoadsPluginsAndExternalsFromConfig) {
  const std::string toml = "[reward]\nplugins = [\"" + kPluginDir + "/libcase_insensitive_verifier.so\"]\n" +
                           "[reward.verifiers]\ncase_insensitive = 1.0\nreply_one = 0.5\nformat = 0.1\n" +
                           "[reward.external.reply_one]\ncommand = \"while read -r l; do echo '{\\\"reward\\\": 1}'; done\"\n" +
                           "timeout_ms = 1000\n";
  Result<Config> config = Config::Parse(toml, "experiment.toml");
  ASSERT_TRUE(config.ok()) << config.status() << "\n" << toml;
  VerifierRegistry registry;
  ASSERT_TRUE(ConfigureRegistry(config->Section("reward"), &registry).ok());
  auto spec = VerifierSpecFromConfig(config->Section("reward.verifiers"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto verifier = MakeCompositeVerifier(registry, *spec);
  ASSERT_TRUE(verifier.ok()) << verifier.status();
  auto pool = ScoringPool::Start(std::shared_ptr<const Verifier>(std::move(*verifier)), ScoringPoolOptions{});
  ASSERT_TRUE(pool.ok());
  std::vector<VerifyOutput> out = (*pool)->Score(std::vector<VerifyInput>{{"", "<think>a</think><answer>Ok</answer>", "\"OK\""}});
  EXPECT_NEAR(out[0].reward, 1.6, 1e-12) << out[0].reason;

  Result<Config> bad = Config::Parse("[reward.external.x]\ncommand = \"true\"\ntimeout = 5\n");
  EXPECT_EQ(ConfigureRegistry(bad->Section("reward"), &registry).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::reward
