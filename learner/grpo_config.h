// The GRPO learner's math settings, read from one TOML table (the lead puts it
// at [learner.grpo]):
//
//   variant = "grpo"            # grpo | dr_grpo | dapo | gspo: sets the defaults below
//   clip_low = 0.2              # ratio floor 1 - clip_low, in [0, 1)
//   clip_high = 0.2             # ratio ceiling 1 + clip_high, >= 0
//   beta = 0.04                 # k3 KL coefficient, >= 0
//   loss_aggregation = "seq_mean_token_mean"   # | token_mean | seq_mean_token_sum_norm
//   max_tokens = 512            # the constant of seq_mean_token_sum_norm
//   ratio = "token"             # token | sequence (GSPO)
//   tis_cap = 2.0               # truncated importance sampling cap; <= 0 disables
//   dual_clip = 0.0             # 0 off, else > 1: bound on the ratio when A < 0
//   scale_advantage_by_std = true
//   advantage_std = "sample"    # sample | population (see advantages.h)
//   advantage_eps = 1e-6
//   dynamic_sampling = false    # drop groups whose rewards are all equal
//   [learner.grpo.optimizer]
//   lr = 1e-6  beta1 = 0.9  beta2 = 0.999  eps = 1e-8  weight_decay = 0.01
//   max_grad_norm = 1.0         # 0 disables clipping
//   moments = "fp32"            # fp32 | bf16: AdamW's m and v (learner/adamw.h)
//   [learner.grpo.schedule]
//   warmup_steps = 0  decay = "constant"  total_steps = 0  min_lr = 0.0
//
// Presets (any key set explicitly wins over its preset):
//   grpo    - DeepSeekMath (Shao et al. 2024): std-scaled advantages, clip 0.2,
//             k3 KL with beta 0.04, per-sequence mean of per-token means.
//   dr_grpo - Dr. GRPO (Liu et al. 2025): advantages without the std, loss
//             summed over tokens and divided by the constant max_tokens (which
//             must then be set: it is the generation budget), beta 0.
//   dapo    - DAPO (Yu et al. 2025): clip-higher 0.2 / 0.28, token_mean, dynamic
//             sampling, no KL (beta 0). It also expects the verifier's overlong
//             reward shaping (reward/) to be on; that lives in the reward, not here.
//   gspo    - GSPO (Zheng et al. 2025): sequence-level ratio
//             exp(mean_t(logp - old_logp)) with the paper's clip range
//             3e-4 / 4e-4, sequence mean (seq_mean_token_mean), beta 0.
// Every variant defaults tis_cap to 2 (the cap of Yao et al. 2025), because
// rollouts here run a quantized model whose log-probs differ from the learner's.
#pragma once

#include <string_view>

#include "base/config.h"
#include "base/result.h"
#include "learner/adamw.h"
#include "learner/advantages.h"
#include "learner/grpo_loss.h"
#include "learner/lr_schedule.h"

namespace grove::learner {

enum class GrpoVariant { kGrpo, kDrGrpo, kDapo, kGspo };

Result<GrpoVariant> ParseGrpoVariant(std::string_view name);
std::string_view GrpoVariantName(GrpoVariant v);

struct GrpoConfig {
  GrpoVariant variant = GrpoVariant::kGrpo;
  AdvantageOptions advantages;
  bool dynamic_sampling = false;
  PolicyLossConfig loss;
  AdamWOptions optimizer;
  double max_grad_norm = 1.0;  // 0: no clipping
  LrScheduleOptions schedule;  // schedule.peak_lr is optimizer.lr
};

// The preset of a variant, before any key of a file is applied.
GrpoConfig GrpoPreset(GrpoVariant variant);

// Reads the table at `path` of `config` (keys above; an absent table gives the
// grpo preset; unknown keys are an error naming the key). InvalidArgument with
// the file and the dotted path for a bad type or value.
Result<GrpoConfig> ParseGrpoConfig(const Config& config, std::string_view path = "learner.grpo");

}  // namespace grove::learner
