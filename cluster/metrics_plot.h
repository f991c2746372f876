// Renders a run's metrics (metrics.jsonl: one JSON object per learner step)
// as an SVG image with one panel per series, so a person can see at a glance
// whether reward and accuracy climb and how far the policy drifts (KL).
#pragma once

#include <string>
#include <vector>

#include "base/result.h"

namespace grove::cluster {

struct PlotSeries {
  std::string key;    // JSON field, e.g. "reward_mean"
  std::string title;  // panel title
};

// The panels `grove plot` draws by default: reward, held-out accuracy, KL.
std::vector<PlotSeries> DefaultPlotSeries();

// Reads `metrics_jsonl` and returns the SVG text. Lines that are not JSON
// objects are skipped (a run killed mid-write leaves a torn last line); a
// series with no points is drawn as an empty panel saying so. Errors: the
// file cannot be read, or no line at all has a "step" field.
Result<std::string> RenderMetricsSvg(const std::string& metrics_jsonl,
                                     const std::vector<PlotSeries>& series);

// `grove plot RUN_DIR [--out FILE]`: writes RUN_DIR/metrics.svg by default.
int PlotMain(int argc, char** argv);

}  // namespace grove::cluster
