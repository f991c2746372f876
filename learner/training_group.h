// The learner's view of one scored group, decoded from the wire and checked
// against the model it will train: every token id in the vocabulary, one
// log-prob per completion token, a full route per token, finite rewards. A
// group that fails a check is refused with the reason, never trained on.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "actors/schema/data.capnp.h"
#include "base/result.h"

namespace grove::learner {

struct TrainingSample {
  std::vector<int32_t> tokens;           // completion tokens
  std::vector<float> rollout_logprobs;   // one per completion token
  std::vector<uint16_t> routes;          // [token][moe layer][k] for tokens[0..n-1), may be empty
  int64_t policy_version = 0;
  double reward = 0;
  bool truncated = false;                // hit the length limit
};

struct TrainingGroup {
  std::string group_id;
  uint64_t prompt_id = 0;
  std::string task;
  std::string reference;                 // task reference JSON
  std::vector<int32_t> prompt_tokens;
  std::vector<uint16_t> prompt_routes;   // [token][moe layer][k], may be empty
  int64_t policy_version = 0;
  std::vector<TrainingSample> samples;
};

struct GroupShape {
  int64_t vocab_size = 0;
  int moe_layers = 0;
  int top_k = 0;
  int num_experts = 0;
  int64_t max_sequence = 0;  // prompt + completion tokens
};

Result<TrainingGroup> DecodeTrainingGroup(wire::ScoredGroup::Reader scored, const GroupShape& shape);

}  // namespace grove::learner
