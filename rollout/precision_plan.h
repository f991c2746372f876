// The per-expert precision plan: which format (int4, int8 or bf16) each
// feed-forward weight group of the model is held in by a rollout worker,
// chosen from measurement to minimize output error under a budget of average
// bits per weight.
//
// Units: every routed expert (its w1, w3, w2), every layer's shared experts
// and every dense layer's MLP; one format per unit. The rest is not planned:
// attention projections and lm_head are held in bf16 (the issue lets them
// stay there; they are a small share of an MoE's weights), embeddings, norms
// and the router stay fp32 (as in IsQuantizedTensor).
//
// Error of a unit in format f, on a calibration batch run through the
// full-precision model: the FFN inputs x_t of the rows the unit sees (an
// expert: the rows routed to it; shared and dense: every row), and
//   error_f = sum_t g_t^2 ||FFN_f(x_t) - FFN(x_t)||^2
// with g_t the row's gate for that expert (1 for shared and dense): the
// squared change of the layer's output, so an expert the router rarely
// picks, or picks with a small gate, costs little.
// That error is local to its layer, but an early layer's error travels
// through every later one (and moves later routing): on a trained 2-layer
// checkpoint, plans by local error alone left the dense layer-0 MLP in int4
// (its local error per bit was below three experts') at a KL of 2.1e-3 per
// token, 700x that of a plan with it in int8. So each layer's errors are
// converted to KL units:
// scaled by KL(layer's units all int4 || full) / (sum of their int4
// errors), one extra scoring of the batch per layer. Within a layer the
// units keep their measured proportions; units are assumed additive.
//
// Choice: start from all int4 and apply, one at a time, the upgrade of one
// unit (to int8 or bf16) with the largest error reduction per extra bit that
// keeps the planned units' average bits per weight within the budget, until
// none fits or helps: the greedy of a multiple-choice knapsack.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "model/transformer.h"
#include "rollout/precision_format.h"

namespace grove::rollout {

inline constexpr std::array<PrecisionFormat, 3> kPlanFormats = {PrecisionFormat::kInt4, PrecisionFormat::kInt8,
                                                                PrecisionFormat::kBF16};  // cheapest first

struct PlanUnit {
  std::string name;                  // "layers.1.moe.experts.3", "layers.1.moe.shared", "layers.0.mlp"
  std::vector<std::string> tensors;  // its weights: name + ".w1", ".w3", ".w2"
  int64_t layer = 0, expert = -1;    // expert -1: shared or dense
  int64_t params = 0;
  int64_t rows_seen = 0;             // calibration rows it was measured on
  std::array<double, 3> bits{};      // storage bits in each of kPlanFormats (scales included)
  std::array<double, 3> error{};     // measured output error in each of kPlanFormats
  PrecisionFormat format = PrecisionFormat::kInt4;
};

struct PrecisionPlan {
  double budget_bits = 0;  // average bits per weight over the units
  std::vector<PlanUnit> units;

  double bits_per_weight() const;  // of the units in their chosen formats
  double total_error() const;
  int64_t count(PrecisionFormat f) const;
  // Tensor -> format for QuantizeInPlace: units' tensors their format,
  // attention and lm_head bf16, everything else fp32.
  FormatChooser Chooser() const;
  // "plan 5.1 b/w: 40 int4, 20 int8, 4 bf16"
  std::string Summary() const;
};

// The units of a model config, errors unmeasured (zero), all int4.
std::vector<PlanUnit> PlanUnits(const model::ModelConfig& config);

// Measures every unit's error in every format on `calibration`, scored by
// `model` as it is (its weights taken as full precision; they are not
// changed). Uses Score(keep_for_backward): a kept forward of the model is
// replaced.
Status MeasureUnitErrors(model::Model& model, const std::vector<model::ScoreRequest>& calibration,
                         std::vector<PlanUnit>& units);

// Its first half, the local errors only (unscaled; exposed for tests, e.g.
// against the GPU's in gpu_precision_plan.h).
Status MeasureLocalUnitErrors(model::Model& model, const std::vector<model::ScoreRequest>& calibration,
                              std::vector<PlanUnit>& units);

// The per-layer KL scaling above (part of MeasureUnitErrors; exposed for
// tests): `units` hold local errors, `model` the full-precision weights
// (restored on return).
Status ScaleByLayerSensitivity(model::Model& model, const std::vector<model::ScoreRequest>& calibration,
                               std::vector<PlanUnit>& units);

// Chooses the formats (the greedy above). InvalidArgument when the budget is
// below the all-int4 cost of the units or not finite.
Status ChooseFormats(double budget_bits, std::vector<PlanUnit>& units);

// Calibration sequences: each prompt completed by `model` (sampled at
// temperature 1 from `seed`, up to max_new_tokens, stopping at stop_token),
// returned as score requests over the completion.
Result<std::vector<model::ScoreRequest>> CalibrationBatch(model::Model& model,
                                                          const std::vector<std::vector<int32_t>>& prompts,
                                                          int64_t max_new_tokens, int32_t stop_token,
                                                          uint64_t seed);

// CalibrationBatch's second half: each prompt with its completion as a
// score request over the completion (prompts left no room skipped;
// InvalidArgument when none is left).
Result<std::vector<model::ScoreRequest>> CalibrationRequests(const std::vector<std::vector<int32_t>>& prompts,
                                                             const std::vector<model::Completion<float>>& completions);

// How far a quantized copy of the policy is from the full-precision one, on
// the scored positions of `sequences` (the completion tokens).
// One token's routes, [moe_layers][top_k] each: true when the set of
// experts differs in at least one MoE layer (the order within a layer is
// the gate order, which may differ without changing the computation).
bool RouteSetsDiffer(const uint16_t* a, const uint16_t* b, int64_t moe_layers, int64_t top_k);

struct MismatchReport {
  int64_t tokens = 0;
  // Mean over tokens of KL(rollout || full) of the next-token distributions,
  // exact: from the full log-softmax over the vocabulary.
  double mean_kl = 0;
  // Fraction of tokens whose set of routed experts differs in at least one
  // MoE layer.
  double routes_differ = 0;
};

// `model` holds the rollout (quantized) weights; `full_precision` is the
// flat parameter buffer they came from. The model's weights are swapped for
// the measurement and restored.
Result<MismatchReport> MeasureMismatch(model::Model& model, std::span<const float> full_precision,
                                       const std::vector<model::ScoreRequest>& sequences);

// When to make a new plan: after `every_versions` versions (0: never by
// count), or when the weights moved by more than `max_rel_change` relative
// L2 norm (||w - w_plan|| / ||w_plan||) since the plan (0: never by change).
struct ReplanPolicy {
  int64_t every_versions = 0;
  double max_rel_change = 0.05;
};

class ReplanTrigger {
 public:
  explicit ReplanTrigger(ReplanPolicy policy) : policy_(policy) {}
  bool has_plan() const { return plan_version_ >= 0; }
  // Records the version and full-precision weights a plan was made from.
  void Planned(int64_t version, std::span<const float> weights);
  // Records the version only, the weights being kept elsewhere (a device
  // copy: PolicyQuantizer::FormatsFromDevice); drops any host copy, so
  // RelativeChange is infinite (a Due from host weights is true) until the
  // next Planned with weights.
  void Planned(int64_t version);
  // True when no plan exists or the policy asks for a new one.
  bool Due(int64_t version, std::span<const float> weights) const;
  // The version half of Due: no plan, or every_versions reached.
  bool DueByCount(int64_t version) const;
  double RelativeChange(std::span<const float> weights) const;
  const ReplanPolicy& policy() const { return policy_; }

 private:
  ReplanPolicy policy_;
  int64_t plan_version_ = -1;
  std::vector<float> plan_weights_;
};

}  // namespace grove::rollout
