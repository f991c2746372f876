// The learner's step on a real (tiny) model: GRPO moves probability toward
// the better completion of a group, routing replay with the rollout's own
// log-probs starts at ratio 1, supervised warm-start lowers the loss, and a
// checkpoint restores the trainer exactly.
#include "learner/grpo_trainer.h"

#include <cmath>
#include <filesystem>
#include <functional>
#include <numeric>

#include <gtest/gtest.h>

#include "learner/micro_batches.h"
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

// `tweak` changes the options before Create (micro-batch bounds, AdamW's eps).
std::unique_ptr<GrpoTrainer> MakeTrainer(double lr, uint64_t seed = 7,
                                         const std::function<void(TrainerOptions&)>& tweak = {}) {
  auto m = model::Model::Create(TinyConfig(), seed);
  EXPECT_TRUE(m.ok());
  TrainerOptions o;
  o.grpo = GrpoPreset(GrpoVariant::kGrpo);
  o.grpo.loss.beta = 0.0;
  o.grpo.schedule.peak_lr = lr;
  o.grpo.optimizer.weight_decay = 0;
  o.micro_batch = 3;  // exercise accumulation across micro-batches
  if (tweak) tweak(o);
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

// Micro-batches bounded in tokens change only how the step's sums are
// split: each micro-batch's loss and gradient are normalized by the whole
// batch's tokens and sequences, so the step's loss, gradient norm and new
// weights are the unbounded step's up to fp32 summation order. Tolerances:
// the gradients are sums over micro-batches in another order (fp32, a few
// 1e-7 relative), loss and norm 1e-5 relative. AdamW's eps is 1e-3 here
// (both trainers), not 1e-8: a first Adam step moves each weight by
// ~lr * g / (|g| + eps), and at eps 1e-8 a gradient element that is zero
// up to rounding would move by +-lr on either sign of its rounding; at
// 1e-3 a rounding-sized difference in g moves a weight by ~lr * dg / eps,
// far below the 1e-6 the weights are compared to (the router bias moves by
// the expert loads, integer sums over the same tokens: exactly equal).
void ExpectSameWeights(const GrpoTrainer& a, const GrpoTrainer& b) {
  std::span<const float> pa = a.policy().params(), pb = b.policy().params();
  ASSERT_EQ(pa.size(), pb.size());
  double worst = 0;
  for (size_t i = 0; i < pa.size(); ++i) worst = std::max(worst, std::abs(double(pa[i]) - pb[i]));
  std::printf("worst weight difference %.3g\n", worst);
  EXPECT_LE(worst, 1e-6);
}

std::vector<int64_t> ScoredLengths(const std::vector<TrainingGroup>& groups) {
  std::vector<int64_t> lengths;
  for (const TrainingGroup& g : groups)
    for (const TrainingSample& s : g.samples) lengths.push_back(int64_t(g.prompt_tokens.size() + s.tokens.size()));
  return lengths;
}

TEST(GrpoTrainer, TokenBoundedMicroBatchesGiveTheSameStep) {
  auto with_bound = [](int64_t tokens) {
    return [tokens](TrainerOptions& o) {
      o.micro_batch = 5;
      o.micro_batch_tokens = tokens;
      o.grpo.optimizer.eps = 1e-3;
    };
  };
  auto a = MakeTrainer(3e-3, 5, with_bound(0));
  const std::vector<TrainingGroup> groups = {SampleGroup(*a, {1, 0, 0, 1}, 21), SampleGroup(*a, {0, 1, 1}, 22)};
  const std::vector<int64_t> lengths = ScoredLengths(groups);
  // A bound of about two sequences: micro-batches of 1-2 sequences instead
  // of 5 + 2, so the sums really are split otherwise.
  const int64_t bound = *std::max_element(lengths.begin(), lengths.end()) + 2;
  const auto unbounded_cut = CutMicroBatches(lengths, 5, 0), bounded_cut = CutMicroBatches(lengths, 5, bound);
  ASSERT_EQ(unbounded_cut.size(), 2u);
  ASSERT_GE(bounded_cut.size(), 4u) << "bound " << bound;
  auto b = MakeTrainer(3e-3, 5, with_bound(bound));
  EXPECT_EQ(a->micro_batch_tokens(), 0);
  EXPECT_EQ(b->micro_batch_tokens(), bound);
  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    Result<GrpoStepStats> sa = a->Step(groups);
    Result<GrpoStepStats> sb = b->Step(groups);
    ASSERT_TRUE(sa.ok() && sb.ok()) << sa.status() << sb.status();
    std::printf("loss %.9g vs %.9g, grad norm %.9g vs %.9g\n", sa->loss, sb->loss, sa->update.grad_norm,
                sb->update.grad_norm);
    ASSERT_GT(sa->update.grad_norm, 0);
    // The first step's loss is ~0 (ratio 1, zero-mean advantages): terms of
    // size ~|advantage| ~ 1 cancel, leaving fp32 noise of ~1e-8 absolute.
    EXPECT_NEAR(sb->loss, sa->loss, 1e-5 * std::abs(sa->loss) + 1e-6);
    EXPECT_NEAR(sb->update.grad_norm, sa->update.grad_norm, 1e-5 * sa->update.grad_norm);
    EXPECT_NEAR(sb->policy.kl_ref_k3_mean, sa->policy.kl_ref_k3_mean, 1e-6);
    EXPECT_EQ(sb->policy.num_tokens, sa->policy.num_tokens);
    EXPECT_EQ(sb->tokens, sa->tokens);
    ASSERT_NO_FATAL_FAILURE(ExpectSameWeights(*a, *b));
  }
  EXPECT_EQ(b->micro_batch_tokens(), bound);  // only running out of GPU memory lowers it
}

TEST(GrpoTrainer, TokenBoundedMicroBatchesGiveTheSameSupervisedStep) {
  model::CharTokenizer tok;
  std::vector<SupervisedExample> batch;
  std::vector<int64_t> lengths;
  for (const char* q : {"1+2=", "13+4=", "5+1=", "22+19=", "7+7="}) {
    SupervisedExample ex;
    ex.prompt = *model::EncodePrompt(tok, q);
    ex.completion = *model::EncodeCompletion(tok, std::string("<think>") + q + "</think><answer>3</answer>");
    lengths.push_back(int64_t(ex.prompt.size() + ex.completion.size()));
    batch.push_back(ex);
  }
  const int64_t bound = *std::max_element(lengths.begin(), lengths.end()) + 2;
  ASSERT_GE(CutMicroBatches(lengths, 4, bound).size(), 3u);
  ASSERT_EQ(CutMicroBatches(lengths, 4, 0).size(), 2u);
  auto opts = [](int64_t tokens) {
    return [tokens](TrainerOptions& o) {
      o.micro_batch = 4;
      o.micro_batch_tokens = tokens;
      o.grpo.optimizer.eps = 1e-3;
    };
  };
  auto a = MakeTrainer(1e-3, 9, opts(0));
  auto b = MakeTrainer(1e-3, 9, opts(bound));
  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    Result<SupervisedStepStats> sa = a->SupervisedStep(batch, 1e-2);
    Result<SupervisedStepStats> sb = b->SupervisedStep(batch, 1e-2);
    ASSERT_TRUE(sa.ok() && sb.ok()) << sa.status() << sb.status();
    std::printf("loss %.9g vs %.9g, grad norm %.9g vs %.9g\n", sa->loss, sb->loss, sa->update.grad_norm,
                sb->update.grad_norm);
    EXPECT_NEAR(sb->loss, sa->loss, 1e-5 * sa->loss);
    EXPECT_NEAR(sb->update.grad_norm, sa->update.grad_norm, 1e-5 * sa->update.grad_norm);
    EXPECT_DOUBLE_EQ(sb->confident_fraction, sa->confident_fraction);
    EXPECT_EQ(sb->tokens, sa->tokens);
    ASSERT_NO_FATAL_FAILURE(ExpectSameWeights(*a, *b));
  }
}

TEST(GrpoTrainer, NegativeTokenBoundIsRefused) {
  auto m = model::Model::Create(TinyConfig(), 1);
  ASSERT_TRUE(m.ok());
  TrainerOptions o;
  o.micro_batch_tokens = -1;
  auto t = GrpoTrainer::Create(std::move(*m), o);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("micro_batch_tokens"), std::string::npos) << t.status();
}

}  // namespace
}  // namespace grove::learner
