// Plan mode from fp32 weights already on the GPU (a CUDA IPC copy):
// PolicyQuantizer::FormatsFromDevice, GpuPlanMeasurer's device trigger and
// calibration, and GenerationBackend::InstallFromDevice in plan mode,
// against the host path. Skips without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "rollout/generation_backend.h"
#include "rollout/gpu_precision_plan.h"
#include "tests/rollout/plan_test_util.h"

namespace grove::rollout {
namespace {

bool HaveGpu() { return model::GpuTransformer::DeviceCount() > 0; }

using plan_testing::SourcePath;
using plan_testing::TinyGpuConfig;

// fp32 values on device 0, freed on scope exit.
class DeviceFloats {
 public:
  explicit DeviceFloats(std::span<const float> host) : n_(host.size()) {
    EXPECT_EQ(cudaSetDevice(0), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&p_, (n_ + 4) * sizeof(float)), cudaSuccess);
    Set(host);
  }
  ~DeviceFloats() { cudaFree(p_); }
  void Set(std::span<const float> host, size_t at = 0) {
    EXPECT_EQ(cudaMemcpy(p_ + at, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  }
  float* get() { return p_; }

 private:
  size_t n_;
  float* p_ = nullptr;
};

std::vector<actors::TensorSpec> Specs(const model::ParamLayout& layout) {
  std::vector<actors::TensorSpec> specs;
  for (const model::TensorInfo& t : layout.tensors())
    specs.push_back({t.name, t.shape, uint64_t(t.offset), uint64_t(t.numel)});
  return specs;
}

// w + rel * ||w|| * u / ||u|| for a random direction u: a version whose
// relative change from w is `rel` (to fp32 rounding, ~1e-7 relative).
std::vector<float> Moved(const std::vector<float>& w, double rel, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0, 1);
  std::vector<double> u(w.size());
  double uu = 0, ww = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    u[i] = nd(rng);
    uu += u[i] * u[i];
    ww += double(w[i]) * w[i];
  }
  const double s = rel * std::sqrt(ww / uu);
  std::vector<float> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = float(w[i] + s * u[i]);
  return out;
}

// The trigger's sums on the device against ReplanTrigger's on the host:
// both in double over fp32 inputs, in different orders, so they agree to
// ~1e-12; 1e-6 is the brief's bound. Sizes off the float4 path and across
// many blocks' shares; a misaligned start (scalar path); the zero cases.
TEST(PlanFromDevice, RelativeChangeIsTheHosts) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const model::ModelConfig c = TinyGpuConfig();
  auto gm = model::GpuTransformer::Create(c, 0, /*trainable=*/false);
  ASSERT_TRUE(gm.ok()) << gm.status();
  double* scratch = nullptr;
  ASSERT_EQ(cudaMalloc(&scratch, (2 * 1024 + 2) * sizeof(double)), cudaSuccess);
  std::mt19937_64 rng(11);
  std::normal_distribution<float> nd(0, 0.02f);
  for (size_t n : {size_t(1), size_t(7), size_t(4099), size_t(3) * 1000 * 1000 + 13}) {
    std::vector<float> ref(n);
    for (float& x : ref) x = nd(rng);
    const std::vector<float> w = Moved(ref, 0.031, n);
    DeviceFloats dref(ref), dw(w), dw_off(std::vector<float>(n + 1));
    dw_off.Set(w, 1);  // starts 4 bytes past an aligned address
    ReplanTrigger host({0, 0.05});
    host.Planned(0, ref);
    const double expect = host.RelativeChange(w);
    auto got = RelativeChangeOnGpu(**gm, dw.get(), dref.get(), int64_t(n), scratch);
    auto got_off = RelativeChangeOnGpu(**gm, dw_off.get() + 1, dref.get(), int64_t(n), scratch);
    auto again = RelativeChangeOnGpu(**gm, dw.get(), dref.get(), int64_t(n), scratch);
    auto zero = RelativeChangeOnGpu(**gm, dref.get(), dref.get(), int64_t(n), scratch);
    ASSERT_TRUE(got.ok() && got_off.ok() && again.ok() && zero.ok()) << got.status();
    EXPECT_NEAR(*got, expect, 1e-6 * expect) << n;
    EXPECT_NEAR(*got_off, expect, 1e-6 * expect) << n;
    EXPECT_EQ(*again, *got) << "not deterministic at n = " << n;
    EXPECT_EQ(*zero, 0.0);
    if (n > 1000) std::printf("n %zu: device %.15g host %.15g (rel diff %.2e)\n", n, *got, expect,
                              std::abs(*got - expect) / expect);
  }
  cudaFree(scratch);
}

// PolicyQuantizer over a GPU measurer whose completions come from the CPU
// model (downloaded from the measurer's device copy on the device path):
// the device path's plan is the host path's, its trigger agrees with the
// host trigger and replans past max_rel_change and not before, and a
// failed plan leaves the plan in force and the next install replans.
struct Quantizers {
  std::unique_ptr<model::Model> cpu;
  std::vector<float> w0;
  std::vector<actors::TensorSpec> specs;
  std::vector<std::vector<int32_t>> prompts;
  QuantizeSettings qs;
  bool fail_sampling = false;

  Quantizers() {
    const model::ModelConfig c = TinyGpuConfig();
    cpu = std::move(*model::Model::Create(c, 7));
    cpu->set_threads(2);
    w0.assign(cpu->params().begin(), cpu->params().end());
    specs = Specs(cpu->layout());
    std::mt19937_64 rng(21);
    for (int i = 0; i < 4; ++i) {
      prompts.emplace_back();
      for (int j = 0; j < 12; ++j) prompts.back().push_back(int32_t(rng() % c.vocab_size));
    }
    qs.mode = QuantizeMode::kPlan;
    qs.plan_bits = 6.0;
    qs.plan_sequences = 4;
    qs.plan_max_new_tokens = 16;
    qs.replan.max_rel_change = 0.05;
  }
  std::unique_ptr<PolicyQuantizer> Make() {
    auto q = std::make_unique<PolicyQuantizer>(qs, prompts, /*stop_token=*/0);
    model::Model* m = cpu.get();
    bool* fail = &fail_sampling;
    auto measurer = GpuPlanMeasurer::Create(
        cpu->config(), 0,
        [m, fail](const float* device_full, std::span<const float> host_full,
                  const std::vector<std::vector<int32_t>>& ps,
                  const model::SamplingOptions& so) -> Result<std::vector<model::Completion<float>>> {
          if (*fail) return Status::Unavailable("sampling failed (test)");
          if (host_full.empty()) {
            if (cudaMemcpy(m->params().data(), device_full, m->params().size() * sizeof(float),
                           cudaMemcpyDeviceToHost) != cudaSuccess)
              return Status::Internal("download");
          } else {
            std::copy(host_full.begin(), host_full.end(), m->params().begin());
          }
          return m->Generate(ps, so);
        });
    EXPECT_TRUE(measurer.ok()) << measurer.status();
    q->set_measurer(std::move(*measurer));
    return q;
  }
};

std::string Formats(const PrecisionPlan& p) {
  std::string s;
  for (const PlanUnit& u : p.units) s += char('0' + int(u.format));
  return s;
}

TEST(PlanFromDevice, QuantizerPlansAsFromTheHostAndReplansPastTheThreshold) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  Quantizers t;
  const model::ModelConfig c = t.cpu->config();
  auto from_host = t.Make(), from_device = t.Make();
  ASSERT_TRUE(from_host->Formats(1, c, t.specs, t.w0, nullptr).ok());
  DeviceFloats d(t.w0);
  auto chosen = from_device->FormatsFromDevice(1, c, t.specs, d.get());
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  ASSERT_TRUE(from_host->plan() && from_device->plan());
  EXPECT_EQ(from_device->plans_made(), 1);
  // The same calibration completions (same weights, same seed), hence the
  // same measurements on the same device: the same plan and mismatch (the
  // KL's device sums may add in another order: 1e-9 relative).
  EXPECT_EQ(Formats(*from_device->plan()), Formats(*from_host->plan()));
  EXPECT_EQ(from_device->mismatch().tokens, from_host->mismatch().tokens);
  EXPECT_NEAR(from_device->mismatch().mean_kl, from_host->mismatch().mean_kl, 1e-9 * from_host->mismatch().mean_kl);
  EXPECT_EQ(from_device->report().bits_per_weight, from_host->report().bits_per_weight);

  // Versions moved from w0 by 3%, 4.5% (kept), then 8% (past 5%: replanned),
  // then the 8% weights again (0 from the new plan's).
  ReplanTrigger host({0, 0.05});
  host.Planned(1, t.w0);
  struct Step {
    double rel;
    int64_t plans;
  };
  std::vector<float> w;
  int64_t version = 1;
  for (Step s : {Step{0.03, 1}, Step{0.045, 1}, Step{0.08, 2}}) {
    w = Moved(t.w0, s.rel, uint64_t(s.rel * 1000));
    d.Set(w);
    ASSERT_TRUE(from_device->FormatsFromDevice(++version, c, t.specs, d.get()).ok());
    const double expect = host.RelativeChange(w);
    EXPECT_NEAR(from_device->last_weight_change(), expect, 1e-6 * expect) << s.rel;
    EXPECT_EQ(from_device->plans_made(), s.plans) << s.rel;
    std::printf("moved %.3f: device change %.9f host %.9f, plans %lld\n", s.rel, from_device->last_weight_change(),
                expect, (long long)from_device->plans_made());
  }
  ASSERT_TRUE(from_device->FormatsFromDevice(++version, c, t.specs, d.get()).ok());
  EXPECT_EQ(from_device->last_weight_change(), 0.0);
  EXPECT_EQ(from_device->plans_made(), 2);
  // A host install after device plans keeps no host copy to compare: replans.
  ASSERT_TRUE(from_device->Formats(++version, c, t.specs, w, nullptr).ok());
  EXPECT_EQ(from_device->plans_made(), 3);
}

TEST(PlanFromDevice, FailedPlanLeavesThePlanInForceAndTheNextInstallReplans) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  Quantizers t;
  const model::ModelConfig c = t.cpu->config();
  auto q = t.Make();
  DeviceFloats d(t.w0);
  ASSERT_TRUE(q->FormatsFromDevice(1, c, t.specs, d.get()).ok());
  const std::string plan1 = Formats(*q->plan());
  const double kl1 = q->mismatch().mean_kl;
  // Past the threshold, but the calibration sampling fails after the
  // measurer loaded the new weights.
  std::vector<float> w = Moved(t.w0, 0.2, 5);
  d.Set(w);
  t.fail_sampling = true;
  auto failed = q->FormatsFromDevice(2, c, t.specs, d.get());
  EXPECT_EQ(failed.status().code(), StatusCode::kUnavailable) << failed.status();
  EXPECT_EQ(q->plans_made(), 1);
  EXPECT_EQ(Formats(*q->plan()), plan1);
  EXPECT_EQ(q->mismatch().mean_kl, kl1);
  // The measurer now holds version 2's weights, not the plan's: the next
  // version, even unchanged, is replanned rather than compared with them.
  t.fail_sampling = false;
  ASSERT_TRUE(q->FormatsFromDevice(3, c, t.specs, d.get()).ok());
  EXPECT_EQ(q->plans_made(), 2);
  ASSERT_TRUE(q->FormatsFromDevice(4, c, t.specs, d.get()).ok());
  EXPECT_EQ(q->plans_made(), 2);
  EXPECT_EQ(q->last_weight_change(), 0.0);
}

// The GPU engine in plan mode: InstallFromDevice gives the plan and the
// sampled tokens Install from the host gives with the same weights.
TEST(PlanFromDevice, BackendInstallsFromDeviceAsFromTheHost) {
  if (GenerationGpuCount() == 0) GTEST_SKIP() << "no GPU engine here";
  auto cfg = Config::LoadFile(SourcePath("configs/gpu-1-small.toml"));
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  auto mc = model::ModelConfig::FromConfig(cfg->Section("model"));
  ASSERT_TRUE(mc.ok());
  auto ref = model::Model::Create(*mc, 5);
  ASSERT_TRUE(ref.ok());
  const std::vector<actors::TensorSpec> specs = Specs((*ref)->layout());
  const std::vector<float> w0((*ref)->params().begin(), (*ref)->params().end());
  std::vector<std::vector<int32_t>> prompts(8, std::vector<int32_t>{3, 9, 14, 20, 7, 1});
  BackendSettings s;
  s.device = RolloutDevice::kGpu;
  s.max_batch = 16;
  s.kv_memory_fraction = 0.05;
  QuantizeSettings q;
  q.mode = QuantizeMode::kPlan;
  q.plan_max_new_tokens = 8;
  q.replan.max_rel_change = 0.05;
  auto make = [&] {
    return MakeGenerationBackend(s, *mc, "rollout-0",
                                 std::make_unique<PolicyQuantizer>(q, std::vector<std::vector<int32_t>>{{3, 9, 14}}, 2));
  };
  model::SamplingOptions so;
  so.seed = 3;
  so.max_new_tokens = 16;

  std::vector<std::vector<int32_t>> host_tokens;
  std::string host_plan;
  double host_kl = 0;
  {
    auto host = make();
    ASSERT_TRUE(host.ok()) << host.status();
    std::vector<float> flat = w0;
    ASSERT_TRUE((*host)->Install(1, specs, flat).ok());
    host_plan = Formats(*(*host)->quantizer().plan());
    host_kl = (*host)->quantizer().mismatch().mean_kl;
    auto got = (*host)->Generate(prompts, so);
    ASSERT_TRUE(got.ok()) << got.status();
    for (const auto& c : *got) host_tokens.push_back(c.tokens);
  }
  auto engine = make();
  ASSERT_TRUE(engine.ok()) << engine.status();
  GenerationBackend& e = **engine;
  ASSERT_TRUE(e.installs_from_device());
  DeviceFloats d(w0);
  // A failed install first (no weights): nothing installed, Generate refuses.
  EXPECT_EQ(e.InstallFromDevice(1, specs, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e.Generate(prompts, so).status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(e.InstallFromDevice(1, specs, d.get()).ok());
  EXPECT_EQ(e.quantizer().plans_made(), 1);
  EXPECT_EQ(Formats(*e.quantizer().plan()), host_plan);
  EXPECT_NEAR(e.quantizer().mismatch().mean_kl, host_kl, 1e-9 * host_kl);
  auto got = e.Generate(prompts, so);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), host_tokens.size());
  for (size_t i = 0; i < got->size(); ++i) EXPECT_EQ((*got)[i].tokens, host_tokens[i]) << "sequence " << i;
  // The next version, unchanged: compared on the device, not replanned.
  ASSERT_TRUE(e.InstallFromDevice(2, specs, d.get()).ok());
  EXPECT_EQ(e.quantizer().plans_made(), 1);
  EXPECT_EQ(e.quantizer().last_weight_change(), 0.0);
  std::printf("plan from device on %s: %s; install %.3f s on the engine\n", e.quantizer().measurer()->where().c_str(),
              e.quantizer().plan()->Summary().c_str(), e.last_device_load_seconds());
}

}  // namespace
}  // namespace grove::rollout
