// The precision plan measured on the GPU (gpu_precision_plan.h) against the
// CPU reference (precision_plan.h) on a tiny MoE. Skips without a GPU.
#include "rollout/gpu_precision_plan.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>

#include "tests/rollout/plan_test_util.h"

namespace grove::rollout {
namespace {

bool HaveGpu() { return model::GpuTransformer::DeviceCount() > 0; }

using plan_testing::RandomSequences;
using plan_testing::SourcePath;

model::ModelConfig Config() { return plan_testing::TinyGpuConfig(); }

struct Models {
  std::unique_ptr<model::Model> cpu;
  std::unique_ptr<model::GpuTransformer> gpu;
};

Models Make(uint64_t seed) {
  const model::ModelConfig c = Config();
  Models m;
  auto cpu = model::Model::Create(c, seed);
  EXPECT_TRUE(cpu.ok()) << cpu.status();
  m.cpu = std::move(*cpu);
  m.cpu->set_threads(2);
  auto gpu = model::GpuTransformer::Create(c, 0, /*trainable=*/false);
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  m.gpu = std::move(*gpu);
  EXPECT_TRUE(m.gpu->UploadParams(m.cpu->params()).ok());
  return m;
}

// Bit for bit: the device round trips are what the CPU's compute (widths
// that are not a multiple of the int4 group, an all-zero row and group).
TEST(GpuPlanKernels, RoundTripIsTheCpuRoundTrip) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0, 0.05f);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{37, 300}, {8, 128}, {3, 2816}, {5, 7}}) {
    std::vector<float> w(rows * cols);
    for (float& x : w) x = nd(rng) * (1 + float(rng() % 4));
    w[cols + 1] = -1e-9f;  // rounds to -0 before dequantization: +0 on the CPU
    std::fill(w.begin(), w.begin() + cols, 0.f);  // row 0 zero
    if (cols > 128) std::fill(w.begin() + cols, w.begin() + cols + 128, 0.f);  // row 1's first group zero
    for (PrecisionFormat f : kPlanFormats) {
      std::vector<float> cpu = w, gpu(w.size());
      RoundTripInPlace(f, cpu.data(), rows, cols);
      float* d = nullptr;
      ASSERT_EQ(cudaMalloc(&d, w.size() * sizeof(float)), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(d, w.data(), w.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
      RoundTripOnDevice(f, d, rows, cols, nullptr);
      ASSERT_EQ(cudaMemcpy(gpu.data(), d, w.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
      cudaFree(d);
      EXPECT_EQ(std::memcmp(cpu.data(), gpu.data(), w.size() * sizeof(float)), 0)
          << FormatName(f) << " " << rows << "x" << cols;
    }
  }
}

// The units' local errors: the same definition computed in fp32 on both
// sides, on inputs that differ by the GPU forward's bf16 rounding (the
// residual stream rounds once per block, ~2^-9 relative; the gates come
// from a bf16 router GEMM). An error is a sum of squares of (dW x) weighted
// by g^2, so a relative input change d moves it by at most ~2d (less on
// many rows, where the first-order changes of random sign cancel): d is a
// few 1e-3 per layer, growing with depth. 8% per unit and format is several
// times that; 3% on a layer's sum. A wrong definition (rows, g^2, a format)
// is off by far more. The GPU replays the CPU's routes, so that each unit
// sees the same rows on both sides (without replay a near-tie, scores
// within bf16 noise, may route a row elsewhere). Measured (H100): worst
// unit 0.33%, layer sums within 0.1%.
TEST(GpuPlan, LocalErrorsMatchTheCpu) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  Models m = Make(7);
  auto calib = RandomSequences(m.cpu->config(), 6, 48, 11);
  auto own = m.cpu->Score(calib, false);
  ASSERT_TRUE(own.ok()) << own.status();
  for (size_t i = 0; i < calib.size(); ++i) calib[i].replay_routes = own->routes[i];
  std::vector<PlanUnit> cpu = PlanUnits(m.cpu->config()), gpu = cpu;
  ASSERT_TRUE(MeasureLocalUnitErrors(*m.cpu, calib, cpu).ok());
  ASSERT_TRUE(MeasureLocalUnitErrorsOnGpu(*m.gpu, calib, gpu).ok());
  double worst = 0;
  int same_rows = 0;
  std::map<int64_t, std::array<double, 6>> layer;  // cpu[3], gpu[3]
  for (size_t i = 0; i < cpu.size(); ++i) {
    for (size_t f = 0; f < 3; ++f) {
      layer[cpu[i].layer][f] += cpu[i].error[f];
      layer[cpu[i].layer][3 + f] += gpu[i].error[f];
    }
    if (cpu[i].rows_seen != gpu[i].rows_seen) continue;
    ++same_rows;
    for (size_t f = 0; f < 3; ++f) {
      if (cpu[i].rows_seen == 0) {
        EXPECT_EQ(gpu[i].error[f], 0.0);
        continue;
      }
      const double rel = std::fabs(gpu[i].error[f] - cpu[i].error[f]) / cpu[i].error[f];
      worst = std::max(worst, rel);
      EXPECT_LT(rel, 0.08) << cpu[i].name << " " << FormatName(kPlanFormats[f]) << ": cpu " << cpu[i].error[f]
                           << " gpu " << gpu[i].error[f];
    }
  }
  std::printf("local errors: %d of %zu units on the same rows; worst relative difference %.2e\n", same_rows,
              cpu.size(), worst);
  EXPECT_EQ(same_rows, int(cpu.size()));
  for (const auto& [l, e] : layer)
    for (size_t f = 0; f < 3; ++f) {
      std::printf("layer %lld %s: cpu %.6e gpu %.6e\n", (long long)l, std::string(FormatName(kPlanFormats[f])).c_str(),
                  e[f], e[3 + f]);
      EXPECT_NEAR(e[3 + f], e[f], 0.03 * e[f]) << "layer " << l << " " << FormatName(kPlanFormats[f]);
    }
  // Each unit's errors fall with precision, as on the CPU.
  for (const PlanUnit& u : gpu)
    if (u.rows_seen > 0) {
      EXPECT_GT(u.error[0], u.error[1]) << u.name;
      EXPECT_GT(u.error[1], u.error[2]) << u.name;
    }
}

// The KL scaling and the plan. The KL of one layer in int4 is computed from
// the GPU's bf16 forward (the learner's) instead of the CPU's fp32 one: the
// same perturbation seen through a different rounding of every activation,
// so only its size is compared (within 1.5x either way; measured within
// 3%). The plans: each respects the budget, and the GPU's plan, costed with
// the CPU's errors, is within 25% of the CPU's own plan (choices that
// differ are near-ties; measured: identical plans at 5, 6 and 9 b/w).
TEST(GpuPlan, ScalingAndPlanAgreeWithTheCpu) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  Models m = Make(7);
  const auto calib = RandomSequences(m.cpu->config(), 6, 48, 11);
  std::vector<PlanUnit> cpu = PlanUnits(m.cpu->config()), gpu = cpu;
  std::vector<float> before(m.cpu->params().size()), after(before.size());
  ASSERT_TRUE(m.gpu->DownloadParams(before).ok());
  ASSERT_TRUE(MeasureUnitErrors(*m.cpu, calib, cpu).ok());
  GpuPlanTiming t;
  ASSERT_TRUE(MeasureUnitErrorsOnGpu(*m.gpu, calib, gpu, &t).ok());
  std::printf("gpu measurement: forward %.3f s, local %.3f s, kl %.3f s\n", t.forward_s, t.local_s, t.kl_s);
  ASSERT_TRUE(m.gpu->DownloadParams(after).ok());
  EXPECT_EQ(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)), 0) << "weights not restored";
  std::map<int64_t, std::pair<double, double>> int4;  // layer -> (cpu, gpu) scaled int4 sums = the layer's KL
  for (size_t i = 0; i < cpu.size(); ++i) {
    int4[cpu[i].layer].first += cpu[i].error[0];
    int4[cpu[i].layer].second += gpu[i].error[0];
  }
  for (const auto& [l, kl] : int4) {
    std::printf("layer %lld all int4: KL cpu %.4e gpu %.4e\n", (long long)l, kl.first, kl.second);
    EXPECT_GT(kl.second, kl.first / 1.5) << "layer " << l;
    EXPECT_LT(kl.second, kl.first * 1.5) << "layer " << l;
  }
  for (double budget : {5.0, 6.0, 9.0}) {
    std::vector<PlanUnit> pc = cpu, pg = gpu;
    ASSERT_TRUE(ChooseFormats(budget, pc).ok());
    ASSERT_TRUE(ChooseFormats(budget, pg).ok());
    const PrecisionPlan plan_gpu{budget, pg}, plan_cpu{budget, pc};
    EXPECT_LE(plan_gpu.bits_per_weight(), budget + 1e-9);
    // The GPU's choices with the CPU's errors.
    double cost = 0;
    int differ = 0;
    for (size_t i = 0; i < pg.size(); ++i) {
      const size_t fi = std::find(kPlanFormats.begin(), kPlanFormats.end(), pg[i].format) - kPlanFormats.begin();
      cost += cpu[i].error[fi];
      differ += pg[i].format != pc[i].format;
    }
    std::printf("budget %.1f: cpu %s error %.4e; gpu %s, its error by the cpu's measure %.4e; %d units differ\n",
                budget, plan_cpu.Summary().c_str(), plan_cpu.total_error(), plan_gpu.Summary().c_str(), cost, differ);
    EXPECT_LE(cost, 1.25 * plan_cpu.total_error() + 1e-12) << "budget " << budget;
  }
}

// The plan's mismatch on the GPU: ~zero when nothing is quantized (the same
// forward twice: zero where the forward is deterministic), larger for int4
// than int8, weights restored.
TEST(GpuPlan, MismatchFollowsPrecision) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  Models m = Make(9);
  const auto seqs = RandomSequences(m.cpu->config(), 4, 40, 3);
  std::vector<float> before(m.cpu->params().size()), after(before.size());
  ASSERT_TRUE(m.gpu->DownloadParams(before).ok());
  auto uniform = [](std::optional<PrecisionFormat> f) {
    return FormatChooser([f](const actors::TensorSpec& t) { return IsQuantizedTensor(t) ? f : std::nullopt; });
  };
  auto none = MeasureMismatchOnGpu(*m.gpu, uniform(std::nullopt), seqs);
  auto int8 = MeasureMismatchOnGpu(*m.gpu, uniform(PrecisionFormat::kInt8), seqs);
  auto int4 = MeasureMismatchOnGpu(*m.gpu, uniform(PrecisionFormat::kInt4), seqs);
  ASSERT_TRUE(none.ok() && int8.ok() && int4.ok()) << none.status() << int8.status() << int4.status();
  EXPECT_EQ(none->tokens, 4 * (40 - 40 / 3));
  EXPECT_LT(none->mean_kl, 0.01 * int8->mean_kl);
  EXPECT_LE(none->routes_differ, int4->routes_differ);
  EXPECT_GT(int8->mean_kl, 0.0);
  EXPECT_GT(int4->mean_kl, int8->mean_kl);
  EXPECT_GE(int4->routes_differ, int8->routes_differ);
  // The CPU's measure of the same rollout weights, for scale.
  std::vector<float> q(before.begin(), before.end());
  std::vector<actors::TensorSpec> specs;
  for (const model::TensorInfo& t : m.cpu->layout().tensors())
    specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  QuantizeInPlace(specs, q, uniform(PrecisionFormat::kInt4));
  std::vector<float> full(m.cpu->params().begin(), m.cpu->params().end());
  std::copy(q.begin(), q.end(), m.cpu->params().begin());
  auto cpu4 = MeasureMismatch(*m.cpu, full, seqs);
  ASSERT_TRUE(cpu4.ok()) << cpu4.status();
  std::printf("int4 everywhere: KL gpu %.4e cpu %.4e; routes differ gpu %.3f cpu %.3f; int8 KL gpu %.4e; "
              "nothing quantized: KL %.3e, routes differ %.3f\n",
              int4->mean_kl, cpu4->mean_kl, int4->routes_differ, cpu4->routes_differ, int8->mean_kl, none->mean_kl,
              none->routes_differ);
  ASSERT_TRUE(m.gpu->DownloadParams(after).ok());
  EXPECT_EQ(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)), 0) << "weights not restored";
}

// PolicyQuantizer's plan mode with the GPU measurer, its completions sampled
// by the CPU model (as CalibrationBatch samples them): the same calibration
// batch as the CPU path's, a plan within the budget, its mismatch measured.
TEST(GpuPlan, PolicyQuantizerMeasuresOnTheGpu) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  Models m = Make(7);
  const model::ModelConfig c = m.cpu->config();
  std::vector<float> full(m.cpu->params().begin(), m.cpu->params().end());
  std::vector<actors::TensorSpec> specs;
  for (const model::TensorInfo& t : m.cpu->layout().tensors())
    specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& r : RandomSequences(c, 4, 12, 21)) prompts.push_back(r.tokens);
  QuantizeSettings qs;
  qs.mode = QuantizeMode::kPlan;
  qs.plan_bits = 6.0;
  qs.plan_sequences = 4;
  qs.plan_max_new_tokens = 16;
  model::Model* cpu = m.cpu.get();
  auto measurer = GpuPlanMeasurer::Create(
      c, 0,
      [cpu](const float*, std::span<const float> w, const std::vector<std::vector<int32_t>>& ps,
             const model::SamplingOptions& so) {
        std::copy(w.begin(), w.end(), cpu->params().begin());
        return cpu->Generate(ps, so);
      });
  ASSERT_TRUE(measurer.ok()) << measurer.status();
  GpuPlanMeasurer* g = measurer->get();
  PolicyQuantizer on_gpu(qs, prompts, /*stop_token=*/0), on_cpu(qs, prompts, /*stop_token=*/0);
  on_gpu.set_measurer(std::move(*measurer));
  auto chosen = on_gpu.Formats(3, c, specs, full, nullptr);
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  ASSERT_TRUE(on_gpu.plan().has_value());
  EXPECT_LE(on_gpu.plan()->bits_per_weight(), qs.plan_bits + 1e-9);
  EXPECT_GT(on_gpu.mismatch().tokens, 0);
  EXPECT_GT(on_gpu.mismatch().mean_kl, 0.0);
  auto reference = on_cpu.Formats(3, c, specs, full, m.cpu.get());
  ASSERT_TRUE(reference.ok()) << reference.status();
  EXPECT_EQ(on_gpu.mismatch().tokens, on_cpu.mismatch().tokens);  // the same calibration completions
  std::printf("plan on %s: %s in %.3f s (sampling %.3f s), KL %.3e routes %.3f; on the CPU: %s in %.3f s, KL %.3e "
              "routes %.3f\n",
              g->where().c_str(), on_gpu.plan()->Summary().c_str(), on_gpu.plan_seconds(), g->sample_seconds(),
              on_gpu.mismatch().mean_kl, on_gpu.mismatch().routes_differ, on_cpu.plan()->Summary().c_str(),
              on_cpu.plan_seconds(), on_cpu.mismatch().mean_kl, on_cpu.mismatch().routes_differ);
}

}  // namespace
}  // namespace grove::rollout
