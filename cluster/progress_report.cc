#include "cluster/progress_report.h"

#include <algorithm>
#include <fstream>

namespace grove::cli {

namespace {

std::string Fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

double Num(const nlohmann::json& j, const char* key, double fallback = 0) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}

}  // namespace

std::string ProgressReport::FormatLine(const nlohmann::json& r) {
  if (r.value("phase", "") == "warmstart") {
    return "warm-start done: held-out accuracy " + Fmt("%.3f", Num(r, "eval_accuracy")) + " (untrained " +
           Fmt("%.3f", Num(r, "init_accuracy")) + ")  [" + Fmt("%.0f", Num(r, "time_s")) + " s]";
  }
  std::string line = "step " + Fmt("%4.0f", Num(r, "step")) + "  v" + Fmt("%-4.0f", Num(r, "version")) +
                     "  reward " + Fmt("%.3f", Num(r, "reward_mean"));
  line += r.contains("eval_accuracy") ? "  acc " + Fmt("%.3f", Num(r, "eval_accuracy")) : "  acc   -  ";
  line += "  kl " + Fmt("%.4f", Num(r, "kl")) + "  clip " + Fmt("%.3f", Num(r, "clip_frac")) + "  tok/s " +
          Fmt("%6.0f", Num(r, "tokens_per_s")) + "  stale " + Fmt("%.2f", Num(r, "staleness")) + "  mismatch " +
          Fmt("%.1e", Num(r, "mismatch_kl")) + "  [" + Fmt("%.0f", Num(r, "time_s")) + " s]";
  return line;
}

void ProgressReport::Poll() {
  std::ifstream in(path_, std::ios::binary);
  if (!in) return;
  in.seekg(0, std::ios::end);
  const uint64_t size = static_cast<uint64_t>(in.tellg());
  if (size <= offset_) return;
  in.seekg(static_cast<std::streamoff>(offset_));
  std::string chunk(size - offset_, '\0');
  in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
  offset_ = size;
  partial_ += chunk;
  size_t start = 0, nl;
  while ((nl = partial_.find('\n', start)) != std::string::npos) {
    nlohmann::json row = nlohmann::json::parse(partial_.substr(start, nl - start), nullptr, false);
    start = nl + 1;
    if (!row.is_object()) continue;
    std::fprintf(out_, "%s\n", FormatLine(row).c_str());
    rows_.push_back(std::move(row));
  }
  partial_.erase(0, start);
  std::fflush(out_);
}

void ProgressReport::PrintSummary() {
  Poll();
  const nlohmann::json* warm = nullptr;
  const nlohmann::json* last_eval = nullptr;
  std::vector<double> rewards, tokens_per_s;
  for (const nlohmann::json& r : rows_) {
    if (r.value("phase", "") == "warmstart") warm = &r;
    if (r.value("phase", "") == "grpo") {
      rewards.push_back(Num(r, "reward_mean"));
      tokens_per_s.push_back(Num(r, "tokens_per_s"));
      if (r.contains("eval_accuracy")) last_eval = &r;
    }
  }
  if (warm == nullptr || rewards.empty()) {
    std::fprintf(out_, "no GRPO steps were recorded in %s\n", path_.c_str());
    return;
  }
  const size_t k = std::max<size_t>(1, std::min<size_t>(10, rewards.size() / 3));
  auto mean = [](auto b, auto e) {
    double s = 0;
    size_t n = 0;
    for (auto it = b; it != e; ++it, ++n) s += *it;
    return n ? s / n : 0.0;
  };
  const double r0 = mean(rewards.begin(), rewards.begin() + k), r1 = mean(rewards.end() - k, rewards.end());
  std::fprintf(out_, "\n%-34s %12s %12s\n", "", "before RL", "after RL");
  std::fprintf(out_, "%-34s %12.3f %12s\n", "held-out accuracy (greedy)", Num(*warm, "eval_accuracy"),
               last_eval ? Fmt("%.3f", Num(*last_eval, "eval_accuracy")).c_str() : "-");
  std::fprintf(out_, "%-34s %12.3f %12s\n", "held-out reward (greedy)", Num(*warm, "eval_reward"),
               last_eval ? Fmt("%.3f", Num(*last_eval, "eval_reward")).c_str() : "-");
  std::fprintf(out_, "%-34s %12.3f %12.3f\n", ("training reward, first/last " + std::to_string(k) + " steps").c_str(),
               r0, r1);
  std::fprintf(out_, "%-34s %25.0f\n", "GRPO steps", static_cast<double>(rewards.size()));
  std::fprintf(out_, "%-34s %25.0f\n", "learner tokens/s (mean)", mean(tokens_per_s.begin(), tokens_per_s.end()));
  std::fprintf(out_, "%-34s %25.0f\n", "wall time (s)", Num(rows_.back(), "time_s"));
  std::fprintf(out_, "metrics: %s (grove plot draws them)\n", path_.c_str());
  std::fflush(out_);
}

}  // namespace grove::cli
