// The learner's step on a real (tiny) model: GRPO moves probability toward
// the better completion of a group, routing replay with the rollout's own
// log-probs starts at ratio 1, supervised warm-start lowers the loss, and a
// checkpoint restores the trainer exactly.
#include "learner/grpo_trainer.h"

#include <filesystem>
#include <numeric>

#include <gtest/gtest.h>

#include "model/prompt_format.h"
#include "model/tokenizer.h"

namespace grove::learner {
namespace {

model::ModelConfig TinyConfig() {
  model::ModelConfig c;
  c.vocab_size = 55;
  c.hidden = 32;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.head_dim = 16;
  c.max_seq_len = 64;
  c.dense_layers = 1;
  c.dense_hidden = 48;
  c.experts = 4;
  c.top_k = 2;
  c.shared_experts = 1;
  c.expert_hidden = 24;
  c.score_func = model::ScoreFunc::kSigmoid;
  c.norm_topk = true;
  EXPECT_TRUE(c.Validate().ok());
  return c;
}

std::unique_ptr<GrpoTrainer> MakeTrainer(double lr, uint64_t seed = 7) {
  auto m = model::Model::Create(TinyConfig(), seed);
  EXPECT_TRUE(m.ok());
  TrainerOptions o;
  o.grpo = GrpoPreset(GrpoVariant::kGrpo);
  o.grpo.loss.beta = 0.0;
  o.grpo.schedule.peak_lr = lr;
  o.grpo.optimizer.weight_decay = 0;
  o.micro_batch = 3;  // exercise accumulation across micro-batches
  auto t = GrpoTrainer::Create(std::move(*m), o);
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(*t);
}

// A group sampled from the trainer's own policy, as a rollout worker would
// send it (tokens, log-probs and routes from Generate), with given rewards.
TrainingGroup SampleGroup(GrpoTrainer& t, const std::vector<double>& rewards, uint64_t seed) {
  model::CharTokenizer tok;
  TrainingGroup g;
  g.group_id = "g" + std::to_string(seed);
  g.prompt_tokens = *model::EncodePrompt(tok, "12+7=");
  model::SamplingOptions so;
  so.seed = seed;
  so.max_new_tokens = 6;
  std::vector<std::vector<int32_t>> prompts(rewards.size(), g.prompt_tokens);
  auto comps = t.policy().Generate(prompts, so);
  EXPECT_TRUE(comps.ok());
  const size_t row = static_cast<size_t>(t.policy().config().moe_layers() * t.policy().config().top_k);
  g.prompt_routes.assign((*comps)[0].routes.begin(), (*comps)[0].routes.begin() + row * g.prompt_tokens.size());
  for (size_t i = 0; i < rewards.size(); ++i) {
    const auto& c = (*comps)[i];
    TrainingSample s;
    s.tokens = c.tokens;
    s.rollout_logprobs = c.logprobs;
    s.routes.assign(c.routes.begin() + row * g.prompt_tokens.size(), c.routes.end());
    s.reward = rewards[i];
    s.policy_version = t.version();
    g.samples.push_back(std::move(s));
  }
  return g;
}

double SeqLogProb(GrpoTrainer& t, const TrainingGroup& g, size_t i) {
  model::ScoreRequest r;
  r.tokens = g.prompt_tokens;
  r.tokens.insert(r.tokens.end(), g.samples[i].tokens.begin(), g.samples[i].tokens.end());
  r.score_from = static_cast<int64_t>(g.prompt_tokens.size());
  auto res = t.policy().Score({r}, false);
  EXPECT_TRUE(res.ok());
  return std::accumulate(res->logprobs[0].begin(), res->logprobs[0].end(), 0.0);
}

TEST(GrpoTrainer, OwnSamplesStartOnPolicyAndRewardedOnesGainProbability) {
  auto t = MakeTrainer(3e-3);
  TrainingGroup g = SampleGroup(*t, {1, 0, 0, 1}, 11);
  std::vector<double> before;
  for (size_t i = 0; i < 4; ++i) before.push_back(SeqLogProb(*t, g, i));
  Result<GrpoStepStats> st = t->Step({g});
  ASSERT_TRUE(st.ok()) << st.status();
  // Replayed routes and the same weights: the learner's log-probs equal the
  // rollout's, so the mismatch is float rounding and nothing is capped.
  EXPECT_LT(std::fabs(st->policy.mismatch_log_ratio_mean), 1e-4);
  EXPECT_EQ(st->policy.tis_capped_frac, 0.0);
  EXPECT_NEAR(st->policy.ratio_mean, 1.0, 1e-6);
  EXPECT_EQ(st->version, 1);
  EXPECT_EQ(st->sequences, 4);
  EXPECT_DOUBLE_EQ(st->reward_mean, 0.5);
  EXPECT_GT(st->update.grad_norm, 0);
  for (size_t i = 0; i < 4; ++i) {
    const double after = SeqLogProb(*t, g, i);
    if (g.samples[i].reward > 0.5) {
      EXPECT_GT(after, before[i]) << "rewarded sample " << i;
    } else {
      EXPECT_LT(after, before[i]) << "unrewarded sample " << i;
    }
  }
}

TEST(GrpoTrainer, AllEqualGroupsCarryNoGradient) {
  auto t = MakeTrainer(1e-2);
  TrainingGroup g = SampleGroup(*t, {1, 1, 1}, 5);
  std::vector<float> before(t->policy().params().begin(), t->policy().params().end());
  Result<GrpoStepStats> st = t->Step({g});
  ASSERT_TRUE(st.ok());
  // Zero advantages, no KL: the gradient is exactly zero and AdamW moves no
  // trainable weight (weight decay is off in this test). Only the router
  // biases move: aux-loss-free balancing steers by load, not by gradient.
  EXPECT_EQ(st->update.grad_norm, 0.0);
  int64_t bias_moved = 0;
  for (const model::TensorInfo& ti : t->policy().layout().tensors()) {
    for (int64_t i = ti.offset; i < ti.offset + ti.numel; ++i) {
      if (ti.trainable) {
        ASSERT_EQ(before[i], t->policy().params()[i]) << ti.name;
      } else {
        bias_moved += before[i] != t->policy().params()[i];
      }
    }
  }
  EXPECT_GT(bias_moved, 0);
}

TEST(GrpoTrainer, SupervisedStepsLowerTheLoss) {
  auto t = MakeTrainer(1e-3);
  model::CharTokenizer tok;
  std::vector<SupervisedExample> batch;
  for (const char* q : {"1+2=", "3+4=", "5+1="}) {
    SupervisedExample ex;
    ex.prompt = *model::EncodePrompt(tok, q);
    ex.completion = *model::EncodeCompletion(tok, "<think>sum</think><answer>3</answer>");
    batch.push_back(ex);
  }
  double first = 0, last = 0;
  for (int i = 0; i < 30; ++i) {
    Result<SupervisedStepStats> st = t->SupervisedStep(batch, 1e-2);
    ASSERT_TRUE(st.ok()) << st.status();
    if (i == 0) first = st->loss;
    last = st->loss;
  }
  EXPECT_LT(last, 0.5 * first);
}

TEST(GrpoTrainer, CheckpointRestoresEverything) {
  auto a = MakeTrainer(3e-3, 1);
  ASSERT_TRUE(a->Step({SampleGroup(*a, {1, 0}, 3)}).ok());
  ASSERT_TRUE(a->Step({SampleGroup(*a, {0, 1}, 4)}).ok());
  const std::string dir = (std::filesystem::temp_directory_path() / "grove_trainer_ckpt").string();
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(a->SaveCheckpoint(dir).ok());
  auto b = MakeTrainer(3e-3, 99);  // different initial weights
  ASSERT_TRUE(b->LoadCheckpoint(dir).ok());
  EXPECT_EQ(b->version(), 2);
  EXPECT_EQ(b->rl_steps(), 2);
  for (size_t i = 0; i < a->policy().params().size(); ++i)
    ASSERT_EQ(a->policy().params()[i], b->policy().params()[i]) << i;
  // The same next step from both gives the same weights: optimizer state and
  // reference came back too.
  TrainingGroup g = SampleGroup(*a, {1, 0, 1}, 8);
  ASSERT_TRUE(a->Step({g}).ok());
  ASSERT_TRUE(b->Step({g}).ok());
  for (size_t i = 0; i < a->policy().params().size(); ++i)
    ASSERT_EQ(a->policy().params()[i], b->policy().params()[i]) << i;
  // A checkpoint that is not there is a clear error.
  EXPECT_FALSE(b->LoadCheckpoint(dir + "-missing").ok());
}

}  // namespace
}  // namespace grove::learner
