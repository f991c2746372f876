#include "learner/grpo_config.h"

#include <cmath>
#include <string>

namespace grove::learner {

Result<GrpoVariant> ParseGrpoVariant(std::string_view name) {
  if (name == "grpo") return GrpoVariant::kGrpo;
  if (name == "dr_grpo") return GrpoVariant::kDrGrpo;
  if (name == "dapo") return GrpoVariant::kDapo;
  if (name == "gspo") return GrpoVariant::kGspo;
  return Status::InvalidArgument("unknown GRPO variant '" + std::string(name) +
                                 "' (known: grpo, dr_grpo, dapo, gspo)");
}

std::string_view GrpoVariantName(GrpoVariant v) {
  switch (v) {
    case GrpoVariant::kGrpo: return "grpo";
    case GrpoVariant::kDrGrpo: return "dr_grpo";
    case GrpoVariant::kDapo: return "dapo";
    case GrpoVariant::kGspo: return "gspo";
  }
  return "?";
}

GrpoConfig GrpoPreset(GrpoVariant variant) {
  GrpoConfig c;
  c.variant = variant;
  c.loss.tis_cap = 2.0;
  switch (variant) {
    case GrpoVariant::kGrpo:
      c.loss.beta = 0.04;
      break;
    case GrpoVariant::kDrGrpo:
      c.advantages.scale_by_std = false;
      c.loss.aggregation = LossAggregation::kSeqMeanTokenSumNorm;
      break;
    case GrpoVariant::kDapo:
      c.loss.clip_low = 0.2;
      c.loss.clip_high = 0.28;
      c.loss.aggregation = LossAggregation::kTokenMean;
      c.dynamic_sampling = true;
      break;
    case GrpoVariant::kGspo:
      c.loss.ratio_level = RatioLevel::kSequence;
      c.loss.clip_low = 3e-4;
      c.loss.clip_high = 4e-4;
      break;
  }
  return c;
}

namespace {

// "file.toml: learner.grpo.key", for errors about a value this file checks.
std::string Where(const Config& root, std::string_view path, std::string_view key) {
  return root.source() + ": " + std::string(path) + "." + std::string(key);
}

}  // namespace

Result<GrpoConfig> ParseGrpoConfig(const Config& root, std::string_view path) {
  const Config s = root.Section(path);
  const std::string opt_path = std::string(path) + ".optimizer";
  const std::string sched_path = std::string(path) + ".schedule";
  GROVE_RETURN_IF_ERROR(s.CheckKeys({"variant", "clip_low", "clip_high", "beta", "loss_aggregation", "max_tokens",
                                     "ratio", "tis_cap", "dual_clip", "scale_advantage_by_std", "advantage_std", "advantage_eps",
                                     "dynamic_sampling", "optimizer", "schedule"}));
  GROVE_ASSIGN_OR_RETURN(std::string variant_name, s.String("variant", "grpo"));
  Result<GrpoVariant> variant = ParseGrpoVariant(variant_name);
  if (!variant.ok()) return variant.status().WithContext(Where(root, path, "variant"));
  GrpoConfig c = GrpoPreset(*variant);

  GROVE_ASSIGN_OR_RETURN(c.loss.clip_low, s.Double("clip_low", c.loss.clip_low));
  GROVE_ASSIGN_OR_RETURN(c.loss.clip_high, s.Double("clip_high", c.loss.clip_high));
  GROVE_ASSIGN_OR_RETURN(c.loss.beta, s.Double("beta", c.loss.beta));
  GROVE_ASSIGN_OR_RETURN(std::string agg,
                         s.String("loss_aggregation", std::string(LossAggregationName(c.loss.aggregation))));
  Result<LossAggregation> aggregation = ParseLossAggregation(agg);
  if (!aggregation.ok()) return aggregation.status().WithContext(Where(root, path, "loss_aggregation"));
  c.loss.aggregation = *aggregation;
  GROVE_ASSIGN_OR_RETURN(c.loss.max_tokens, s.Int("max_tokens", c.loss.max_tokens));
  GROVE_ASSIGN_OR_RETURN(std::string ratio,
                         s.String("ratio", c.loss.ratio_level == RatioLevel::kToken ? "token" : "sequence"));
  if (ratio == "token") {
    c.loss.ratio_level = RatioLevel::kToken;
  } else if (ratio == "sequence") {
    c.loss.ratio_level = RatioLevel::kSequence;
  } else {
    return Status::InvalidArgument(Where(root, path, "ratio") + ": unknown ratio level '" + ratio +
                                   "' (known: token, sequence)");
  }
  GROVE_ASSIGN_OR_RETURN(c.loss.tis_cap, s.Double("tis_cap", c.loss.tis_cap));
  GROVE_ASSIGN_OR_RETURN(c.loss.dual_clip, s.Double("dual_clip", c.loss.dual_clip));
  Status loss_ok = ValidatePolicyLossConfig(c.loss);
  if (!loss_ok.ok()) return loss_ok.WithContext(root.source() + ": " + std::string(path));

  GROVE_ASSIGN_OR_RETURN(c.advantages.scale_by_std, s.Bool("scale_advantage_by_std", c.advantages.scale_by_std));
  GROVE_ASSIGN_OR_RETURN(std::string std_kind, s.String("advantage_std", "sample"));
  if (std_kind == "sample") {
    c.advantages.std_kind = StdKind::kSample;
  } else if (std_kind == "population") {
    c.advantages.std_kind = StdKind::kPopulation;
  } else {
    return Status::InvalidArgument(Where(root, path, "advantage_std") + ": unknown std '" + std_kind +
                                   "' (known: sample, population)");
  }
  GROVE_ASSIGN_OR_RETURN(c.advantages.eps, s.Double("advantage_eps", c.advantages.eps));
  if (!(c.advantages.eps >= 0.0) || !std::isfinite(c.advantages.eps))
    return Status::InvalidArgument(Where(root, path, "advantage_eps") + " must be a finite value >= 0");
  GROVE_ASSIGN_OR_RETURN(c.dynamic_sampling, s.Bool("dynamic_sampling", c.dynamic_sampling));

  const Config opt = root.Section(opt_path);
  GROVE_RETURN_IF_ERROR(opt.CheckKeys({"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "moments"}));
  GROVE_ASSIGN_OR_RETURN(c.schedule.peak_lr, opt.Double("lr", c.schedule.peak_lr));
  GROVE_ASSIGN_OR_RETURN(c.optimizer.beta1, opt.Double("beta1", c.optimizer.beta1));
  GROVE_ASSIGN_OR_RETURN(c.optimizer.beta2, opt.Double("beta2", c.optimizer.beta2));
  GROVE_ASSIGN_OR_RETURN(c.optimizer.eps, opt.Double("eps", c.optimizer.eps));
  GROVE_ASSIGN_OR_RETURN(c.optimizer.weight_decay, opt.Double("weight_decay", c.optimizer.weight_decay));
  GROVE_ASSIGN_OR_RETURN(c.max_grad_norm, opt.Double("max_grad_norm", c.max_grad_norm));
  GROVE_ASSIGN_OR_RETURN(std::string moments, opt.String("moments", MomentPrecisionName(c.optimizer.moments)));
  Result<MomentPrecision> moment_precision = ParseMomentPrecision(moments);
  if (!moment_precision.ok()) return moment_precision.status().WithContext(Where(root, opt_path, "moments"));
  c.optimizer.moments = *moment_precision;
  Status opt_ok = ValidateAdamWOptions(c.optimizer);
  if (!opt_ok.ok()) return opt_ok.WithContext(root.source() + ": " + std::string(path));
  if (!(c.max_grad_norm >= 0.0) || !std::isfinite(c.max_grad_norm))
    return Status::InvalidArgument(Where(root, opt_path, "max_grad_norm") + " must be a finite value >= 0 (0 disables)");

  const Config sched = root.Section(sched_path);
  GROVE_RETURN_IF_ERROR(sched.CheckKeys({"warmup_steps", "decay", "total_steps", "min_lr"}));
  GROVE_ASSIGN_OR_RETURN(c.schedule.warmup_steps, sched.Int("warmup_steps", c.schedule.warmup_steps));
  GROVE_ASSIGN_OR_RETURN(std::string decay, sched.String("decay", "constant"));
  Result<LrDecay> decay_kind = ParseLrDecay(decay);
  if (!decay_kind.ok()) return decay_kind.status().WithContext(Where(root, sched_path, "decay"));
  c.schedule.decay = *decay_kind;
  GROVE_ASSIGN_OR_RETURN(c.schedule.total_steps, sched.Int("total_steps", c.schedule.total_steps));
  GROVE_ASSIGN_OR_RETURN(c.schedule.min_lr, sched.Double("min_lr", c.schedule.min_lr));
  Result<LrSchedule> schedule_ok = LrSchedule::Create(c.schedule);
  if (!schedule_ok.ok()) return schedule_ok.status().WithContext(root.source() + ": " + std::string(path));
  return c;
}

}  // namespace grove::learner
