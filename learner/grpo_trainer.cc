#include "learner/grpo_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include <glog/logging.h>

#include "model/checkpoint.h"
#ifdef GROVE_LEARNER_GPU
#include "learner/gpu_step.h"
#endif

namespace grove::learner {
namespace {

Result<std::unique_ptr<model::Model>> CopyModel(const model::Model& from) {
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> m, model::Model::Create(from.config(), 0, /*random_init=*/false));
  std::copy(from.params().begin(), from.params().end(), m->params().begin());
  return m;
}

// The routes to replay for one completion: prompt rows then completion rows,
// prompt.size() + completion.size() - 1 rows in all, or none when the
// rollout did not record both.
std::vector<uint16_t> ReplayRoutes(const TrainingGroup& g, const TrainingSample& s) {
  if (g.prompt_routes.empty() || (s.routes.empty() && s.tokens.size() > 1)) return {};
  std::vector<uint16_t> r;
  r.reserve(g.prompt_routes.size() + s.routes.size());
  r.insert(r.end(), g.prompt_routes.begin(), g.prompt_routes.end());
  r.insert(r.end(), s.routes.begin(), s.routes.end());
  return r;
}

// Token-weighted running mean of the loss statistics over micro-batches.
void Accumulate(PolicyLossStats& acc, const PolicyLossStats& s, int64_t tokens_before) {
  const double n0 = static_cast<double>(tokens_before), n1 = static_cast<double>(s.num_tokens);
  if (n1 == 0) return;
  auto mix = [&](double& a, double b) { a = (a * n0 + b * n1) / (n0 + n1); };
  mix(acc.ratio_mean, s.ratio_mean);
  mix(acc.clip_frac_low, s.clip_frac_low);
  mix(acc.clip_frac_high, s.clip_frac_high);
  mix(acc.clip_frac_dual, s.clip_frac_dual);
  mix(acc.kl_ref_k3_mean, s.kl_ref_k3_mean);
  mix(acc.mismatch_log_ratio_mean, s.mismatch_log_ratio_mean);
  mix(acc.mismatch_kl_k3, s.mismatch_kl_k3);
  mix(acc.tis_capped_frac, s.tis_capped_frac);
  mix(acc.tis_weight_mean, s.tis_weight_mean);
  mix(acc.neg_logp_mean, s.neg_logp_mean);
  acc.pg_loss += s.pg_loss;
  acc.kl_loss += s.kl_loss;
  acc.num_tokens += s.num_tokens;
  acc.num_sequences += s.num_sequences;
}

}  // namespace

Result<LearnerDevice> ParseLearnerDevice(std::string_view name) {
  if (name == "auto") return LearnerDevice::kAuto;
  if (name == "cpu") return LearnerDevice::kCpu;
  if (name == "gpu") return LearnerDevice::kGpu;
  return Status::InvalidArgument("learner device '" + std::string(name) + "' is none of auto, cpu, gpu");
}

bool GrpoTrainer::GpuAvailable() {
#ifdef GROVE_LEARNER_GPU
  return model::GpuTransformer::DeviceCount() > 0;
#else
  return false;
#endif
}

void GpuGrpoStepDeleter::operator()(GpuGrpoStep* step) const {
#ifdef GROVE_LEARNER_GPU
  delete step;
#else
  CHECK(step == nullptr) << "a GPU step in a build without CUDA";
#endif
}

int64_t GrpoTrainer::rl_steps() const {
#ifdef GROVE_LEARNER_GPU
  if (gpu_) return gpu_->step();
#endif
  return optimizer_.step();
}

Status GrpoTrainer::SyncFromGpu() {
#ifdef GROVE_LEARNER_GPU
  if (gpu_) return gpu_->policy().DownloadParams(policy_->params());
#endif
  return Status::OK();
}

int GrpoTrainer::gpu_device() const {
#ifdef GROVE_LEARNER_GPU
  if (gpu_) return gpu_->policy().device();
#endif
  return -1;
}

Result<const float*> GrpoTrainer::DeviceParams(int device) {
#ifdef GROVE_LEARNER_GPU
  if (gpu_ && gpu_->policy().device() == device) {
    GROVE_RETURN_IF_ERROR(gpu_->policy().Synchronize());
    return static_cast<const float*>(gpu_->policy().device_params());
  }
#endif
  (void)device;
  return static_cast<const float*>(nullptr);
}

Status GrpoTrainer::SyncPolicyToGpu() {
#ifdef GROVE_LEARNER_GPU
  if (gpu_) return gpu_->policy().UploadParams(policy_->params());
#endif
  return Status::OK();
}

std::vector<ParamRange> NoDecayRanges(const model::ParamLayout& layout) {
  std::vector<ParamRange> ranges;
  for (const model::TensorInfo& t : layout.tensors()) {
    const bool no_decay = !t.trainable || t.shape.size() < 2 || t.name == "embed" ||
                          t.name.find("norm") != std::string::npos;
    if (no_decay) ranges.push_back({static_cast<size_t>(t.offset), static_cast<size_t>(t.offset + t.numel)});
  }
  return ranges;
}

GrpoTrainer::GrpoTrainer(std::unique_ptr<model::Model> policy, std::unique_ptr<model::Model> reference,
                         TrainerOptions options, AdamW optimizer, AdamW sft_optimizer, LrSchedule schedule)
    : policy_(std::move(policy)),
      reference_(std::move(reference)),
      options_(std::move(options)),
      optimizer_(std::move(optimizer)),
      sft_optimizer_(std::move(sft_optimizer)),
      schedule_(std::move(schedule)) {
  micro_batch_tokens_ = options_.micro_batch_tokens;
}

Result<std::unique_ptr<GrpoTrainer>> GrpoTrainer::Create(std::unique_ptr<model::Model> policy,
                                                         TrainerOptions options) {
  if (!policy) return Status::InvalidArgument("GrpoTrainer needs a model");
  if (options.micro_batch < 1) return Status::InvalidArgument("learner micro_batch must be >= 1");
  if (options.micro_batch_tokens < 0)
    return Status::InvalidArgument("learner micro_batch_tokens must be >= 0 (0: no bound), got " +
                                   std::to_string(options.micro_batch_tokens));
  GROVE_RETURN_IF_ERROR(ValidatePolicyLossConfig(options.grpo.loss));
  std::vector<ParamRange> no_decay = NoDecayRanges(policy->layout());
  GROVE_ASSIGN_OR_RETURN(LrSchedule schedule, LrSchedule::Create(options.grpo.schedule));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> reference, CopyModel(*policy));
  // Host optimizers of the model's size only where the step runs on the
  // CPU: on the GPU they would be four unused copies of a 1.7B model
  // (27 GB to allocate and zero).
  GROVE_ASSIGN_OR_RETURN(AdamW empty, AdamW::Create(0, options.grpo.optimizer));
  const LearnerDevice device = options.device;
  std::unique_ptr<GrpoTrainer> t(new GrpoTrainer(std::move(policy), std::move(reference), std::move(options), empty,
                                                 empty, std::move(schedule)));
  auto on_cpu = [&]() -> Result<std::unique_ptr<GrpoTrainer>> {
    const size_t n = t->policy_->params().size();
    for (AdamW* opt : {&t->optimizer_, &t->sft_optimizer_}) {
      GROVE_ASSIGN_OR_RETURN(*opt, AdamW::Create(n, t->options_.grpo.optimizer));
      GROVE_RETURN_IF_ERROR(opt->SetNoDecayRanges(no_decay));
    }
    return std::move(t);
  };
  if (device == LearnerDevice::kCpu) return on_cpu();
#ifdef GROVE_LEARNER_GPU
  if (device == LearnerDevice::kAuto && model::GpuTransformer::DeviceCount() == 0) {
    LOG(INFO) << "learner: no CUDA device, the step runs on the CPU";
    return on_cpu();
  }
  auto gpu = GpuGrpoStep::Create(*t->policy_, *t->reference_, t->options_.grpo.optimizer, no_decay);
  if (!gpu.ok()) {
    if (device == LearnerDevice::kGpu) return gpu.status();
    LOG(WARNING) << "learner: the step runs on the CPU: " << gpu.status().ToString();
    return on_cpu();
  }
  t->gpu_.reset(gpu->release());
  LOG(INFO) << "learner: the step runs on GPU " << t->gpu_->policy().device();
  return t;
#else
  if (device == LearnerDevice::kGpu)
    return Status::FailedPrecondition("learner device 'gpu' asked for, but grove was built without CUDA");
  return on_cpu();
#endif
}

void GrpoTrainer::FreezeReference() {
  const Status synced = SyncHost();
  CHECK(synced.ok()) << "the GPU policy's weights to the host: " << synced.ToString();
  std::copy(policy_->params().begin(), policy_->params().end(), reference_->params().begin());
#ifdef GROVE_LEARNER_GPU
  if (gpu_) {
    const Status s = gpu_->reference().UploadParams(reference_->params());
    CHECK(s.ok()) << "uploading the frozen reference to the GPU: " << s.ToString();
  }
#endif
}

Result<model::ScoreResult<float>> GrpoTrainer::ScoreOnStepDevice(bool policy,
                                                                 const std::vector<model::ScoreRequest>& reqs,
                                                                 bool keep_for_backward) {
#ifdef GROVE_LEARNER_GPU
  // The step reads the log-probs and expert loads, never the routes (it
  // replays them): not copying them saves ~1 ms of host time a 32k-token
  // micro-batch with the GPU idle.
  if (gpu_)
    return (policy ? gpu_->policy() : gpu_->reference()).Score(reqs, keep_for_backward, /*return_routes=*/false);
#endif
  return (policy ? *policy_ : *reference_).Score(reqs, keep_for_backward);
}

Status GrpoTrainer::BackwardOnStepDevice(const std::vector<std::vector<float>>& dlogp) {
#ifdef GROVE_LEARNER_GPU
  if (gpu_) return gpu_->policy().Backward(dlogp);
#endif
  return policy_->Backward(dlogp);
}

Status GrpoTrainer::ZeroGradOnStepDevice() {
#ifdef GROVE_LEARNER_GPU
  if (gpu_) return gpu_->policy().ZeroGrad();
#endif
  policy_->ZeroGrad();
  return Status::OK();
}

Status GrpoTrainer::RunMicroBatches(const std::vector<int64_t>& lengths, const MicroBatchAttempt& attempt) {
  for (;;) {
    const std::vector<MicroBatchRange> ranges = CutMicroBatches(lengths, options_.micro_batch, micro_batch_tokens_);
    size_t started = 0;
    const Status s = attempt(ranges, started);
    if (s.ok() || s.code() != StatusCode::kResourceExhausted || !on_gpu() || started == 0) return s;
#ifdef GROVE_LEARNER_GPU
    // Out of device memory, most likely because a micro-batch longer than
    // any before had to grow the activation buffers while another process
    // (a rollout worker's KV cache) holds the rest of the GPU. The buffers
    // are left at the sizes of the failed attempt: free them all, so the
    // retry's smaller micro-batches allocate only what they need.
    GROVE_RETURN_IF_ERROR(gpu_->ReleaseActivations().WithContext("freeing the activations after: " + s.ToString()));
    started = std::min(started, ranges.size());
    const MicroBatchRange& failed = ranges[started - 1];
    // Only micro-batches of more than one sequence get smaller under a
    // tighter bound; those all had <= micro_batch_tokens_ tokens, so the new
    // bound is at most half the old one and the retries end.
    int64_t splittable = 0;
    for (size_t i = 0; i < started; ++i)
      if (ranges[i].end - ranges[i].begin > 1) splittable = std::max(splittable, ranges[i].tokens);
    const bool alone = failed.end - failed.begin == 1;
    if (splittable == 0 || (alone && failed.tokens >= splittable)) {
      return Status::ResourceExhausted(
          "learner: one sequence of " + std::to_string(failed.tokens) +
          " tokens (prompt + completion) does not fit in the GPU memory left to the learner's step (" +
          s.message() +
          "); leave the learner more memory: lower [rollout] kv_memory_fraction if a rollout worker shares its "
          "GPU, put the rollout worker on another GPU, or sample shorter completions ([rollout] max_new_tokens)");
    }
    const int64_t old_bound = micro_batch_tokens_;
    micro_batch_tokens_ = std::max<int64_t>(1, splittable / 2);
    LOG(WARNING) << "learner: out of GPU memory in a micro-batch of " << failed.end - failed.begin
                 << " sequences and " << failed.tokens << " tokens (" << s.message()
                 << "); micro_batch_tokens " << (old_bound > 0 ? std::to_string(old_bound) : "unbounded") << " -> "
                 << micro_batch_tokens_ << " (half of the largest micro-batch tried, " << splittable
                 << " tokens), kept for the steps after; redoing this step from the start";
#endif
  }
}

Result<GrpoStepStats> GrpoTrainer::Step(const std::vector<TrainingGroup>& groups) {
  const auto t0 = std::chrono::steady_clock::now();
  GrpoStepStats st;
  st.groups = static_cast<int64_t>(groups.size());
  if (groups.empty()) return Status::InvalidArgument("GRPO step on an empty batch");

  // Rewards in group order, for advantages and dynamic sampling.
  std::vector<float> rewards;
  std::vector<int64_t> sizes;
  double reward_sum = 0, staleness_sum = 0;
  int64_t samples = 0;
  for (const TrainingGroup& g : groups) {
    sizes.push_back(static_cast<int64_t>(g.samples.size()));
    for (const TrainingSample& s : g.samples) {
      rewards.push_back(static_cast<float>(s.reward));
      reward_sum += s.reward;
      const int64_t stale = version_ - s.policy_version;
      staleness_sum += static_cast<double>(stale);
      st.staleness_max = std::max(st.staleness_max, stale);
      ++samples;
    }
  }
  st.reward_mean = reward_sum / std::max<int64_t>(samples, 1);
  st.staleness_mean = staleness_sum / std::max<int64_t>(samples, 1);

  std::vector<bool> drop(groups.size(), false);
  if (options_.grpo.dynamic_sampling) {
    GROVE_ASSIGN_OR_RETURN(drop, GroupsWithEqualRewards(rewards, sizes, 1e-6));
  }
  GROVE_ASSIGN_OR_RETURN(std::vector<float> advantages,
                         GroupAdvantages(rewards, sizes, options_.grpo.advantages));

  // Flatten the kept completions.
  struct Item {
    model::ScoreRequest request;
    const TrainingSample* sample;
    float advantage;
  };
  std::vector<Item> items;
  size_t flat = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const TrainingGroup& g = groups[gi];
    for (const TrainingSample& s : g.samples) {
      const float adv = advantages[flat++];
      if (drop[gi]) continue;
      Item it;
      it.request.tokens = g.prompt_tokens;
      it.request.tokens.insert(it.request.tokens.end(), s.tokens.begin(), s.tokens.end());
      it.request.score_from = static_cast<int64_t>(g.prompt_tokens.size());
      if (options_.routing_replay) it.request.replay_routes = ReplayRoutes(g, s);
      it.sample = &s;
      it.advantage = adv;
      items.push_back(std::move(it));
    }
    if (drop[gi]) ++st.groups_dropped;
  }

  model::Model& m = *policy_;
  int64_t total_tokens = 0;
  std::vector<int64_t> lengths;  // what a micro-batch's activations grow with
  for (const Item& it : items) {
    total_tokens += static_cast<int64_t>(it.sample->tokens.size());
    lengths.push_back(static_cast<int64_t>(it.request.tokens.size()));
  }
  st.sequences = static_cast<int64_t>(items.size());
  st.tokens = total_tokens;

  const model::ModelConfig& mc = m.config();
  std::vector<std::vector<int64_t>> load;
  auto attempt = [&](const std::vector<MicroBatchRange>& ranges, size_t& started) -> Status {
    // Sums over micro-batches start over: an attempt that ran out of device
    // memory may have added some.
    st.loss = 0;
    st.policy = PolicyLossStats{};
    load.assign(mc.moe_layers(), std::vector<int64_t>(mc.experts, 0));
    GROVE_RETURN_IF_ERROR(ZeroGradOnStepDevice());
    for (const MicroBatchRange& range : ranges) {
      ++started;
      const size_t b = range.begin, e = range.end;
      std::vector<model::ScoreRequest> reqs;
      for (size_t i = b; i < e; ++i) reqs.push_back(items[i].request);
      GROVE_ASSIGN_OR_RETURN(model::ScoreResult<float> cur, ScoreOnStepDevice(true, reqs, /*keep_for_backward=*/true));
      // The reference is scored even with beta = 0: KL to it is the run's main
      // drift signal in the metrics, at the cost of one forward without backward.
      GROVE_ASSIGN_OR_RETURN(model::ScoreResult<float> ref, ScoreOnStepDevice(false, reqs, false));
      std::vector<int64_t> offsets{0};
      std::vector<float> logp, ref_logp, rollout_logp, adv;
      for (size_t i = b; i < e; ++i) {
        const auto& lp = cur.logprobs[i - b];
        logp.insert(logp.end(), lp.begin(), lp.end());
        ref_logp.insert(ref_logp.end(), ref.logprobs[i - b].begin(), ref.logprobs[i - b].end());
        rollout_logp.insert(rollout_logp.end(), items[i].sample->rollout_logprobs.begin(),
                            items[i].sample->rollout_logprobs.end());
        offsets.push_back(static_cast<int64_t>(logp.size()));
        adv.push_back(items[i].advantage);
      }
      if (rollout_logp.size() != logp.size())
        return Status::Internal("rollout log-probs and scored log-probs differ in length");
      PolicyBatch pb;
      pb.seq_offsets = offsets;
      pb.logp = logp;
      // One update per batch: the proximal policy is the current one (ratio 1,
      // still differentiated); the rollout's own log-probs enter through TIS.
      pb.ref_logp = ref_logp;
      pb.rollout_logp = rollout_logp;
      pb.advantages = adv;
      pb.total_tokens = total_tokens;
      pb.total_sequences = st.sequences;
#ifdef GROVE_LEARNER_GPU
      if (gpu_) {
        // The loss kernel reads the device's own log-probs and feeds its
        // gradient straight to the backward: nothing per token crosses PCIe.
        GROVE_ASSIGN_OR_RETURN(PolicyLossOutput out, gpu_->LossAndBackward(pb, options_.grpo.loss));
        st.loss += out.loss;
        Accumulate(st.policy, out.stats, st.policy.num_tokens);
      } else
#endif
      {
        GROVE_ASSIGN_OR_RETURN(PolicyLossOutput out, ComputePolicyLoss(pb, options_.grpo.loss));
        st.loss += out.loss;
        Accumulate(st.policy, out.stats, st.policy.num_tokens);
        std::vector<std::vector<float>> dlogp;
        for (size_t i = 0; i + 1 < offsets.size(); ++i)
          dlogp.emplace_back(out.grad_logp.begin() + offsets[i], out.grad_logp.begin() + offsets[i + 1]);
        GROVE_RETURN_IF_ERROR(BackwardOnStepDevice(dlogp));
      }
      for (size_t l = 0; l < cur.expert_load.size() && l < load.size(); ++l)
        for (size_t x = 0; x < cur.expert_load[l].size() && x < load[l].size(); ++x)
          load[l][x] += cur.expert_load[l][x];
    }
    return Status::OK();
  };
  GROVE_RETURN_IF_ERROR(RunMicroBatches(lengths, attempt));

  if (!items.empty()) {
#ifdef GROVE_LEARNER_GPU
    if (gpu_) {
      // Update on the device; the host copy waits for SyncHost (a 1.7B
      // model's download costs more than its step; CopyParams serves a
      // published version straight from the device). The router bias is not
      // trainable: it moves on the host, whose copy of it is always current,
      // and goes back up (a few floats per layer).
      GROVE_ASSIGN_OR_RETURN(st.update, gpu_->Update(schedule_.At(gpu_->step()), options_.grpo.max_grad_norm));
      host_behind_ = true;
      if (options_.update_router_bias && mc.moe_layers() > 0) {
        GROVE_RETURN_IF_ERROR(m.UpdateRouterBias(load));
        for (int64_t l = mc.dense_layers; l < mc.layers; ++l) {
          const model::TensorInfo* b = m.layout().Find("layers." + std::to_string(l) + ".moe.router_bias");
          GROVE_RETURN_IF_ERROR(gpu_->policy().UploadRange(
              b->offset, std::span<const float>(m.params().data() + b->offset, size_t(b->numel))));
        }
      }
    } else
#endif
    {
      GROVE_ASSIGN_OR_RETURN(st.update, ApplyUpdate(optimizer_, schedule_, options_.grpo.max_grad_norm,
                                                    m.params(), m.grads()));
      if (options_.update_router_bias && mc.moe_layers() > 0) GROVE_RETURN_IF_ERROR(m.UpdateRouterBias(load));
    }
  }
  ++version_;
  st.version = version_;
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

Result<SupervisedStepStats> GrpoTrainer::SupervisedStep(const std::vector<SupervisedExample>& batch, double lr) {
  if (batch.empty()) return Status::InvalidArgument("supervised step on an empty batch");
  model::Model& m = *policy_;
  SupervisedStepStats st;
  for (const SupervisedExample& ex : batch) st.tokens += static_cast<int64_t>(ex.completion.size());
  if (st.tokens == 0) return Status::InvalidArgument("supervised batch without completion tokens");
  const float scale = -1.0f / static_cast<float>(st.tokens);
  std::vector<int64_t> lengths;
  for (const SupervisedExample& ex : batch)
    lengths.push_back(static_cast<int64_t>(ex.prompt.size() + ex.completion.size()));
  double nll = 0;
  auto attempt = [&](const std::vector<MicroBatchRange>& ranges, size_t& started) -> Status {
    nll = 0;  // as the gradients, nothing of an attempt that ran out of memory counts
    st.confident_fraction = 0;
    GROVE_RETURN_IF_ERROR(ZeroGradOnStepDevice());
    for (const MicroBatchRange& range : ranges) {
      ++started;
      const size_t b = range.begin, e = range.end;
      std::vector<model::ScoreRequest> reqs;
      for (size_t i = b; i < e; ++i) {
        model::ScoreRequest r;
        r.tokens = batch[i].prompt;
        r.tokens.insert(r.tokens.end(), batch[i].completion.begin(), batch[i].completion.end());
        r.score_from = static_cast<int64_t>(batch[i].prompt.size());
        reqs.push_back(std::move(r));
      }
      GROVE_ASSIGN_OR_RETURN(model::ScoreResult<float> cur, ScoreOnStepDevice(true, reqs, true));
      std::vector<std::vector<float>> dlogp;
      for (const auto& lp : cur.logprobs) {
        for (float v : lp) {
          nll -= v;
          st.confident_fraction += v > std::log(0.5f) ? 1 : 0;
        }
        dlogp.emplace_back(lp.size(), scale);
      }
      GROVE_RETURN_IF_ERROR(BackwardOnStepDevice(dlogp));
    }
    return Status::OK();
  };
  GROVE_RETURN_IF_ERROR(RunMicroBatches(lengths, attempt));
  st.loss = nll / static_cast<double>(st.tokens);
  st.confident_fraction /= static_cast<double>(st.tokens);
#ifdef GROVE_LEARNER_GPU
  if (gpu_) {
    // The update stays on the device; publishing, evaluation on the host
    // model and checkpoints wait for SyncHost (a 1.7B model's download per
    // step would cost more than the step).
    GROVE_ASSIGN_OR_RETURN(st.update,
                           gpu_->Update(lr, options_.grpo.max_grad_norm, GpuGrpoStep::Phase::kWarmStart));
    host_behind_ = true;
    return st;
  }
#endif
  GROVE_ASSIGN_OR_RETURN(LrSchedule constant, LrSchedule::Create(LrScheduleOptions{lr, 0}));
  GROVE_ASSIGN_OR_RETURN(st.update, ApplyUpdate(sft_optimizer_, constant, options_.grpo.max_grad_norm,
                                                m.params(), m.grads()));
  return st;
}

Status GrpoTrainer::SyncHost() {
  if (!host_behind_) return Status::OK();
  GROVE_RETURN_IF_ERROR(SyncFromGpu());
  host_behind_ = false;
  return Status::OK();
}

Status GrpoTrainer::CopyParams(std::span<float> out) const {
  if (out.size() != policy_->params().size())
    return Status::InvalidArgument("CopyParams: " + std::to_string(out.size()) + " floats for " +
                                   std::to_string(policy_->params().size()) + " parameters");
#ifdef GROVE_LEARNER_GPU
  if (gpu_ && host_behind_) return gpu_->policy().DownloadParams(out);
#endif
  std::copy(policy_->params().begin(), policy_->params().end(), out.begin());
  return Status::OK();
}

Status GrpoTrainer::SaveCheckpoint(const std::string& dir) {
  GROVE_RETURN_IF_ERROR(SyncHost());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::IOError("cannot create checkpoint directory '" + dir + "': " + ec.message());
  // Write into a fresh temporary directory, then rename: a learner killed
  // mid-save leaves the previous checkpoint intact.
  const std::string tmp = dir + ".tmp";
  std::filesystem::remove_all(tmp, ec);
  std::filesystem::create_directories(tmp, ec);
  std::map<std::string, std::string> meta = {{"version", std::to_string(version_)},
                                             {"rl_steps", std::to_string(rl_steps())}};
  GROVE_RETURN_IF_ERROR(model::SaveModel(tmp + "/model.safetensors", *policy_, meta));
  GROVE_RETURN_IF_ERROR(model::SaveModel(tmp + "/reference.safetensors", *reference_, meta));
#ifdef GROVE_LEARNER_GPU
  GROVE_ASSIGN_OR_RETURN(AdamWState s, gpu_ ? gpu_->ExportState() : Result<AdamWState>(optimizer_.ExportState()));
#else
  AdamWState s = optimizer_.ExportState();
#endif
  std::map<std::string, std::string> om = meta;
  om["adam_step"] = std::to_string(s.step);
  GROVE_RETURN_IF_ERROR(model::SaveOptimizerState(model::OptimizerStatePath(tmp + "/model.safetensors"),
                                                  policy_->layout(), {{"adam_m", s.m}, {"adam_v", s.v}}, om));
  const std::string old = dir + ".old";
  std::filesystem::remove_all(old, ec);
  std::filesystem::rename(dir, old, ec);
  std::filesystem::rename(tmp, dir, ec);
  if (ec) return Status::IOError("cannot move checkpoint into place at '" + dir + "': " + ec.message());
  std::filesystem::remove_all(old, ec);
  return Status::OK();
}

Status GrpoTrainer::LoadCheckpoint(const std::string& dir) {
  const std::string model_path = dir + "/model.safetensors";
  GROVE_ASSIGN_OR_RETURN(auto meta, model::ReadMetadata(model_path));
  GROVE_RETURN_IF_ERROR(model::LoadParams(model_path, policy_.get()));
  host_behind_ = false;  // the GPU gets these below
  GROVE_RETURN_IF_ERROR(model::LoadParams(dir + "/reference.safetensors", reference_.get()));
  GROVE_ASSIGN_OR_RETURN(model::OptimizerState os,
                         model::LoadOptimizerState(model::OptimizerStatePath(model_path), policy_->layout(),
                                                   {"adam_m", "adam_v"}));
  AdamWState s;
  try {
    s.step = std::stoll(os.metadata.at("adam_step"));
    version_ = std::stoll(meta.at("version"));
  } catch (const std::exception&) {
    return Status::Corruption("checkpoint '" + dir + "' lacks its version or optimizer step");
  }
  s.m = std::move(os.buffers["adam_m"]);
  s.v = std::move(os.buffers["adam_v"]);
#ifdef GROVE_LEARNER_GPU
  if (gpu_) {
    GROVE_RETURN_IF_ERROR(gpu_->ImportState(s));
    GROVE_RETURN_IF_ERROR(SyncPolicyToGpu());
    return gpu_->reference().UploadParams(reference_->params());
  }
#endif
  return optimizer_.ImportState(s);
}

}  // namespace grove::learner
