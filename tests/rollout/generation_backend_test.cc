#include "rollout/generation_backend.h"

#include <cstdio>
#include <cstdlib>
#include <random>

#include <gtest/gtest.h>

#include "learner/learner_actor.h"
#include "rollout/rollout_actor.h"
#include "rollout/sampled_mismatch.h"

namespace grove::rollout {
namespace {

std::string SourcePath(const std::string& rel) {
  const char* root = std::getenv("GROVE_SOURCE_DIR");
  return std::string(root ? root : ".") + "/" + rel;
}

Result<BackendSettings> Parse(const std::string& toml) {
  GROVE_ASSIGN_OR_RETURN(Config c, Config::Parse(toml, "test.toml"));
  return ParseBackendSettings(c.Section("rollout"));
}

TEST(BackendSettings, ParsesAndRejectsBadValues) {
  auto d = Parse("[rollout]\n");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->device, RolloutDevice::kAuto);
  EXPECT_EQ(d->gpu, -1);
  EXPECT_EQ(d->max_batch, 128);
  auto g = Parse(
      "[rollout]\ndevice = \"gpu\"\ngpu = 1\nmax_batch = 64\nkv_memory_fraction = 0.2\ncuda_graphs = false\n");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->device, RolloutDevice::kGpu);
  EXPECT_EQ(g->gpu, 1);
  EXPECT_EQ(g->max_batch, 64);
  EXPECT_DOUBLE_EQ(g->kv_memory_fraction, 0.2);
  EXPECT_FALSE(g->cuda_graphs);
  EXPECT_EQ(Parse("[rollout]\ndevice = \"cpu\"\n")->device, RolloutDevice::kCpu);
  auto bad = Parse("[rollout]\ndevice = \"tpu\"\n");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().ToString().find("tpu"), std::string::npos);
  EXPECT_NE(bad.status().ToString().find("test.toml"), std::string::npos);
  EXPECT_FALSE(Parse("[rollout]\ngpu = -2\n").ok());
  EXPECT_FALSE(Parse("[rollout]\nmax_batch = 0\n").ok());
  EXPECT_FALSE(Parse("[rollout]\nkv_memory_fraction = 1.0\n").ok());
  EXPECT_FALSE(Parse("[rollout]\nkv_memory_fraction = 0\n").ok());
}

TEST(PickGpu, ExplicitIndexOrWorkerIndexModuloCount) {
  EXPECT_EQ(*PickGpu(1, "rollout-0", 2), 1);
  EXPECT_EQ(PickGpu(2, "rollout-0", 2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*PickGpu(-1, "rollout-0", 4), 0);
  EXPECT_EQ(*PickGpu(-1, "rollout-3", 4), 3);
  EXPECT_EQ(*PickGpu(-1, "rollout-5", 4), 1);
  EXPECT_EQ(*PickGpu(-1, "rollout-13", 8), 5);
  EXPECT_EQ(*PickGpu(-1, "worker", 3), 0);  // no index: the first
  EXPECT_EQ(PickGpu(-1, "rollout-1", 0).status().code(), StatusCode::kFailedPrecondition);
}

model::ModelConfig Tiny() {
  auto c = model::ModelConfig::LoadFile(SourcePath("configs/model/tiny.toml"));
  EXPECT_TRUE(c.ok());
  return *c;
}

std::unique_ptr<PolicyQuantizer> Int8() {
  QuantizeSettings s;
  s.mode = QuantizeMode::kInt8;
  return std::make_unique<PolicyQuantizer>(s, std::vector<std::vector<int32_t>>{}, 2);
}

// The CPU engine samples exactly what the model holding the quantizer's
// round trip samples.
TEST(GenerationBackend, CpuEngineSamplesTheQuantizedModel) {
  const model::ModelConfig c = Tiny();
  BackendSettings s;
  s.device = RolloutDevice::kCpu;
  auto engine = MakeGenerationBackend(s, c, "rollout-0", Int8());
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->name(), "cpu");
  EXPECT_EQ((*engine)->gpu(), -1);
  EXPECT_FALSE((*engine)->joins_groups());

  auto ref = model::Model::Create(c, 7);
  ASSERT_TRUE(ref.ok());
  std::vector<actors::TensorSpec> specs;
  for (const auto& t : (*ref)->layout().tensors())
    specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  std::vector<float> flat((*ref)->params().begin(), (*ref)->params().end());
  ASSERT_TRUE((*engine)->Install(3, specs, flat).ok());
  EXPECT_GT((*engine)->quantizer().report().tensors_quantized, 0);

  std::vector<float> want((*ref)->params().begin(), (*ref)->params().end());
  QuantizeInPlace(specs, want, [](const actors::TensorSpec& t) -> std::optional<PrecisionFormat> {
    return IsQuantizedTensor(t) ? std::optional(PrecisionFormat::kInt8) : std::nullopt;
  });
  std::copy(want.begin(), want.end(), (*ref)->params().begin());

  std::vector<std::vector<int32_t>> prompts(4, std::vector<int32_t>{3, 9, 14, 20});
  model::SamplingOptions so;
  so.temperature = 1.0;
  so.seed = 11;
  so.max_new_tokens = 12;
  auto got = (*engine)->Generate(prompts, so);
  auto expect = (*ref)->Generate(prompts, so);
  ASSERT_TRUE(got.ok() && expect.ok());
  ASSERT_EQ(got->size(), 4u);
  for (size_t i = 0; i < got->size(); ++i) {
    EXPECT_EQ((*got)[i].tokens, (*expect)[i].tokens);
    EXPECT_EQ((*got)[i].logprobs, (*expect)[i].logprobs);
    EXPECT_EQ((*got)[i].routes, (*expect)[i].routes);
  }
}

TEST(GenerationBackend, GpuAskedForWithoutOneIsAClearErrorAutoFallsBack) {
  if (GenerationGpuCount() > 0) GTEST_SKIP() << "a GPU engine is present: the CPU-only rule does not apply";
  const model::ModelConfig c = Tiny();
  BackendSettings s;
  s.device = RolloutDevice::kGpu;
  auto gpu = MakeGenerationBackend(s, c, "rollout-0", Int8());
  ASSERT_FALSE(gpu.ok());
  EXPECT_EQ(gpu.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(gpu.status().ToString().find("rollout.device = gpu"), std::string::npos) << gpu.status();
  s.device = RolloutDevice::kAuto;
  auto fallback = MakeGenerationBackend(s, c, "rollout-0", Int8());
  ASSERT_TRUE(fallback.ok()) << fallback.status();
  EXPECT_EQ((*fallback)->name(), "cpu");
}

// The GPU engine behind the worker, on the model of configs/gpu-1-small.toml:
// the engine accepts that shape, takes the quantizer's per-tensor choice,
// and samples well-formed groups close to the full-precision policy.
TEST(GenerationBackend, GpuEngineInstallsTheQuantizersChoiceAndSamples) {
  if (GenerationGpuCount() == 0) GTEST_SKIP() << "no GPU engine here";
  auto cfg = Config::LoadFile(SourcePath("configs/gpu-1-small.toml"));
  ASSERT_TRUE(cfg.ok());
  auto mc = model::ModelConfig::FromConfig(cfg->Section("model"));
  ASSERT_TRUE(mc.ok());
  auto ref = model::Model::Create(*mc, 5);
  ASSERT_TRUE(ref.ok());
  std::vector<actors::TensorSpec> specs;
  for (const auto& t : (*ref)->layout().tensors())
    specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  std::vector<std::vector<int32_t>> prompts(8, std::vector<int32_t>{3, 9, 14, 20, 7, 1});
  for (QuantizeMode mode : {QuantizeMode::kInt8, QuantizeMode::kPlan}) {
    BackendSettings s;
    s.device = RolloutDevice::kGpu;
    s.max_batch = 16;
    s.kv_memory_fraction = 0.05;  // the model is tiny; leave the GPU to the rest
    QuantizeSettings q;
    q.mode = mode;
    q.plan_max_new_tokens = 8;
    auto engine = MakeGenerationBackend(
        s, *mc, "rollout-0", std::make_unique<PolicyQuantizer>(q, std::vector<std::vector<int32_t>>{{3, 9, 14}}, 2));
    ASSERT_TRUE(engine.ok()) << engine.status();
    EXPECT_EQ((*engine)->name(), "gpu 0");
    EXPECT_EQ((*engine)->gpu(), 0);
    EXPECT_TRUE((*engine)->joins_groups());
    std::vector<float> flat((*ref)->params().begin(), (*ref)->params().end());
    ASSERT_TRUE((*engine)->Install(1, specs, flat).ok());
    EXPECT_TRUE(std::equal(flat.begin(), flat.end(), (*ref)->params().begin()));  // quantized on the device
    EXPECT_GT((*engine)->last_device_load_seconds(), 0.0);
    EXPECT_LT((*engine)->quantizer().report().bits_per_weight, 32.0);
    if (mode == QuantizeMode::kPlan) {
      EXPECT_EQ((*engine)->quantizer().plans_made(), 1);
      // Measured on the GPU (gpu_precision_plan.h), not on a CPU copy.
      ASSERT_NE((*engine)->quantizer().measurer(), nullptr);
      EXPECT_EQ((*engine)->quantizer().measurer()->where(), "GPU 0");
      EXPECT_GT((*engine)->quantizer().mismatch().tokens, 0);
      std::printf("plan on %s: %s in %.3f s\n", (*engine)->quantizer().measurer()->where().c_str(),
                  (*engine)->quantizer().plan()->Summary().c_str(), (*engine)->quantizer().plan_seconds());
    }

    model::SamplingOptions so;
    so.seed = 3;
    so.max_new_tokens = 16;
    auto got = (*engine)->Generate(prompts, so);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), prompts.size());
    const size_t row = size_t(mc->moe_layers() * mc->top_k);
    for (const auto& c : *got) {
      ASSERT_FALSE(c.tokens.empty());
      EXPECT_LE(c.tokens.size(), 16u);
      EXPECT_EQ(c.logprobs.size(), c.tokens.size());
      EXPECT_EQ(c.routes.size(), (prompts[0].size() + c.tokens.size() - 1) * row);
      for (int32_t t : c.tokens) EXPECT_TRUE(t >= 0 && t < mc->vocab_size);
    }
    // Against the full-precision CPU policy on the same tokens. The engine
    // rounds activations to bf16 (~0.01 on these logits, gpu_generator_test)
    // and its weights to int8 (~0.4% relative): a few 1e-2 per token; a
    // near-tied router of a random model may flip one row's experts, which
    // moves that token more, hence the loose max and a mean-square bound.
    auto reqs = ScoreRequestsFor(prompts, *got);
    ASSERT_TRUE(reqs.ok());
    auto score = (*ref)->Score(*reqs, false);
    ASSERT_TRUE(score.ok());
    auto m = CompareSampledTokens(prompts, *got, *score, mc->moe_layers(), mc->top_k);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_LT(m->mean_sq_diff, 1e-2) << int(mode);
    EXPECT_LT(m->max_abs_diff, 0.5) << int(mode);
  }
}

// The GPU default runs' configs: every role's settings parse and validate
// here; whether their GPUs exist only where there are GPUs.
class GpuConfigs : public ::testing::TestWithParam<const char*> {};

TEST_P(GpuConfigs, ParseAndValidate) {
  auto cfg = Config::LoadFile(SourcePath(GetParam()));
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  Status rollout = ValidateRolloutConfig(*cfg, /*check_device=*/false);
  EXPECT_TRUE(rollout.ok()) << rollout;
  Status learner = learner::ValidateLearnerConfig(*cfg, /*check_device=*/false);
  EXPECT_TRUE(learner.ok()) << learner;
  auto b = ParseBackendSettings(cfg->Section("rollout"));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->device, RolloutDevice::kGpu);
  auto mc = model::ModelConfig::FromConfig(cfg->Section("model"));
  ASSERT_TRUE(mc.ok()) << mc.status();
  // The GPU kernels' shape rules that a config can break (kernels/attention,
  // quant_linear: head_dim 32, 64 or 128, widths multiples of 8, int4 groups of
  // 128 along every input width).
  EXPECT_TRUE(mc->head_dim == 32 || mc->head_dim == 64 || mc->head_dim == 128);
  for (int64_t w : {mc->hidden, mc->vocab_size, mc->dense_hidden, mc->expert_hidden}) EXPECT_EQ(w % 8, 0) << w;
  for (int64_t k : {mc->hidden, mc->dense_hidden, mc->expert_hidden}) EXPECT_EQ(k % 128, 0) << k;

  Status device = ValidateRolloutConfig(*cfg, /*check_device=*/true);
  if (GenerationGpuCount() == 0) {
    EXPECT_EQ(device.code(), StatusCode::kFailedPrecondition) << device;
    EXPECT_NE(device.ToString().find("rollout.device = gpu"), std::string::npos) << device;
    // `grove up` refuses it before starting a process, saying why.
    const char* bin = std::getenv("GROVE_BIN");
    if (bin != nullptr) {
      const std::string dir = ::testing::TempDir() + "grove_gpu_configs_up";
      const std::string cmd = std::string(bin) + "/grove up --config " + SourcePath(GetParam()) + " --runs_dir " +
                              dir + " 2>&1";
      std::string out;
      FILE* p = popen(cmd.c_str(), "r");
      ASSERT_NE(p, nullptr);
      char buf[512];
      while (fgets(buf, sizeof buf, p) != nullptr) out += buf;
      const int rc = pclose(p);
      EXPECT_NE(rc, 0) << out;
      EXPECT_NE(out.find("device = gpu"), std::string::npos) << out;
      EXPECT_EQ(out.find("started coordinator"), std::string::npos) << out;
    }
    GTEST_SKIP() << "no GPU engine here: the device half of " << GetParam() << " is checked on a GPU machine";
  }
  if (device.code() == StatusCode::kInvalidArgument && b->gpu >= GenerationGpuCount())
    GTEST_SKIP() << GetParam() << " wants GPU " << b->gpu << "; this machine has " << GenerationGpuCount();
  EXPECT_TRUE(device.ok()) << device;
  Status learner_device = learner::ValidateLearnerConfig(*cfg, /*check_device=*/true);
  EXPECT_TRUE(learner_device.ok()) << learner_device;
}

INSTANTIATE_TEST_SUITE_P(Configs, GpuConfigs, ::testing::Values("configs/gpu-1-small.toml", "configs/gpu-2.toml",
                                                                   "configs/gpu-1-small.toml"));

}  // namespace
}  // namespace grove::rollout
