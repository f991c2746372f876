#include "rollout/precision_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>

#include "base/parallel_for.h"
#include "model/layers.h"

namespace grove::rollout {
namespace {

size_t FormatIndex(PrecisionFormat f) {
  for (size_t i = 0; i < kPlanFormats.size(); ++i)
    if (kPlanFormats[i] == f) return i;
  return 0;
}

PlanUnit MakeUnit(const model::ParamLayout& layout, std::string name, int64_t layer, int64_t expert) {
  PlanUnit u;
  u.name = std::move(name);
  u.layer = layer;
  u.expert = expert;
  for (const char* w : {".w1", ".w3", ".w2"}) {
    u.tensors.push_back(u.name + w);
    const model::TensorInfo* t = layout.Find(u.tensors.back());
    u.params += t->numel;
    for (size_t i = 0; i < kPlanFormats.size(); ++i) u.bits[i] += StorageBits(kPlanFormats[i], t->shape[0], t->shape[1]);
  }
  return u;
}

// y [rows, H] = SwiGLU(x) with the unit's weights read from `params` at the
// layout's offsets, each round-tripped through `format` first (nullptr:
// as they are).
void UnitForward(const model::ParamLayout& layout, std::span<const float> params, const PlanUnit& u,
                 const PrecisionFormat* format, const std::vector<float>& x, int64_t rows, int64_t hidden,
                 std::vector<float>& y) {
  std::array<std::vector<float>, 3> w;
  int64_t F = 0;
  for (size_t i = 0; i < 3; ++i) {
    const model::TensorInfo* t = layout.Find(u.tensors[i]);
    w[i].assign(params.begin() + t->offset, params.begin() + t->offset + t->numel);
    if (format) RoundTripInPlace(*format, w[i].data(), t->shape[0], t->shape[1]);
    if (i == 0) F = t->shape[0];
  }
  std::vector<float> a(rows * F), b(rows * F), h(rows * F);
  y.resize(rows * hidden);
  model::layers::SwiGluForward(x.data(), w[0].data(), w[1].data(), w[2].data(), a.data(), b.data(), h.data(),
                               y.data(), rows, hidden, F);
}

// What the model does on the scored positions of a batch (the positions
// predicting tokens score_from..L-1): next-token log-probs over the whole
// vocabulary and, optionally, the routed experts.
struct PolicyOutputs {
  std::vector<std::vector<float>> logprobs;  // per sequence [positions, vocab]
  std::vector<std::vector<uint16_t>> routes;  // per sequence [positions, moe layers, k]; empty if not asked
};

Result<PolicyOutputs> RunPolicy(model::Model& model, const std::vector<model::ScoreRequest>& sequences,
                                bool with_routes) {
  const model::ModelConfig& c = model.config();
  const int64_t V = c.vocab_size, row = c.moe_layers() * c.top_k;
  PolicyOutputs out;
  if (with_routes) {
    GROVE_ASSIGN_OR_RETURN(model::ScoreResult<float> scored, model.Score(sequences, false));
    for (size_t s = 0; s < sequences.size(); ++s) {
      const auto& r = scored.routes[s];
      out.routes.emplace_back(r.begin() + (sequences[s].score_from - 1) * row, r.end());
    }
  }
  for (const model::ScoreRequest& q : sequences) {
    GROVE_ASSIGN_OR_RETURN(std::vector<float> logits, model.FullLogits(q.tokens));
    const int64_t L = static_cast<int64_t>(q.tokens.size());
    std::vector<float>& lp = out.logprobs.emplace_back();
    for (int64_t t = q.score_from - 1; t < L - 1; ++t) {
      const float* z = logits.data() + t * V;
      const float lse = model::layers::LogSumExp(z, V);
      for (int64_t v = 0; v < V; ++v) lp.push_back(z[v] - lse);
    }
  }
  return out;
}

// KL(q || p) per position, averaged; routes compared when both have them.
MismatchReport Compare(const model::ModelConfig& c, const PolicyOutputs& p, const PolicyOutputs& q) {
  const int64_t V = c.vocab_size, K = c.top_k, M = c.moe_layers();
  const bool routes = !p.routes.empty() && !q.routes.empty();
  MismatchReport rep;
  double kl_sum = 0;
  int64_t differ = 0;
  for (size_t s = 0; s < p.logprobs.size(); ++s) {
    const int64_t n = static_cast<int64_t>(p.logprobs[s].size()) / V;
    for (int64_t t = 0; t < n; ++t) {
      const float* lp = p.logprobs[s].data() + t * V;
      const float* lq = q.logprobs[s].data() + t * V;
      double kl = 0;
      for (int64_t v = 0; v < V; ++v) kl += std::exp(double(lq[v])) * (double(lq[v]) - double(lp[v]));
      kl_sum += std::max(kl, 0.0);  // >= 0 up to rounding
      differ += routes && RouteSetsDiffer(p.routes[s].data() + t * M * K, q.routes[s].data() + t * M * K, M, K);
      ++rep.tokens;
    }
  }
  if (rep.tokens > 0) {
    rep.mean_kl = kl_sum / static_cast<double>(rep.tokens);
    rep.routes_differ = static_cast<double>(differ) / static_cast<double>(rep.tokens);
  }
  return rep;
}

}  // namespace

bool RouteSetsDiffer(const uint16_t* a, const uint16_t* b, int64_t moe_layers, int64_t top_k) {
  std::vector<uint16_t> x(static_cast<size_t>(top_k)), y(static_cast<size_t>(top_k));
  for (int64_t mi = 0; mi < moe_layers; ++mi) {
    std::copy(a + mi * top_k, a + (mi + 1) * top_k, x.begin());
    std::copy(b + mi * top_k, b + (mi + 1) * top_k, y.begin());
    std::sort(x.begin(), x.end());
    std::sort(y.begin(), y.end());
    if (x != y) return true;
  }
  return false;
}

double PrecisionPlan::bits_per_weight() const {
  double bits = 0, params = 0;
  for (const PlanUnit& u : units) {
    bits += u.bits[FormatIndex(u.format)];
    params += static_cast<double>(u.params);
  }
  return params > 0 ? bits / params : 0;
}

double PrecisionPlan::total_error() const {
  double e = 0;
  for (const PlanUnit& u : units) e += u.error[FormatIndex(u.format)];
  return e;
}

int64_t PrecisionPlan::count(PrecisionFormat f) const {
  return std::count_if(units.begin(), units.end(), [f](const PlanUnit& u) { return u.format == f; });
}

FormatChooser PrecisionPlan::Chooser() const {
  auto by_tensor = std::make_shared<std::map<std::string, PrecisionFormat>>();
  for (const PlanUnit& u : units)
    for (const std::string& t : u.tensors) (*by_tensor)[t] = u.format;
  return [by_tensor](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
    auto it = by_tensor->find(t.name);
    if (it != by_tensor->end()) return it->second;
    if (IsQuantizedTensor(t)) return PrecisionFormat::kBF16;  // attention, lm_head
    return std::nullopt;
  };
}

std::string PrecisionPlan::Summary() const {
  char bits[32];
  std::snprintf(bits, sizeof bits, "%.2f", bits_per_weight());
  return std::string("plan ") + bits + " b/w: " + std::to_string(count(PrecisionFormat::kInt4)) + " int4, " +
         std::to_string(count(PrecisionFormat::kInt8)) + " int8, " + std::to_string(count(PrecisionFormat::kBF16)) +
         " bf16";
}

std::vector<PlanUnit> PlanUnits(const model::ModelConfig& config) {
  const model::ParamLayout layout(config);
  std::vector<PlanUnit> units;
  for (int64_t l = 0; l < config.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    if (!config.is_moe_layer(l)) {
      units.push_back(MakeUnit(layout, p + "mlp", l, -1));
      continue;
    }
    for (int64_t e = 0; e < config.experts; ++e)
      units.push_back(MakeUnit(layout, p + "moe.experts." + std::to_string(e), l, e));
    if (config.shared_experts > 0) units.push_back(MakeUnit(layout, p + "moe.shared", l, -1));
  }
  return units;
}

Status MeasureUnitErrors(model::Model& model, const std::vector<model::ScoreRequest>& calibration,
                         std::vector<PlanUnit>& units) {
  GROVE_RETURN_IF_ERROR(MeasureLocalUnitErrors(model, calibration, units));
  return ScaleByLayerSensitivity(model, calibration, units);
}

Status MeasureLocalUnitErrors(model::Model& model, const std::vector<model::ScoreRequest>& calibration,
                              std::vector<PlanUnit>& units) {
  const model::ModelConfig& c = model.config();
  const model::ParamLayout& layout = model.layout();
  for (const PlanUnit& u : units)
    for (const std::string& t : u.tensors)
      if (!layout.Find(t) || u.layer < 0 || u.layer >= c.layers || u.expert >= c.experts)
        return Status::InvalidArgument("plan unit " + u.name + " does not belong to this model");
  GROVE_RETURN_IF_ERROR(model.Score(calibration, /*keep_for_backward=*/true).status());
  const int64_t H = c.hidden, K = c.top_k;
  std::map<int64_t, model::FfnInputs<float>> inputs;
  std::vector<float> x, y_ref, y_q;
  std::vector<double> gate2;
  for (PlanUnit& u : units) {
    auto it = inputs.find(u.layer);
    if (it == inputs.end()) {
      GROVE_ASSIGN_OR_RETURN(model::FfnInputs<float> in, model.KeptFfnInputs(u.layer));
      it = inputs.emplace(u.layer, std::move(in)).first;
    }
    const model::FfnInputs<float>& in = it->second;
    x.clear();
    gate2.clear();
    if (u.expert >= 0) {
      for (int64_t t = 0; t < in.rows; ++t)
        for (int64_t j = 0; j < K; ++j)
          if (in.experts[t * K + j] == u.expert) {
            x.insert(x.end(), in.x.begin() + t * H, in.x.begin() + (t + 1) * H);
            gate2.push_back(static_cast<double>(in.gates[t * K + j]) * in.gates[t * K + j]);
          }
    } else {
      x = in.x;
      gate2.assign(in.rows, 1.0);
    }
    const int64_t rows = static_cast<int64_t>(gate2.size());
    u.rows_seen = rows;
    u.error.fill(0.0);
    if (rows == 0) continue;  // never routed here: no measured cost in any format
    UnitForward(layout, model.params(), u, nullptr, x, rows, H, y_ref);
    for (size_t fi = 0; fi < kPlanFormats.size(); ++fi) {
      UnitForward(layout, model.params(), u, &kPlanFormats[fi], x, rows, H, y_q);
      double e = 0;
      for (int64_t r = 0; r < rows; ++r) {
        double d2 = 0;
        for (int64_t d = 0; d < H; ++d) {
          const double diff = static_cast<double>(y_q[r * H + d]) - y_ref[r * H + d];
          d2 += diff * diff;
        }
        e += gate2[r] * d2;
      }
      u.error[fi] = e;
    }
  }
  return Status::OK();
}

Status ScaleByLayerSensitivity(model::Model& model, const std::vector<model::ScoreRequest>& calibration,
                               std::vector<PlanUnit>& units) {
  const model::ParamLayout& layout = model.layout();
  const std::vector<float> full(model.params().begin(), model.params().end());
  std::map<int64_t, double> local;  // layer -> sum of its units' int4 errors
  for (const PlanUnit& u : units) local[u.layer] += u.error[0];
  std::map<int64_t, double> factor;
  GROVE_ASSIGN_OR_RETURN(PolicyOutputs reference, RunPolicy(model, calibration, false));
  for (const auto& [layer, sum] : local) {
    // The model with this layer's units in int4, everything else full.
    std::vector<float> w = full;
    for (const PlanUnit& u : units) {
      if (u.layer != layer) continue;
      for (const std::string& name : u.tensors) {
        const model::TensorInfo* t = layout.Find(name);
        RoundTripInPlace(PrecisionFormat::kInt4, w.data() + t->offset, t->shape[0], t->shape[1]);
      }
    }
    std::copy(w.begin(), w.end(), model.params().begin());
    Result<PolicyOutputs> quantized = RunPolicy(model, calibration, false);
    std::copy(full.begin(), full.end(), model.params().begin());
    GROVE_RETURN_IF_ERROR(quantized.status());
    factor[layer] = sum > 0 ? Compare(model.config(), reference, *quantized).mean_kl / sum : 0.0;
  }
  for (PlanUnit& u : units)
    for (double& e : u.error) e *= factor[u.layer];
  return Status::OK();
}

Status ChooseFormats(double budget_bits, std::vector<PlanUnit>& units) {
  if (!std::isfinite(budget_bits)) return Status::InvalidArgument("plan budget must be a finite bits/weight");
  std::vector<size_t> at(units.size(), 0);
  double bits = 0, params = 0;
  for (const PlanUnit& u : units) {
    bits += u.bits[0];
    params += static_cast<double>(u.params);
  }
  const double cap = budget_bits * params;
  if (bits > cap) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "plan budget %.3f bits/weight is below the all-int4 cost %.3f", budget_bits,
                  params > 0 ? bits / params : 0.0);
    return Status::InvalidArgument(msg);
  }
  for (;;) {
    size_t best_unit = units.size(), best_to = 0;
    double best_ratio = 0;
    for (size_t i = 0; i < units.size(); ++i) {
      const PlanUnit& u = units[i];
      for (size_t to = at[i] + 1; to < kPlanFormats.size(); ++to) {
        const double gain = u.error[at[i]] - u.error[to], cost = u.bits[to] - u.bits[at[i]];
        if (!(gain > 0) || bits + cost > cap) continue;
        const double ratio = gain / cost;
        if (ratio > best_ratio) {
          best_ratio = ratio;
          best_unit = i;
          best_to = to;
        }
      }
    }
    if (best_unit == units.size()) break;
    bits += units[best_unit].bits[best_to] - units[best_unit].bits[at[best_unit]];
    at[best_unit] = best_to;
  }
  for (size_t i = 0; i < units.size(); ++i) units[i].format = kPlanFormats[at[i]];
  return Status::OK();
}

Result<std::vector<model::ScoreRequest>> CalibrationBatch(model::Model& model,
                                                          const std::vector<std::vector<int32_t>>& prompts,
                                                          int64_t max_new_tokens, int32_t stop_token,
                                                          uint64_t seed) {
  if (prompts.empty()) return Status::InvalidArgument("calibration needs at least one prompt");
  model::SamplingOptions so;
  so.temperature = 1.0;
  so.max_new_tokens = max_new_tokens;
  so.stop_tokens = {stop_token};
  so.seed = seed;
  GROVE_ASSIGN_OR_RETURN(auto completions, model.Generate(prompts, so));
  return CalibrationRequests(prompts, completions);
}

Result<std::vector<model::ScoreRequest>> CalibrationRequests(const std::vector<std::vector<int32_t>>& prompts,
                                                             const std::vector<model::Completion<float>>& completions) {
  if (completions.size() != prompts.size())
    return Status::InvalidArgument("calibration: " + std::to_string(completions.size()) + " completions for " +
                                   std::to_string(prompts.size()) + " prompts");
  std::vector<model::ScoreRequest> batch;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (completions[i].tokens.empty()) continue;  // prompt already at the context limit
    model::ScoreRequest r;
    r.tokens = prompts[i];
    r.tokens.insert(r.tokens.end(), completions[i].tokens.begin(), completions[i].tokens.end());
    r.score_from = static_cast<int64_t>(prompts[i].size());
    batch.push_back(std::move(r));
  }
  if (batch.empty()) return Status::InvalidArgument("calibration: no prompt left room for a completion");
  return batch;
}

Result<MismatchReport> MeasureMismatch(model::Model& model, std::span<const float> full_precision,
                                       const std::vector<model::ScoreRequest>& sequences) {
  if (full_precision.size() != model.params().size())
    return Status::InvalidArgument("mismatch: " + std::to_string(full_precision.size()) +
                                   " reference weights for a model of " + std::to_string(model.params().size()));
  const std::vector<float> rollout(model.params().begin(), model.params().end());
  // The rollout weights go back into the model on every way out.
  struct Restore {
    model::Model& m;
    const std::vector<float>& w;
    ~Restore() { std::copy(w.begin(), w.end(), m.params().begin()); }
  } restore{model, rollout};
  std::copy(full_precision.begin(), full_precision.end(), model.params().begin());
  GROVE_ASSIGN_OR_RETURN(PolicyOutputs full, RunPolicy(model, sequences, true));
  std::copy(rollout.begin(), rollout.end(), model.params().begin());
  GROVE_ASSIGN_OR_RETURN(PolicyOutputs quantized, RunPolicy(model, sequences, true));
  return Compare(model.config(), full, quantized);
}

namespace {

// fn(begin, end, block) over fixed blocks of kReplanBlock elements of [0, n)
// on up to 16 host threads. Why: a rollout worker checks the trigger on
// every version it receives, and the GPU reference model's 1.7B weights
// take 1-2 s for one core to stream (twice: new and plan-time) -- a stall
// per version; the blocks, not the threads, fix what each partial sum
// covers, so results do not depend on the machine's core count.
constexpr size_t kReplanBlock = size_t(1) << 20;

template <typename Fn>
void ForEachBlock(size_t n, Fn&& fn) {
  const size_t blocks = (n + kReplanBlock - 1) / kReplanBlock;
  ParallelFor(int64_t(blocks), 16, [&](int64_t b) {
    fn(size_t(b) * kReplanBlock, std::min(n, size_t(b + 1) * kReplanBlock), size_t(b));
  });
}

}  // namespace

void ReplanTrigger::Planned(int64_t version, std::span<const float> weights) {
  plan_version_ = version;
  plan_weights_.resize(weights.size());
  ForEachBlock(weights.size(), [&](size_t begin, size_t end, size_t) {
    std::copy(weights.begin() + begin, weights.begin() + end, plan_weights_.begin() + begin);
  });
}

double ReplanTrigger::RelativeChange(std::span<const float> weights) const {
  if (weights.size() != plan_weights_.size()) return INFINITY;
  const size_t blocks = (weights.size() + kReplanBlock - 1) / kReplanBlock;
  std::vector<double> d2_block(blocks, 0.0), r2_block(blocks, 0.0);
  ForEachBlock(weights.size(), [&](size_t begin, size_t end, size_t b) {
    double d2 = 0, r2 = 0;
    for (size_t i = begin; i < end; ++i) {
      const double d = static_cast<double>(weights[i]) - plan_weights_[i];
      d2 += d * d;
      r2 += static_cast<double>(plan_weights_[i]) * plan_weights_[i];
    }
    d2_block[b] = d2;
    r2_block[b] = r2;
  });
  double d2 = 0, r2 = 0;
  for (size_t b = 0; b < blocks; ++b) {  // in block order: the same sum on any core count
    d2 += d2_block[b];
    r2 += r2_block[b];
  }
  return r2 > 0 ? std::sqrt(d2 / r2) : (d2 > 0 ? INFINITY : 0.0);
}

void ReplanTrigger::Planned(int64_t version) {
  plan_version_ = version;
  plan_weights_ = {};
}

bool ReplanTrigger::DueByCount(int64_t version) const {
  if (!has_plan()) return true;
  return policy_.every_versions > 0 && version - plan_version_ >= policy_.every_versions;
}

bool ReplanTrigger::Due(int64_t version, std::span<const float> weights) const {
  if (DueByCount(version)) return true;
  if (policy_.max_rel_change > 0 && RelativeChange(weights) > policy_.max_rel_change) return true;
  return false;
}

}  // namespace grove::rollout
