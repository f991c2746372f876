#include "cluster/metrics_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace grove::cluster {
namespace {

struct Point {
  double x, y;
};

std::string Num(double v) {
  char buf[32];
  if (v != 0 && (std::fabs(v) < 1e-3 || std::fabs(v) >= 1e5)) {
    std::snprintf(buf, sizeof buf, "%.2e", v);
  } else {
    std::snprintf(buf, sizeof buf, "%.3g", v);
  }
  return buf;
}

// One panel: axes, a few tick labels, the polyline, and the title.
void DrawPanel(std::ostringstream& svg, const std::string& title, const std::vector<Point>& pts,
               double x0, double y0, double w, double h) {
  const double left = 60, right = 15, top = 28, bottom = 30;
  const double pw = w - left - right, ph = h - top - bottom;
  svg << "<g transform=\"translate(" << x0 << "," << y0 << ")\">\n";
  svg << "<text x=\"" << left << "\" y=\"18\" font-size=\"14\" font-weight=\"bold\">" << title
      << "</text>\n";
  svg << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph
      << "\" fill=\"none\" stroke=\"#888\"/>\n";
  if (pts.empty()) {
    svg << "<text x=\"" << left + pw / 2 << "\" y=\"" << top + ph / 2
        << "\" text-anchor=\"middle\" fill=\"#888\">no data</text>\n</g>\n";
    return;
  }
  double xmin = pts.front().x, xmax = pts.front().x, ymin = pts.front().y, ymax = pts.front().y;
  for (const Point& p : pts) {
    xmin = std::min(xmin, p.x);
    xmax = std::max(xmax, p.x);
    ymin = std::min(ymin, p.y);
    ymax = std::max(ymax, p.y);
  }
  if (xmax == xmin) xmax = xmin + 1;
  if (ymax == ymin) {
    ymax += 0.5;
    ymin -= 0.5;
  }
  const double pad = 0.05 * (ymax - ymin);
  ymin -= pad;
  ymax += pad;
  auto sx = [&](double x) { return left + (x - xmin) / (xmax - xmin) * pw; };
  auto sy = [&](double y) { return top + ph - (y - ymin) / (ymax - ymin) * ph; };
  for (int i = 0; i <= 4; ++i) {
    double yv = ymin + (ymax - ymin) * i / 4.0;
    double xv = xmin + (xmax - xmin) * i / 4.0;
    svg << "<line x1=\"" << left << "\" x2=\"" << left + pw << "\" y1=\"" << sy(yv) << "\" y2=\""
        << sy(yv) << "\" stroke=\"#eee\"/>\n";
    svg << "<text x=\"" << left - 5 << "\" y=\"" << sy(yv) + 4
        << "\" font-size=\"11\" text-anchor=\"end\">" << Num(yv) << "</text>\n";
    svg << "<text x=\"" << sx(xv) << "\" y=\"" << top + ph + 16
        << "\" font-size=\"11\" text-anchor=\"middle\">" << Num(xv) << "</text>\n";
  }
  svg << "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"";
  for (const Point& p : pts) svg << sx(p.x) << "," << sy(p.y) << " ";
  svg << "\"/>\n";
  if (pts.size() <= 40) {
    for (const Point& p : pts)
      svg << "<circle cx=\"" << sx(p.x) << "\" cy=\"" << sy(p.y) << "\" r=\"2.5\" fill=\"#1f77b4\"/>\n";
  }
  svg << "</g>\n";
}

}  // namespace

std::vector<PlotSeries> DefaultPlotSeries() {
  return {{"reward_mean", "training reward (mean)"},
          {"eval_accuracy", "held-out accuracy"},
          {"kl", "KL to reference (k3)"}};
}

Result<std::string> RenderMetricsSvg(const std::string& metrics_jsonl,
                                     const std::vector<PlotSeries>& series) {
  std::ifstream in(metrics_jsonl);
  if (!in) return Status::NotFound("cannot open metrics file '" + metrics_jsonl + "'");
  std::vector<std::vector<Point>> points(series.size());
  std::string line;
  size_t rows = 0;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number()) continue;
    ++rows;
    double step = j["step"].get<double>();
    for (size_t i = 0; i < series.size(); ++i) {
      auto it = j.find(series[i].key);
      if (it != j.end() && it->is_number() && std::isfinite(it->get<double>()))
        points[i].push_back({step, it->get<double>()});
    }
  }
  if (rows == 0)
    return Status::InvalidArgument("'" + metrics_jsonl + "' has no metrics line with a \"step\"");
  const double w = 720, h = 220;
  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w << "\" height=\""
      << h * series.size() + 20 << "\" font-family=\"sans-serif\">\n";
  svg << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (size_t i = 0; i < series.size(); ++i)
    DrawPanel(svg, series[i].title, points[i], 0, 10 + h * i, w, h);
  svg << "<text x=\"" << w / 2 << "\" y=\"" << h * series.size() + 14
      << "\" font-size=\"12\" text-anchor=\"middle\">learner step</text>\n";
  svg << "</svg>\n";
  return svg.str();
}

int PlotMain(int argc, char** argv) {
  std::string run_dir, out;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << "usage: grove plot RUN_DIR [--out FILE.svg]\n"
                   "Draws reward, held-out accuracy and KL against learner step from\n"
                   "RUN_DIR/metrics.jsonl into an SVG image (default RUN_DIR/metrics.svg).\n";
      return 0;
    } else if (a == "--out" && i + 1 < argc) {
      out = argv[++i];
    } else if (a.rfind("--out=", 0) == 0) {
      out = a.substr(6);
    } else if (run_dir.empty() && a.rfind("--", 0) != 0) {
      run_dir = a;
    } else {
      std::cerr << "grove plot: unexpected argument '" << a << "' (see grove plot --help)\n";
      return 2;
    }
  }
  if (run_dir.empty()) {
    std::cerr << "grove plot: missing RUN_DIR (see grove plot --help)\n";
    return 2;
  }
  if (out.empty()) out = run_dir + "/metrics.svg";
  Result<std::string> svg = RenderMetricsSvg(run_dir + "/metrics.jsonl", DefaultPlotSeries());
  if (!svg.ok()) {
    std::cerr << "grove plot: " << svg.status() << "\n";
    return 1;
  }
  std::ofstream f(out, std::ios::binary);
  f << *svg;
  if (!f) {
    std::cerr << "grove plot: cannot write '" << out << "'\n";
    return 1;
  }
  std::cout << out << "\n";
  return 0;
}

}  // namespace grove::cluster
