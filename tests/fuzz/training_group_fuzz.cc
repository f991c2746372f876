// Fuzz target: the learner's intake. A batch of scored groups arrives from
// the replay store as an Envelope (body batch or scoredGroup); each group is
// checked by learner::DecodeTrainingGroup against the model's shape before
// anything is trained on.
//
// Input: bytes 0-1 choose the model shape (vocabulary, MoE layers, top-k,
// experts, maximum sequence); the rest is the frame, decoded with
// actors::DecodeFrame as the learner does.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "actors/codec.h"
#include "learner/training_group.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

namespace fuzz = grove::fuzz;
namespace learner = grove::learner;

void CheckGroup(grove::wire::ScoredGroup::Reader scored, const learner::GroupShape& shape) {
  auto decoded = learner::DecodeTrainingGroup(scored, shape);
  if (!decoded.ok()) {
    GROVE_FUZZ_CHECK(!decoded.status().message().empty());
    return;
  }
  // What the trainer relies on for a group that passed.
  const learner::TrainingGroup& g = decoded.value();
  GROVE_FUZZ_CHECK(!g.group_id.empty() && !g.prompt_tokens.empty() && !g.samples.empty());
  const size_t per_token = static_cast<size_t>(shape.moe_layers) * static_cast<size_t>(shape.top_k);
  for (int32_t t : g.prompt_tokens) GROVE_FUZZ_CHECK(t >= 0 && t < shape.vocab_size);
  GROVE_FUZZ_CHECK(g.prompt_routes.empty() || g.prompt_routes.size() == g.prompt_tokens.size() * per_token);
  for (uint16_t e : g.prompt_routes) GROVE_FUZZ_CHECK(e < shape.num_experts);
  for (const learner::TrainingSample& s : g.samples) {
    GROVE_FUZZ_CHECK(!s.tokens.empty());
    GROVE_FUZZ_CHECK(static_cast<int64_t>(g.prompt_tokens.size() + s.tokens.size()) <= shape.max_sequence);
    GROVE_FUZZ_CHECK(s.rollout_logprobs.size() == s.tokens.size());
    for (int32_t t : s.tokens) GROVE_FUZZ_CHECK(t >= 0 && t < shape.vocab_size);
    for (float lp : s.rollout_logprobs) GROVE_FUZZ_CHECK(std::isfinite(lp) && lp <= 0);
    GROVE_FUZZ_CHECK(s.routes.empty() || s.routes.size() == (s.tokens.size() - 1) * per_token);
    for (uint16_t e : s.routes) GROVE_FUZZ_CHECK(e < shape.num_experts);
    GROVE_FUZZ_CHECK(std::isfinite(s.reward));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  learner::GroupShape shape;
  shape.vocab_size = 1 + (data[0] & 0x3f);        // 1..64
  shape.moe_layers = (data[0] >> 6);              // 0..3
  shape.top_k = 1 + (data[1] & 3);                // 1..4
  shape.num_experts = shape.top_k + (data[1] >> 2 & 7);
  shape.max_sequence = 2 + (data[1] >> 5) * 8;    // 2..58

  grove::actors::DecodeLimits limits;
  limits.max_frame_bytes = 1 << 20;
  auto frame = grove::actors::DecodeFrame(data + 2, size - 2,
                                          {grove::actors::BodyKind::BATCH, grove::actors::BodyKind::SCORED_GROUP},
                                          nullptr, limits);
  if (!frame.ok()) return 0;
  auto body = frame.value().envelope().getBody();
  if (body.isScoredGroup()) {
    CheckGroup(body.getScoredGroup(), shape);
  } else {
    for (auto group : body.getBatch().getGroups()) CheckGroup(group, shape);
  }
  return 0;
}
