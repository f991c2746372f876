// Unit tests of the operating tools: log resolution for `grove logs`, the
// Prometheus rendering and the /metrics HTTP server.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>

#include "actors/latency_window.h"
#include "cluster/log_files.h"
#include "cluster/metrics_http.h"
#include "cluster/prometheus_text.h"
#include "cluster/status_view.h"
#include "tests/support/proc_util.h"
#include "tests/ops/http_get.h"
#include "tests/ops/prometheus_parse.h"

namespace grove {
namespace {

TEST(LogFiles, ResolvesIdsRolesAndShortForms) {
  const std::string dir = testing::MakeTempDir();
  std::filesystem::create_directories(dir + "/logs");
  for (const char* id : {"coordinator", "launcher", "learner-0", "rollout-0", "rollout-1",
                         "rollout-10", "verifier-0", "rolloutx-3"}) {
    std::ofstream(dir + "/logs/" + std::string(id) + ".log") << id << "\n";
  }
  std::ofstream(dir + "/logs/notes.txt") << "not a log\n";
  auto expect = [&](const std::string& spec, const std::string& id) {
    auto r = ResolveLogFile(dir, spec);
    ASSERT_TRUE(r.ok()) << spec << ": " << r.status();
    EXPECT_EQ(*r, dir + "/logs/" + id + ".log") << spec;
  };
  expect("learner", "learner-0");           // a bare role with one actor
  expect("verifier", "verifier-0");
  expect("coordinator", "coordinator");     // an exact id
  expect("launcher", "launcher");
  expect("rollout-1", "rollout-1");
  expect("rollout/1", "rollout-1");         // ROLE/N
  expect("rollout/10", "rollout-10");
  expect("rollout/rollout-0", "rollout-0"); // ROLE/ID
  expect("coordinator/coordinator", "coordinator");

  auto several = ResolveLogFile(dir, "rollout");  // rolloutx-3 is not a rollout
  ASSERT_FALSE(several.ok());
  EXPECT_EQ(several.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(several.status().message().find("rollout-0, rollout-1, rollout-10"), std::string::npos)
      << several.status();
  for (const char* unknown : {"rollout/7", "replay", "verifier/rollout-0", "notes", "rollout-"}) {
    auto r = ResolveLogFile(dir, unknown);
    ASSERT_FALSE(r.ok()) << unknown;
    EXPECT_EQ(r.status().code(), StatusCode::kNotFound) << unknown;
    EXPECT_NE(r.status().message().find("actors with logs: coordinator, launcher"),
              std::string::npos)
        << r.status();
  }
  for (const char* bad : {"", "rollout/", "/1", "a/b/c", "../etc/passwd"}) {
    auto r = ResolveLogFile(dir, bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(ListLogIds(dir + "/nowhere").size(), 0u);
  std::filesystem::remove_all(dir);
}

// A status object with random figures, shaped like `grove status --json`.
nlohmann::json RandomStatus(std::mt19937& rng) {
  std::uniform_real_distribution<double> real(-1e6, 1e6);
  std::uniform_int_distribution<int> small(0, 50);
  const char* states[] = {"starting", "healthy", "suspect", "dead", "draining", "stopped"};
  nlohmann::json cluster = {{"coordinator", "tcp://127.0.0.1:1"},
                            {"epoch", 1234567890123ull},
                            {"uptime_ms", small(rng) * 1000},
                            {"learner_step", small(rng)},
                            {"reward_mean", real(rng)},
                            {"actors_healthy", 2},
                            {"actors_dead", 1}};
  nlohmann::json actors = nlohmann::json::array();
  for (int i = 0; i < 3; ++i) {
    actors.push_back({{"role", i < 2 ? "rollout" : "verifier"},
                      {"id", i < 2 ? "rollout-" + std::to_string(i) : "ver\"ifier\\0\n"},
                      {"host", "h"},
                      {"pid", 100 + i},
                      {"state", states[i == 2 ? 3 : 1]},
                      {"heartbeat_age_ms", small(rng) * 10},
                      {"uptime_ms", small(rng) * 1000},
                      {"restarts", small(rng)},
                      {"policy_version", small(rng)},
                      {"rss_bytes", 1 << 20},
                      {"counters", {{"tokens/s", real(rng)}, {"served", small(rng)}}},
                      {"exit_reason", ""}});
  }
  return {{"cluster", cluster}, {"actors", actors}};
}

TEST(Prometheus, ExpositionParsesAndCarriesEveryFigure) {
  std::mt19937 rng(std::random_device{}());
  for (int round = 0; round < 20; ++round) {
    const nlohmann::json status = RandomStatus(rng);
    const std::string text = RenderPrometheus(status);
    auto samples = testing::ParseExposition(text);
    ASSERT_TRUE(samples.ok()) << samples.status() << "\n" << text;
    auto at = [&](const std::string& key) {
      auto it = samples->find(key);
      EXPECT_NE(it, samples->end()) << key << " missing in\n" << text;
      return it == samples->end() ? -12345.0 : it->second;
    };
    const auto& c = status["cluster"];
    EXPECT_DOUBLE_EQ(at("grove_cluster_learner_step"), c["learner_step"].get<double>());
    // %.17g round-trips a double exactly.
    EXPECT_EQ(at("grove_cluster_reward_mean"), c["reward_mean"].get<double>());
    EXPECT_DOUBLE_EQ(at("grove_coordinator_uptime_seconds"), c["uptime_ms"].get<double>() / 1000);
    EXPECT_EQ(at("grove_cluster_actors{state=\"healthy\"}"), 2);
    EXPECT_EQ(at("grove_cluster_actors{state=\"dead\"}"), 1);
    EXPECT_EQ(at("grove_cluster_actors{state=\"draining\"}"), 0);
    EXPECT_EQ(samples->count("grove_cluster_epoch"), 0u);  // an id, not a figure
    for (int i = 0; i < 2; ++i) {
      const auto& a = status["actors"][i];
      const std::string l = "{role=\"rollout\",id=\"rollout-" + std::to_string(i) + "\"}";
      EXPECT_EQ(at("grove_actor_restarts" + l), a["restarts"].get<double>());
      EXPECT_EQ(at("grove_actor_pid" + l), a["pid"].get<double>());
      EXPECT_EQ(at("grove_actor_policy_version" + l), a["policy_version"].get<double>());
      EXPECT_EQ(at("grove_actor_rss_bytes" + l), 1 << 20);
      EXPECT_DOUBLE_EQ(at("grove_actor_heartbeat_age_seconds" + l),
                       a["heartbeat_age_ms"].get<double>() / 1000);
      EXPECT_EQ(at("grove_rollout_tokens_s" + l), a["counters"]["tokens/s"].get<double>());
      EXPECT_EQ(at("grove_rollout_served" + l), a["counters"]["served"].get<double>());
      EXPECT_EQ(at("grove_actor_state{role=\"rollout\",id=\"rollout-" + std::to_string(i) +
                   "\",state=\"healthy\"}"),
                1);
      EXPECT_EQ(at("grove_actor_state{role=\"rollout\",id=\"rollout-" + std::to_string(i) +
                   "\",state=\"dead\"}"),
                0);
    }
    // The odd id is escaped, and the dead verifier shows as dead.
    EXPECT_EQ(at("grove_actor_state{role=\"verifier\",id=\"ver\\\"ifier\\\\0\\n\",state=\"dead\"}"),
              1);
    // One HELP and TYPE per metric name, before its samples.
    EXPECT_EQ(text.find("# TYPE grove_actor_restarts gauge"),
              text.rfind("# TYPE grove_actor_restarts gauge"));
    EXPECT_LT(text.find("# TYPE grove_actor_restarts gauge"), text.find("grove_actor_restarts{"));
  }
  EXPECT_EQ(PrometheusName("9lives.per-s"), "_9lives_per_s");
  // Short where that is exact, every bit where it is not.
  const std::string text = RenderPrometheus(
      {{"cluster", {{"a", 0.1}, {"b", 1.0 / 3}, {"c", 1e300}, {"d", -0.0}, {"e", 42}}}});
  EXPECT_NE(text.find("grove_cluster_a 0.1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("grove_cluster_b 0.33333333333333331\n"), std::string::npos) << text;
  EXPECT_NE(text.find("grove_cluster_c 1e+300\n"), std::string::npos) << text;
  EXPECT_NE(text.find("grove_cluster_e 42\n"), std::string::npos) << text;
  // An empty status still renders valid text.
  EXPECT_TRUE(testing::ParseExposition(RenderPrometheus(nlohmann::json::object())).ok());
}

// Quantiles of the latest `capacity` values against a sort of exactly those
// values; count and sum over every value ever added.
TEST(LatencyWindow, QuantilesOfTheRecentWindowAgainstASort) {
  std::mt19937 rng(std::random_device{}());
  std::lognormal_distribution<double> latency(2.0, 1.0);
  for (size_t capacity : {1u, 7u, 64u, 1024u}) {
    actors::LatencyWindow w(capacity);
    EXPECT_EQ(w.Quantile(0.5), 0);  // empty
    std::vector<double> all;
    double sum = 0;
    const int n = static_cast<int>(capacity) * 3 + 5;
    for (int i = 0; i < n; ++i) {
      const double v = latency(rng);
      w.Add(v);
      all.push_back(v);
      sum += v;
    }
    std::vector<double> recent(all.end() - static_cast<std::ptrdiff_t>(capacity), all.end());
    std::sort(recent.begin(), recent.end());
    for (double q : {0.0, 0.01, 0.5, 0.9, 0.99, 1.0}) {
      // Nearest rank: the smallest value with at least q of the window at or below it.
      size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(recent.size())));
      rank = std::max<size_t>(rank, 1) - 1;
      EXPECT_EQ(w.Quantile(q), recent[rank]) << "capacity " << capacity << " q " << q;
    }
    EXPECT_EQ(w.window_size(), capacity);
    EXPECT_EQ(w.count(), static_cast<uint64_t>(n));
    EXPECT_NEAR(w.sum_ms(), sum, 1e-9 * sum);
  }
  actors::LatencyWindow w(4);
  w.Add(-3);  // a clock step between hosts
  w.Add(std::nan(""));
  EXPECT_EQ(w.Quantile(1.0), 0);
  EXPECT_EQ(w.sum_ms(), 0);
  EXPECT_EQ(w.count(), 2u);
}

TEST(LatencyWindow, CounterNamesTakeApartAsPublishWritesThem) {
  using Kind = actors::LatencyCounter::Kind;
  auto q = actors::ParseLatencyCounter("reward_latency_p99_ms");
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(q->kind, Kind::kQuantile);
  EXPECT_EQ(q->base, "reward_latency");
  EXPECT_EQ(q->digits, "99");
  auto c = actors::ParseLatencyCounter("reward_latency_count");
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->kind, Kind::kCount);
  EXPECT_EQ(c->base, "reward_latency");
  auto sum = actors::ParseLatencyCounter("a_b_sum_ms");
  ASSERT_TRUE(sum.has_value());
  EXPECT_EQ(sum->kind, Kind::kSum);
  EXPECT_EQ(sum->base, "a_b");
  for (const char* other : {"weight_sync_ms", "odd_pxx_ms", "_p50_ms", "p50_ms", "x_p_ms", "tokens_per_s", "_count"}) {
    EXPECT_FALSE(actors::ParseLatencyCounter(other).has_value()) << other;
  }
}

// Latency counters become a Prometheus summary in seconds (quantiles, _sum,
// _count in one block) and one p50/p99 item in the status table.
TEST(Prometheus, LatencyWindowsRenderAsASummaryAndOneTableItem) {
  nlohmann::json counters = {{"groups_scored", 12},
                             {"reward_latency_p50_ms", 3.5},
                             {"reward_latency_p99_ms", 41.25},
                             {"reward_latency_count", 12},
                             {"reward_latency_sum_ms", 96.5},
                             {"rollout_to_scored_p50_ms", 250},
                             {"rollout_to_scored_p99_ms", 900},
                             {"rollout_to_scored_count", 12},
                             {"rollout_to_scored_sum_ms", 4000},
                             {"odd_pxx_ms", 1}};
  nlohmann::json status = {
      {"cluster", {{"uptime_ms", 1000}}},
      {"actors", {{{"role", "verifier"}, {"id", "verifier-0"}, {"state", "healthy"}, {"counters", counters}}}}};
  const std::string text = RenderPrometheus(status);
  auto samples = testing::ParseExposition(text);
  ASSERT_TRUE(samples.ok()) << samples.status() << "\n" << text;
  const std::string l = "role=\"verifier\",id=\"verifier-0\"";
  auto at = [&](const std::string& key) {
    auto it = samples->find(key);
    EXPECT_NE(it, samples->end()) << key << " missing in\n" << text;
    return it == samples->end() ? -12345.0 : it->second;
  };
  EXPECT_DOUBLE_EQ(at("grove_verifier_reward_latency_seconds{" + l + ",quantile=\"0.5\"}"), 0.0035);
  EXPECT_DOUBLE_EQ(at("grove_verifier_reward_latency_seconds{" + l + ",quantile=\"0.99\"}"), 0.04125);
  EXPECT_DOUBLE_EQ(at("grove_verifier_reward_latency_seconds_sum{" + l + "}"), 0.0965);
  EXPECT_EQ(at("grove_verifier_reward_latency_seconds_count{" + l + "}"), 12);
  EXPECT_DOUBLE_EQ(at("grove_verifier_rollout_to_scored_seconds{" + l + ",quantile=\"0.99\"}"), 0.9);
  // The raw counters stay, as gauges, like every other counter.
  EXPECT_EQ(at("grove_verifier_reward_latency_p99_ms{" + l + "}"), 41.25);
  EXPECT_EQ(samples->count("grove_verifier_odd_seconds{" + l + ",quantile=\"0.xx\"}"), 0u);
  // One block per summary: TYPE once, then quantiles, _sum and _count together.
  const auto type = text.find("# TYPE grove_verifier_reward_latency_seconds summary\n");
  ASSERT_NE(type, std::string::npos) << text;
  EXPECT_EQ(type, text.rfind("# TYPE grove_verifier_reward_latency_seconds summary\n"));
  const auto next = text.find("# HELP", type);
  for (const char* sample : {"grove_verifier_reward_latency_seconds{", "grove_verifier_reward_latency_seconds_sum{",
                             "grove_verifier_reward_latency_seconds_count{"}) {
    const auto at_sample = text.find(sample);
    EXPECT_GT(at_sample, type) << sample;
    EXPECT_LT(at_sample, next) << sample;
  }

  const std::string table = RenderStatusTable(status);
  EXPECT_NE(table.find("reward_latency=3.5/41.25ms"), std::string::npos) << table;
  EXPECT_NE(table.find("rollout_to_scored=250/900ms"), std::string::npos) << table;
  EXPECT_NE(table.find("groups_scored=12"), std::string::npos) << table;
  EXPECT_EQ(table.find("reward_latency_p99_ms"), std::string::npos) << table;
  EXPECT_EQ(table.find("reward_latency_count"), std::string::npos) << table;
}

TEST(MetricsServer, ServesMetricsAndRefusesTheRest) {
  int calls = 0;
  bool fail = false;
  MetricsServer server([&]() -> Result<std::string> {
    ++calls;
    if (fail) return Status::Unavailable("coordinator not answering");
    return std::string("grove_x 1\n");
  });
  auto address = server.Start("127.0.0.1:0");
  ASSERT_TRUE(address.ok()) << address.status();
  EXPECT_EQ(address->rfind("127.0.0.1:", 0), 0u);
  EXPECT_NE(*address, "127.0.0.1:0");

  std::string r = testing::HttpGet(*address + "/metrics");
  EXPECT_EQ(testing::HttpCode(r), 200) << r;
  EXPECT_EQ(testing::HttpBody(r), "grove_x 1\n");
  EXPECT_NE(r.find("Content-Type: text/plain; version=0.0.4"), std::string::npos) << r;
  EXPECT_NE(r.find("Content-Length: 10\r\n"), std::string::npos) << r;
  EXPECT_EQ(testing::HttpCode(testing::HttpGet(*address + "/metrics?x=1")), 200);
  EXPECT_EQ(testing::HttpCode(testing::HttpGet(*address + "/nothing")), 404);
  EXPECT_EQ(testing::HttpCode(testing::HttpGet(*address + "/metrics", "POST")), 405);
  EXPECT_EQ(calls, 2);
  fail = true;
  r = testing::HttpGet(*address + "/metrics");
  EXPECT_EQ(testing::HttpCode(r), 503);
  EXPECT_NE(testing::HttpBody(r).find("coordinator not answering"), std::string::npos) << r;
  EXPECT_EQ(server.requests_served(), 2u);

  // A second server cannot take the same port; bad addresses fail clearly.
  MetricsServer other([] { return Result<std::string>(std::string()); });
  EXPECT_EQ(other.Start(*address).status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(other.Start("127.0.0.1").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(other.Start("127.0.0.1:99999").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(other.Start("no-such-host.invalid:0").status().code(), StatusCode::kInvalidArgument);
  server.Stop();
  EXPECT_EQ(testing::HttpGet(*address + "/metrics"), "");  // closed
}

}  // namespace
}  // namespace grove
