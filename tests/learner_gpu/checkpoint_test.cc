// A learner whose step runs on the GPU saves and restores the same
// checkpoint as on the CPU: weights, the GRPO moments, the step count and
// version (also in the files' metadata), and the reference. Skips without a
// GPU.
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "learner/grpo_trainer.h"
#include "tests/learner_gpu/gpu_trainer_util.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/gpu_transformer.h"

namespace grove::learner {
namespace {

// After a restore, the next step from both trainers must agree to the
// GPU's run-to-run noise (the same kernels on the same inputs; reductions
// with atomics may sum in another order: fp32 rounding, ~1e-7 of a weight).
// A lost optimizer state moves weights by ~lr = 1e-3 (Adam's first step from
// zero moments is ~lr * sign(g)), a lost reference changes the KL term's
// gradient: both far above 1e-6 of the largest weight.
TEST(GpuCheckpoint, RestoresWeightsMomentsStepsAndReference) {
  if (model::GpuTransformer::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  const model::ModelConfig c = testing::SmallMoeConfig();
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  std::unique_ptr<GrpoTrainer> a = testing::MakeGpuTrainer(c, 5);
  ASSERT_NE(a, nullptr);
  ASSERT_TRUE(a->on_gpu());
  a->FreezeReference();
  ASSERT_TRUE(a->Step(testing::RandomGroups(c, 1)).ok());
  ASSERT_TRUE(a->Step(testing::RandomGroups(c, 2)).ok());
  ASSERT_EQ(a->rl_steps(), 2);

  const std::string dir =
      (std::filesystem::temp_directory_path() / ("grove_gpu_ckpt_" + std::to_string(getpid()))).string();
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(a->SaveCheckpoint(dir).ok());
  auto meta = model::ReadMetadata(dir + "/model.safetensors");
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ((*meta)["rl_steps"], "2");  // the GPU's count, not the idle host optimizer's
  EXPECT_EQ((*meta)["version"], "2");

  std::unique_ptr<GrpoTrainer> b = testing::MakeGpuTrainer(c, 99);  // other initial weights
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(b->LoadCheckpoint(dir).ok());
  EXPECT_EQ(b->version(), 2);
  EXPECT_EQ(b->rl_steps(), 2);
  const std::span<const float> host = a->policy().params();  // synced by SaveCheckpoint
  const std::vector<float> pa(host.begin(), host.end());
  std::vector<float> pb(pa.size());
  ASSERT_TRUE(b->CopyParams(pb).ok());  // what the restored GPU step starts from
  for (size_t i = 0; i < pa.size(); ++i) ASSERT_EQ(pa[i], pb[i]) << i;

  const std::vector<TrainingGroup> next = testing::RandomGroups(c, 3);
  ASSERT_TRUE(a->Step(next).ok());
  ASSERT_TRUE(b->Step(next).ok());
  std::vector<float> na(pa.size()), nb(pa.size());
  ASSERT_TRUE(a->CopyParams(na).ok());
  ASSERT_TRUE(b->CopyParams(nb).ok());
  double worst = 0, largest = 0, moved = 0;
  for (size_t i = 0; i < na.size(); ++i) {
    worst = std::max(worst, double(std::abs(na[i] - nb[i])));
    largest = std::max(largest, double(std::abs(na[i])));
    moved = std::max(moved, double(std::abs(na[i] - pa[i])));
  }
  std::printf("next step after restore: max |a - b| %.3g, max |weight| %.3g, max step %.3g\n", worst, largest,
              moved);
  EXPECT_GT(moved, 1e-4);  // the step did move the weights
  EXPECT_LE(worst, 1e-6 * largest);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace grove::learner
