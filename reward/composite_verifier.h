// Weighted composition of named verifiers: reward = sum of weight * reward.
//
// The spec names the parts and their weights, either as text
// ("format:0.1,exact:1"; a missing weight is 1) or as a TOML section whose
// keys are names and values weights:
//   [reward.verifiers]
//   format = 0.1
//   exact = 1.0
// The composite's sub-scores are each part's unweighted reward under its own
// name (and its own sub-scores as "name.sub"); its reason lists the parts.
// A part that throws or returns a non-finite reward counts 0 with that reason.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/config.h"
#include "base/result.h"
#include "reward/registry.h"
#include "reward/verifier.h"

namespace grove::reward {

struct WeightedVerifier {
  std::string name;
  double weight = 1.0;
};

Result<std::vector<WeightedVerifier>> ParseVerifierSpec(std::string_view spec);
Result<std::vector<WeightedVerifier>> VerifierSpecFromConfig(const Config& section);
std::string FormatVerifierSpec(const std::vector<WeightedVerifier>& spec);

Result<std::unique_ptr<Verifier>> MakeCompositeVerifier(const VerifierRegistry& registry,
                                                        const std::vector<WeightedVerifier>& spec);

}  // namespace grove::reward
