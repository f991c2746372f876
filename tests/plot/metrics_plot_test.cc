#include "cluster/metrics_plot.h"

#include <filesystem>
#include <fstream>
#include <regex>

#include <gtest/gtest.h>

namespace grove::cluster {
namespace {

std::string WriteFile(const std::string& name, const std::string& text) {
  std::string path = (std::filesystem::temp_directory_path() / name).string();
  std::ofstream(path) << text;
  return path;
}

TEST(MetricsPlot, OnePolylinePerSeriesWithAllPoints) {
  std::string path = WriteFile("grove_plot_ok.jsonl",
                               "{\"step\":1,\"reward_mean\":0.1,\"kl\":0.0}\n"
                               "{\"step\":2,\"reward_mean\":0.3,\"kl\":0.01,\"eval_accuracy\":0.4}\n"
                               "not json at all\n"
                               "{\"step\":3,\"reward_mean\":0.6,\"kl\":0.02}\n"
                               "{\"step\":4,\"reward_m");  // torn last line
  Result<std::string> svg = RenderMetricsSvg(path, DefaultPlotSeries());
  ASSERT_TRUE(svg.ok()) << svg.status();
  std::regex poly("<polyline[^>]*points=\"([^\"]*)\"");
  std::vector<size_t> counts;
  for (auto it = std::sregex_iterator(svg->begin(), svg->end(), poly); it != std::sregex_iterator(); ++it) {
    std::string pts = (*it)[1];
    counts.push_back(std::count(pts.begin(), pts.end(), ','));
  }
  // reward: 3 points, accuracy: 1, kl: 3 (order of DefaultPlotSeries).
  ASSERT_EQ(counts.size(), 3u);
  EXPECT_EQ(counts[0], 3u);
  EXPECT_EQ(counts[1], 1u);
  EXPECT_EQ(counts[2], 3u);
}

TEST(MetricsPlot, RisingSeriesGoesUpOnScreen) {
  std::string path = WriteFile("grove_plot_rise.jsonl",
                               "{\"step\":0,\"reward_mean\":0}\n{\"step\":10,\"reward_mean\":1}\n");
  Result<std::string> svg = RenderMetricsSvg(path, {{"reward_mean", "r"}});
  ASSERT_TRUE(svg.ok());
  std::smatch m;
  ASSERT_TRUE(std::regex_search(*svg, m, std::regex("points=\"([0-9.]+),([0-9.]+) ([0-9.]+),([0-9.]+) \"")));
  EXPECT_LT(std::stod(m[1]), std::stod(m[3]));  // x grows to the right
  EXPECT_GT(std::stod(m[2]), std::stod(m[4]));  // larger y is drawn higher (smaller svg y)
}

TEST(MetricsPlot, ClearErrors) {
  EXPECT_EQ(RenderMetricsSvg("/nonexistent/metrics.jsonl", DefaultPlotSeries()).status().code(),
            StatusCode::kNotFound);
  std::string path = WriteFile("grove_plot_empty.jsonl", "{\"reward\":1}\n");
  EXPECT_EQ(RenderMetricsSvg(path, DefaultPlotSeries()).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace grove::cluster
