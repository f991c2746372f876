#include "learner/training_group.h"

#include <capnp/message.h>
#include <gtest/gtest.h>

#include <cmath>

namespace grove::learner {
namespace {

const GroupShape kShape{/*vocab*/ 50, /*moe_layers*/ 2, /*top_k*/ 2, /*experts*/ 4, /*max_seq*/ 64};

void FillValid(wire::ScoredGroup::Builder sg) {
  auto g = sg.initGroup();
  g.setGroupId("r0:7:0");
  g.getPrompt().setId(7);
  g.getPrompt().setTask("arithmetic");
  g.setPolicyVersion(3);
  auto pt = g.initPromptTokens(3);
  for (int i = 0; i < 3; ++i) pt.set(i, 10 + i);
  auto pr = g.initPromptRoutedExperts(3 * 2 * 2);
  for (uint32_t i = 0; i < pr.size(); ++i) pr.set(i, i % 4);
  auto samples = g.initSamples(2);
  auto rewards = sg.initRewards(2);
  for (int s = 0; s < 2; ++s) {
    auto smp = samples[s];
    auto tok = smp.initTokens(2);
    tok.set(0, 5);
    tok.set(1, 6);
    auto lp = smp.initLogprobs(2);
    lp.set(0, -0.5f);
    lp.set(1, -1.5f);
    auto re = smp.initRoutedExperts(1 * 2 * 2);  // the last token has no route
    for (uint32_t i = 0; i < re.size(); ++i) re.set(i, 3 - i % 4);
    smp.setPolicyVersion(3);
    smp.setFinish(s == 1 ? wire::FinishReason::LENGTH : wire::FinishReason::STOP);
    rewards[s].setTotal(s == 0 ? 1.0 : 0.0);
  }
}

TEST(TrainingGroup, DecodesValidGroup) {
  capnp::MallocMessageBuilder mb;
  auto sg = mb.initRoot<wire::ScoredGroup>();
  FillValid(sg);
  Result<TrainingGroup> g = DecodeTrainingGroup(sg.asReader(), kShape);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->group_id, "r0:7:0");
  EXPECT_EQ(g->prompt_tokens, (std::vector<int32_t>{10, 11, 12}));
  EXPECT_EQ(g->prompt_routes.size(), 12u);
  ASSERT_EQ(g->samples.size(), 2u);
  EXPECT_EQ(g->samples[0].reward, 1.0);
  EXPECT_FALSE(g->samples[0].truncated);
  EXPECT_TRUE(g->samples[1].truncated);
  EXPECT_EQ(g->samples[1].rollout_logprobs[1], -1.5f);
  EXPECT_EQ(g->samples[1].routes[0], 3);
}

// Each mutation makes the group invalid; each must be refused with a reason.
TEST(TrainingGroup, RefusesHostileGroups) {
  std::vector<std::pair<const char*, std::function<void(wire::ScoredGroup::Builder)>>> cases = {
      {"vocabulary", [](auto sg) { sg.getGroup().getSamples()[0].getTokens().set(0, 50); }},
      {"vocabulary", [](auto sg) { sg.getGroup().getPromptTokens().set(0, -1); }},
      {"log-probs for", [](auto sg) { sg.getGroup().getSamples()[0].initLogprobs(1); }},
      {"invalid log-prob", [](auto sg) { sg.getGroup().getSamples()[1].getLogprobs().set(0, NAN); }},
      {"invalid log-prob", [](auto sg) { sg.getGroup().getSamples()[1].getLogprobs().set(0, 0.5f); }},
      {"routed experts", [](auto sg) { sg.getGroup().getSamples()[0].initRoutedExperts(8); }},
      {"routes to expert", [](auto sg) { sg.getGroup().getPromptRoutedExperts().set(0, 4); }},
      {"rewards for", [](auto sg) { sg.initRewards(1); }},
      {"non-finite reward", [](auto sg) { sg.getRewards()[0].setTotal(INFINITY); }},
      {"without an id", [](auto sg) { sg.getGroup().setGroupId(""); }},
      {"no samples", [](auto sg) { sg.getGroup().initSamples(0); sg.initRewards(0); }},
      {"maximum sequence", [](auto sg) { sg.getGroup().getSamples()[0].initTokens(62); sg.getGroup().getSamples()[0].initLogprobs(62); sg.getGroup().getSamples()[0].initRoutedExperts(0); }},
  };
  for (auto& [want, mutate] : cases) {
    capnp::MallocMessageBuilder mb;
    auto sg = mb.initRoot<wire::ScoredGroup>();
    FillValid(sg);
    mutate(sg);
    Result<TrainingGroup> g = DecodeTrainingGroup(sg.asReader(), kShape);
    ASSERT_FALSE(g.ok()) << want;
    EXPECT_NE(g.status().message().find(want), std::string::npos) << g.status();
  }
}

}  // namespace
}  // namespace grove::learner
