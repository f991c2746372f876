// A GRPO step that runs out of GPU memory is redone with token-bounded
// micro-batches (GrpoTrainer::RunMicroBatches) and gives the step it would
// have given with memory to spare; when one sequence alone does not fit,
// the step fails with ResourceExhausted naming what to change. Skips
// without a GPU.
//
// The test takes memory away with filler allocations sized from what a
// first step's activations measurably took (cudaMemGetInfo before and
// after it): the big micro-batch (every sequence) then cannot grow its
// buffers, and half of it can.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "learner/grpo_trainer.h"
#include "tests/learner_gpu/gpu_trainer_util.h"
#include "model/config.h"
#include "model/gpu_transformer.h"

namespace grove::learner {
namespace {

size_t FreeBytes() {
  size_t free_bytes = 0, total = 0;
  EXPECT_EQ(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
  return free_bytes;
}

// Device memory taken until about `leave` bytes are free, in blocks (one
// block of all of it may not be there in one piece); freed on destruction.
class Filler {
 public:
  explicit Filler(size_t leave) {
    size_t block = size_t(1) << 30;
    while (block >= (size_t(2) << 20)) {
      const size_t free_bytes = FreeBytes();
      if (free_bytes <= leave + (size_t(2) << 20)) break;
      const size_t want = std::min(block, free_bytes - leave);
      void* p = nullptr;
      if (cudaMalloc(&p, want) == cudaSuccess) {
        blocks_.push_back(p);
      } else {
        cudaGetLastError();  // not left for the step's launch checks
        block /= 2;
      }
    }
  }
  ~Filler() {
    for (void* p : blocks_) cudaFree(p);
  }

 private:
  std::vector<void*> blocks_;
};

// A model whose activations for a few thousand tokens are large next to
// cudaMalloc's 2 MiB granularity (~100 KB per token in the policy's tape,
// the reference's forward and the backward's workspaces): 32 sequences of
// ~700 tokens need ~2 GB.
model::ModelConfig BigActivationConfig() {
  model::ModelConfig c = testing::SmallMoeConfig();
  c.hidden = 512;
  c.layers = 4;
  c.heads = 8;
  c.kv_heads = 4;
  c.head_dim = 64;
  c.max_seq_len = 1024;
  c.dense_hidden = 1024;
  c.expert_hidden = 512;
  return c;
}

// 8 groups of 4, prompts of 64 tokens, completions of 500-899, rollout
// log-probs near a uniform model's (noise 0.3) so TIS makes the loss depend
// on the scored log-probs.
std::vector<TrainingGroup> Groups(const model::ModelConfig& c, uint64_t seed) {
  testing::GroupShape shape;
  shape.groups = 8;
  shape.samples = 4;
  shape.prompt_tokens = 64;
  shape.min_completion = 500;
  shape.completion_spread = 400;
  shape.reward_levels = 3;
  shape.logprob_noise = 0.3f;
  return testing::RandomGroups(c, seed, shape);
}

std::unique_ptr<GrpoTrainer> MakeGpuTrainer(const model::ModelConfig& c, uint64_t seed) {
  TrainerOptions opt = testing::GpuTrainerOptions();
  opt.micro_batch = 64;  // every sequence in one micro-batch, unless memory runs out
  // Truncated IS against the rollout's log-probs: without it the first
  // step's loss is -mean(advantage) (ratio 1, reference = policy), the same
  // however the log-probs came out; with it the loss weighs every token by
  // exp(logp - rollout_logp).
  opt.grpo.loss.tis_cap = 2.0;
  return testing::MakeGpuTrainer(c, seed, opt);
}

// Tolerances: the two steps score the same sequences in other micro-batches
// (one of 32 sequences against two of ~16): cuBLAS may take other GEMM
// algorithms for the other row counts, whose fp32 sums round to other bf16
// activations (2^-9 relative each), so log-probs, and the gradients summed
// over tokens, differ by bf16 noise, not by fp32 rounding. The loss's
// per-micro-batch parts are normalized by the whole batch's totals either
// way. Loss and gradient norm: 1e-2 relative (the CPU-against-GPU step in
// gpu_step_test.cc, a larger difference, holds 2e-2).
TEST(GpuOutOfMemory, StepIsRedoneWithHalfTheTokensAndGivesTheSameStep) {
  if (model::GpuTransformer::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  const model::ModelConfig c = BigActivationConfig();
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  const std::vector<TrainingGroup> groups = Groups(c, 17);
  int64_t tokens = 0;
  for (const TrainingGroup& g : groups)
    for (const TrainingSample& s : g.samples) tokens += int64_t(g.prompt_tokens.size() + s.tokens.size());

  // With memory to spare: one micro-batch of every sequence.
  double want_loss = 0, want_norm = 0;
  size_t need = 0;  // what that micro-batch's buffers took
  {
    std::unique_ptr<GrpoTrainer> a = MakeGpuTrainer(c, 5);
    ASSERT_NE(a, nullptr);
    const size_t before = FreeBytes();
    auto st = a->Step(groups);
    ASSERT_TRUE(st.ok()) << st.status();
    need = before - FreeBytes();
    want_loss = st->loss;
    want_norm = st->update.grad_norm;
    EXPECT_EQ(a->micro_batch_tokens(), 0);
    std::printf("one micro-batch of %lld tokens: loss %.6g, grad norm %.6g, activations %.1f MiB\n",
                static_cast<long long>(tokens), want_loss, want_norm, need / 1048576.0);
  }
  ASSERT_GT(need, size_t(512) << 20) << "too little to measure against cudaMalloc's granularity";

  // Three quarters of that free: the big micro-batch cannot grow, half fits.
  {
    std::unique_ptr<GrpoTrainer> b = MakeGpuTrainer(c, 5);
    ASSERT_NE(b, nullptr);
    Filler filler(need * 3 / 4);
    std::printf("free for the step: %.1f MiB\n", FreeBytes() / 1048576.0);
    auto st = b->Step(groups);
    ASSERT_TRUE(st.ok()) << st.status();
    std::printf("after the retry: micro_batch_tokens %lld, loss %.6g, grad norm %.6g\n",
                static_cast<long long>(b->micro_batch_tokens()), st->loss, st->update.grad_norm);
    EXPECT_EQ(b->micro_batch_tokens(), tokens / 2);
    EXPECT_NEAR(st->loss, want_loss, 1e-2 * std::abs(want_loss) + 1e-4);
    EXPECT_NEAR(st->update.grad_norm, want_norm, 1e-2 * want_norm);
    EXPECT_EQ(st->version, 1);
    EXPECT_EQ(b->rl_steps(), 1);  // one update, not one per attempt
    // The lowered bound stays: the next step fits without another retry.
    auto next = b->Step(groups);
    ASSERT_TRUE(next.ok()) << next.status();
    EXPECT_EQ(b->micro_batch_tokens(), tokens / 2);
    EXPECT_EQ(b->rl_steps(), 2);
  }

  // Almost nothing free: no sequence fits alone, and the error says what to do.
  {
    std::unique_ptr<GrpoTrainer> d = MakeGpuTrainer(c, 5);
    ASSERT_NE(d, nullptr);
    Filler filler(size_t(4) << 20);
    auto st = d->Step(groups);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.status().code(), StatusCode::kResourceExhausted) << st.status();
    EXPECT_NE(st.status().message().find("kv_memory_fraction"), std::string::npos) << st.status();
    std::printf("with almost nothing free: %s\n", st.status().ToString().c_str());
    EXPECT_EQ(d->rl_steps(), 0);
    EXPECT_EQ(d->version(), 0);
  }
}

}  // namespace
}  // namespace grove::learner
