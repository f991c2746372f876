#include "learner/learner_actor.h"

#include <chrono>
#include <filesystem>
#include <fstream>

#include <glog/logging.h>
#include <nlohmann/json.hpp>
#ifdef GROVE_LEARNER_GPU
#include <cuda_runtime_api.h>
#endif

#include "actors/process.h"
#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "actors/weights_transport.h"
#include "learner/evaluation.h"
#include "learner/grpo_trainer.h"
#include "learner/snapshot_pool.h"
#include "learner/weight_publisher.h"
#include "model/prompt_format.h"
#include "model/tokenizer.h"
#include "rollout/generation_backend.h"
#include "rollout/policy_quantizer.h"
#include "reward/registry.h"
#include "reward/task.h"

namespace grove::learner {
namespace {

using actors::BodyKind;

struct LearnerSettings {
  int64_t steps = 40;
  int64_t batch_groups = 8;
  int64_t max_staleness = 1;
  int64_t micro_batch = 32;
  // Tokens (prompt + completion) per micro-batch, at most; 0: no bound. The
  // step's GPU memory grows with it (micro_batch alone does not bound it);
  // on the GPU the learner lowers it itself after running out of memory.
  int64_t micro_batch_tokens = 0;
  int64_t checkpoint_every = 10;  // GRPO steps; 0: no checkpoints at all (the run cannot resume)
  int64_t eval_every = 10;
  int64_t eval_problems = 64;
  int64_t max_new_tokens = 32;
  int64_t warmstart_steps = 60;
  int64_t warmstart_batch = 32;
  double warmstart_lr = 3e-3;
  int64_t seed = 1;
  int64_t weight_chunk_bytes = 1 << 20;
  int64_t request_timeout_ms = 5000;
  bool routing_replay = true;
  std::string device = "auto";  // where the GRPO step runs: auto | cpu | gpu
  // Where the held-out evaluation generates: auto = the GPU engine on the
  // step's GPU when the step runs on one (bf16, from the step's own fp32
  // weights), else the CPU model; cpu; gpu (an error where it cannot).
  std::string eval_device = "auto";
  double eval_kv_memory_fraction = 0.02;  // of the GPU's free memory, for the eval engine's KV pages
};

Result<LearnerSettings> ParseSettings(const Config& cfg) {
  Config s = cfg.Section("learner");
  GROVE_RETURN_IF_ERROR(s.CheckKeys({"steps", "batch_groups", "max_staleness", "micro_batch", "micro_batch_tokens",
                                     "checkpoint_every", "eval_every", "eval_problems", "max_new_tokens",
                                     "warmstart_steps", "warmstart_batch", "warmstart_lr", "seed", "weight_chunk_bytes",
                                     "request_timeout_ms", "routing_replay", "device", "eval_device",
                                     "eval_kv_memory_fraction", "grpo"}));
  LearnerSettings o;
  GROVE_ASSIGN_OR_RETURN(o.steps, s.Int("steps", o.steps));
  GROVE_ASSIGN_OR_RETURN(o.batch_groups, s.Int("batch_groups", o.batch_groups));
  GROVE_ASSIGN_OR_RETURN(o.max_staleness, s.Int("max_staleness", o.max_staleness));
  GROVE_ASSIGN_OR_RETURN(o.micro_batch, s.Int("micro_batch", o.micro_batch));
  GROVE_ASSIGN_OR_RETURN(o.micro_batch_tokens, s.Int("micro_batch_tokens", o.micro_batch_tokens));
  GROVE_ASSIGN_OR_RETURN(o.checkpoint_every, s.Int("checkpoint_every", o.checkpoint_every));
  GROVE_ASSIGN_OR_RETURN(o.eval_every, s.Int("eval_every", o.eval_every));
  GROVE_ASSIGN_OR_RETURN(o.eval_problems, s.Int("eval_problems", o.eval_problems));
  GROVE_ASSIGN_OR_RETURN(o.max_new_tokens, s.Int("max_new_tokens", o.max_new_tokens));
  GROVE_ASSIGN_OR_RETURN(o.warmstart_steps, s.Int("warmstart_steps", o.warmstart_steps));
  GROVE_ASSIGN_OR_RETURN(o.warmstart_batch, s.Int("warmstart_batch", o.warmstart_batch));
  GROVE_ASSIGN_OR_RETURN(o.warmstart_lr, s.Double("warmstart_lr", o.warmstart_lr));
  GROVE_ASSIGN_OR_RETURN(o.seed, s.Int("seed", o.seed));
  GROVE_ASSIGN_OR_RETURN(o.weight_chunk_bytes, s.Int("weight_chunk_bytes", o.weight_chunk_bytes));
  GROVE_ASSIGN_OR_RETURN(o.request_timeout_ms, s.Int("request_timeout_ms", o.request_timeout_ms));
  GROVE_ASSIGN_OR_RETURN(o.routing_replay, s.Bool("routing_replay", o.routing_replay));
  GROVE_ASSIGN_OR_RETURN(o.device, s.String("device", o.device));
  if (!ParseLearnerDevice(o.device).ok())
    return Status::InvalidArgument(cfg.source() + ": learner.device '" + o.device + "' is none of auto, cpu, gpu");
  GROVE_ASSIGN_OR_RETURN(o.eval_device, s.String("eval_device", o.eval_device));
  if (!ParseLearnerDevice(o.eval_device).ok())
    return Status::InvalidArgument(cfg.source() + ": learner.eval_device '" + o.eval_device +
                                   "' is none of auto, cpu, gpu");
  if (o.eval_device == "gpu" && o.device == "cpu")
    return Status::InvalidArgument(cfg.source() + ": learner.eval_device = gpu needs learner.device gpu or auto " +
                                   "(the evaluation engine reads the step's weights on its GPU)");
  GROVE_ASSIGN_OR_RETURN(o.eval_kv_memory_fraction, s.Double("eval_kv_memory_fraction", o.eval_kv_memory_fraction));
  auto bad = [&](const char* key, bool cond) {
    return cond ? Status::InvalidArgument(cfg.source() + ": learner." + key + " is out of range") : Status::OK();
  };
  GROVE_RETURN_IF_ERROR(bad("steps", o.steps < 0));
  GROVE_RETURN_IF_ERROR(bad("batch_groups", o.batch_groups < 1 || o.batch_groups > 4096));
  GROVE_RETURN_IF_ERROR(bad("max_staleness", o.max_staleness < 0));
  GROVE_RETURN_IF_ERROR(bad("micro_batch", o.micro_batch < 1));
  GROVE_RETURN_IF_ERROR(bad("micro_batch_tokens (>= 0; 0: no bound)", o.micro_batch_tokens < 0));
  GROVE_RETURN_IF_ERROR(bad("checkpoint_every", o.checkpoint_every < 0));
  GROVE_RETURN_IF_ERROR(bad("eval_kv_memory_fraction", !(o.eval_kv_memory_fraction > 0 && o.eval_kv_memory_fraction < 1)));
  GROVE_RETURN_IF_ERROR(bad("eval_every", o.eval_every < 0));
  GROVE_RETURN_IF_ERROR(bad("eval_problems", o.eval_problems < 1));
  GROVE_RETURN_IF_ERROR(bad("max_new_tokens", o.max_new_tokens < 1));
  GROVE_RETURN_IF_ERROR(bad("warmstart_steps", o.warmstart_steps < 0));
  GROVE_RETURN_IF_ERROR(bad("warmstart_batch", o.warmstart_batch < 1));
  GROVE_RETURN_IF_ERROR(bad("warmstart_lr", !(o.warmstart_lr >= 0)));
  GROVE_RETURN_IF_ERROR(bad("weight_chunk_bytes", o.weight_chunk_bytes < 4096 || o.weight_chunk_bytes % 4 != 0));
  GROVE_RETURN_IF_ERROR(bad("request_timeout_ms", o.request_timeout_ms < 10));
  return o;
}

std::vector<actors::TensorSpec> TensorSpecs(const model::ParamLayout& layout) {
  std::vector<actors::TensorSpec> specs;
  for (const model::TensorInfo& t : layout.tensors())
    specs.push_back({t.name, t.shape, static_cast<uint64_t>(t.offset), static_cast<uint64_t>(t.numel)});
  return specs;
}

// The trainer's current weights (from its GPU when the step runs there), in
// a buffer of `pool`; `tensors`: TensorSpecs of its layout.
Result<std::shared_ptr<const actors::WeightSnapshot>> Snapshot(const GrpoTrainer& trainer,
                                                               const std::vector<actors::TensorSpec>& tensors,
                                                               SnapshotPool& pool) {
  std::shared_ptr<actors::WeightSnapshot> snap = pool.Take(trainer.policy().params().size());
  snap->version = trainer.version();
  snap->tensors = tensors;
  GROVE_RETURN_IF_ERROR(trainer.CopyParams(snap->flat));
  snap->checksum = actors::WeightChecksum(snap->flat.data(), snap->flat.size());
  return std::shared_ptr<const actors::WeightSnapshot>(std::move(snap));
}

// Buffer hooks that pin the pooled snapshot buffers (page-locked, mapped
// for the GPU) where the step runs on a GPU: each version is downloaded from
// the device into one, and the NCCL sender uploads from it; pageable memory
// goes through the driver's small staging buffers at a fraction of the
// bus's speed. Pinning costs once per buffer (the pool recycles them); a
// buffer that cannot be pinned (the limit on locked memory) still works.
SnapshotPool::BufferHooks SnapshotBufferHooks(const GrpoTrainer& trainer) {
#ifdef GROVE_LEARNER_GPU
  if (trainer.on_gpu()) {
    return SnapshotPool::BufferHooks{
        [](std::vector<float>& b) {
          const cudaError_t e = cudaHostRegister(b.data(), b.size() * sizeof(float), cudaHostRegisterDefault);
          if (e == cudaSuccess) return;
          cudaGetLastError();
          LOG_FIRST_N(WARNING, 1) << "weights: a snapshot buffer stays pageable: cudaHostRegister: "
                                  << cudaGetErrorString(e);
        },
        // A buffer that could not be pinned makes this fail harmlessly
        // (not registered); the error is cleared.
        [](std::vector<float>& b) {
          if (cudaHostUnregister(b.data()) != cudaSuccess) cudaGetLastError();
        }};
  }
#endif
  (void)trainer;
  return {};
}

class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path) : out_(path, std::ios::app) {}
  void Write(const nlohmann::json& line) {
    out_ << line.dump() << "\n";
    out_.flush();
  }
  bool ok() const { return static_cast<bool>(out_); }

 private:
  std::ofstream out_;
};

// The learner's conversation with the replay store.
class ReplayLink {
 public:
  ReplayLink(actors::ActorProcess& proc, std::string id, int timeout_ms)
      : proc_(proc), id_(std::move(id)), timeout_ms_(timeout_ms) {}

  // Connects (looking the store up through the coordinator) if not yet.
  Status Ensure() {
    if (rpc_) return Status::OK();
    GROVE_ASSIGN_OR_RETURN(auto peers, proc_.client().Lookup(wire::Role::REPLAY));
    if (peers.empty()) return Status::Unavailable("no replay store registered yet");
    auto rpc = std::make_unique<actors::RpcClient>(id_);
    GROVE_RETURN_IF_ERROR(rpc->Connect(peers.front().address));
    rpc_ = std::move(rpc);
    return Status::OK();
  }
  void Reset() { rpc_.reset(); }

  Result<actors::Frame> Call(capnp::MallocMessageBuilder& mb, std::initializer_list<BodyKind> expected) {
    GROVE_RETURN_IF_ERROR(Ensure());
    Result<actors::Frame> r = rpc_->Call(mb, expected, timeout_ms_);
    // A timed-out store may have moved (restarted on another port): look it up again.
    if (!r.ok() && r.status().code() != StatusCode::kFailedPrecondition) Reset();
    return r;
  }
  const std::string& id() const { return id_; }

 private:
  actors::ActorProcess& proc_;
  std::string id_;
  int timeout_ms_;
  std::unique_ptr<actors::RpcClient> rpc_;
};

Result<std::unique_ptr<GrpoTrainer>> BuildTrainer(const Config& cfg, const LearnerSettings& s) {
  GROVE_ASSIGN_OR_RETURN(model::ModelConfig mc, model::ModelConfig::FromConfig(cfg.Section("model")));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> m, model::Model::Create(mc, static_cast<uint64_t>(s.seed)));
  TrainerOptions opt;
  GROVE_ASSIGN_OR_RETURN(opt.grpo, ParseGrpoConfig(cfg, "learner.grpo"));
  opt.micro_batch = s.micro_batch;
  opt.micro_batch_tokens = s.micro_batch_tokens;
  opt.routing_replay = s.routing_replay;
  GROVE_ASSIGN_OR_RETURN(opt.device, ParseLearnerDevice(s.device));
  return GrpoTrainer::Create(std::move(m), std::move(opt));
}

Status WarmStart(GrpoTrainer& trainer, const model::Tokenizer& tok, const reward::Task& task,
                 const LearnerSettings& s, actors::ActorProcess& proc) {
  uint64_t index = 0;
  for (int64_t step = 0; step < s.warmstart_steps && !proc.draining(); ++step) {
    std::vector<SupervisedExample> batch;
    for (int64_t i = 0; i < s.warmstart_batch; ++i) {
      reward::Problem p = task.Generate(reward::Split::kTrain, (1ull << 40) + index++);
      SupervisedExample ex;
      GROVE_ASSIGN_OR_RETURN(ex.prompt, model::EncodePrompt(tok, p.prompt));
      GROVE_ASSIGN_OR_RETURN(ex.completion, model::EncodeCompletion(tok, p.demonstration));
      batch.push_back(std::move(ex));
    }
    GROVE_ASSIGN_OR_RETURN(SupervisedStepStats st, trainer.SupervisedStep(batch, s.warmstart_lr));
    if (step % 10 == 0 || step + 1 == s.warmstart_steps)
      LOG(INFO) << "warm-start step " << step + 1 << "/" << s.warmstart_steps << " loss " << st.loss
                << " confident " << st.confident_fraction;
    proc.client().SetCounter("warmstart_step", static_cast<double>(step + 1));
  }
  return Status::OK();
}

// Sequences the GPU eval engine decodes together (its graphs' largest batch).
constexpr int64_t kEvalEngineBatch = 64;

// The held-out evaluation's GPU engine (learner.eval_device), or null for the
// CPU model: on the step's GPU, bf16 (quantize "none"), greedy as the CPU.
// A 1.7B model's evaluation would take the CPU hours; the GPU's bf16
// forward differs from the CPU's fp32 one by rounding, which can flip a
// greedy near-tie (accuracy is the same measure, not the same bits).
Result<std::unique_ptr<rollout::GenerationBackend>> MakeEvalEngine(const LearnerSettings& s,
                                                                   const GrpoTrainer& trainer, int32_t stop_token) {
  GROVE_ASSIGN_OR_RETURN(LearnerDevice want, ParseLearnerDevice(s.eval_device));
  if (want == LearnerDevice::kCpu) return std::unique_ptr<rollout::GenerationBackend>();
  if (!trainer.on_gpu()) {
    if (want == LearnerDevice::kGpu)
      return Status::FailedPrecondition("learner.eval_device = gpu needs the step on a GPU (learner.device)");
    return std::unique_ptr<rollout::GenerationBackend>();
  }
  rollout::BackendSettings bs;
  bs.device = rollout::RolloutDevice::kGpu;
  bs.gpu = trainer.gpu_device();
  bs.max_batch = kEvalEngineBatch;
  bs.kv_memory_fraction = s.eval_kv_memory_fraction;
  rollout::QuantizeSettings bf16;
  bf16.mode = rollout::QuantizeMode::kNone;
  auto engine = rollout::MakeGenerationBackend(bs, trainer.policy().config(), "learner",
                                               std::make_unique<rollout::PolicyQuantizer>(bf16,
                                                   std::vector<std::vector<int32_t>>{}, stop_token));
  if (!engine.ok()) {
    if (want == LearnerDevice::kGpu) return engine.status().WithContext("learner.eval_device = gpu");
    LOG(WARNING) << "learner: held-out evaluation on the CPU: " << engine.status();
    return std::unique_ptr<rollout::GenerationBackend>();
  }
  if (!(*engine)->installs_from_device())
    return Status::Internal("the eval engine cannot read the step's device weights");
  LOG(INFO) << "learner: held-out evaluation on " << (*engine)->name() << " (bf16)";
  return std::move(*engine);
}

Status RunLearnerLoop(const RoleArgs& args) {
  GROVE_ASSIGN_OR_RETURN(LearnerSettings s, ParseSettings(args.config));
  const std::string run_dir = args.run_dir.empty() ? "grove-learner-" + args.id : args.run_dir;
  const std::string ckpt_dir = run_dir + "/checkpoints/latest";
  std::filesystem::create_directories(run_dir + "/checkpoints");
  MetricsLog metrics(run_dir + "/metrics.jsonl");
  if (!metrics.ok()) return Status::IOError("cannot open " + run_dir + "/metrics.jsonl");
  // Provenance: the ids of the groups behind every consume mark, one line per
  // acknowledged mark, so an audit (tests/chaos) can tell which acknowledged
  // group went into which version. A crash between the mark and this line
  // loses the line, never the mark.
  MetricsLog consumed_log(run_dir + "/consumed.jsonl");
  if (!consumed_log.ok()) return Status::IOError("cannot open " + run_dir + "/consumed.jsonl");

  Config task_cfg = args.config.Section("task");
  GROVE_ASSIGN_OR_RETURN(std::string task_name, task_cfg.String("name", "arithmetic"));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<reward::Task> task, reward::MakeTask(task_name, task_cfg));
  reward::VerifierRegistry registry;
  model::CharTokenizer tok;
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<GrpoTrainer> trainer, BuildTrainer(args.config, s));
  if (trainer->policy().config().vocab_size < tok.vocab_size())
    return Status::InvalidArgument("model.vocab_size " + std::to_string(trainer->policy().config().vocab_size) +
                                   " is smaller than the tokenizer's " + std::to_string(tok.vocab_size()));

  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<WeightPublisher> publisher,
                         WeightPublisher::Start(args.bind.empty() ? "tcp://127.0.0.1:0" : args.bind, args.id,
                                                static_cast<uint64_t>(s.weight_chunk_bytes)));
  // Workers on this learner's GPU read versions through CUDA IPC (the GPU
  // the step runs on, the first this process sees).
  // Without it those workers fetch chunks (they see no GPU on the announce).
  Result<std::unique_ptr<DeviceWeightExport>> device_export = StartDeviceWeightExport(args.config, 0);
  if (!device_export.ok()) {
    if (device_export.status().code() == StatusCode::kInvalidArgument) return device_export.status();
    LOG(WARNING) << "weights: no CUDA IPC export, workers on this GPU fetch over ZeroMQ: " << device_export.status();
  } else if (*device_export) {
    publisher->SetDeviceExport(std::move(*device_export));
  }
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<actors::ActorProcess> proc,
                         actors::ActorProcess::Start(args, wire::Role::LEARNER, publisher->endpoint()));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<WeightBroadcast> broadcast,
                         StartWeightBroadcast(args.config, args.id, args.coordinator));
  const std::vector<actors::TensorSpec> tensor_specs = TensorSpecs(trainer->policy().layout());
  // Versions in flight: the publisher's current and previous, one the NCCL
  // broadcaster may still send, the one being made.
  SnapshotPool snapshot_pool(/*max_free=*/2, SnapshotBufferHooks(*trainer));
  // Publishes the trainer's current weights as its current version. The IPC
  // export (device 0, like the GPU step) copies from the step's device
  // weights when there are any, else from the snapshot. It goes first: once
  // the broadcaster has the version, its send may sit on this GPU until the
  // NCCL workers post their receive, which they do when the coordinator
  // reports the version (SetPolicyVersion, after this); a CUDA call of the
  // export that waits for the device would wait on that send.
  auto publish = [&]() -> Status {
    GROVE_ASSIGN_OR_RETURN(std::shared_ptr<const actors::WeightSnapshot> snap,
                           Snapshot(*trainer, tensor_specs, snapshot_pool));
    Result<const float*> on_device = trainer->DeviceParams(0);
    if (!on_device.ok()) LOG(WARNING) << "weights: the step's device weights: " << on_device.status();
    publisher->Publish(snap, on_device.ok() ? *on_device : nullptr);
    if (broadcast) broadcast->Publish(std::move(snap));
    return Status::OK();
  };
  ReplayLink replay(*proc, args.id, static_cast<int>(s.request_timeout_ms));

  EvalOptions eval_opt;
  eval_opt.problems = s.eval_problems;
  eval_opt.max_new_tokens = s.max_new_tokens;
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<rollout::GenerationBackend> eval_engine,
                         MakeEvalEngine(s, *trainer, tok.eos_id()));
  if (eval_engine) eval_opt.batch = std::max<int64_t>(eval_opt.batch, kEvalEngineBatch);
  auto evaluate = [&](const char* when) -> Result<EvalResult> {
    if (eval_engine) {
      // The step's weights as they are now (the host copy may be behind).
      GROVE_ASSIGN_OR_RETURN(const float* weights, trainer->DeviceParams(trainer->gpu_device()));
      GROVE_RETURN_IF_ERROR(eval_engine->InstallFromDevice(trainer->version(), tensor_specs, weights)
                                .WithContext("the eval engine's weights"));
    } else {
      GROVE_RETURN_IF_ERROR(trainer->SyncHost());
    }
    auto on_engine = [&](const std::vector<std::vector<int32_t>>& prompts, const model::SamplingOptions& sampling) {
      return eval_engine->Generate(prompts, sampling);
    };
    GROVE_ASSIGN_OR_RETURN(EvalResult r, eval_engine
                                             ? EvaluateHeldOut(on_engine, tok, *task, registry, eval_opt)
                                             : EvaluateHeldOut(trainer->policy(), tok, *task, registry, eval_opt));
    LOG(INFO) << "eval (" << when << "): accuracy " << r.accuracy << " reward " << r.reward_mean << " format "
              << r.format_rate << " over " << r.problems << " held-out problems";
    for (const std::string& line : r.samples) LOG(INFO) << "  " << line;
    proc->client().SetCounter("eval_accuracy", r.accuracy);
    return r;
  };

  // Resume, or start fresh with the warm-start.
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  if (std::filesystem::exists(ckpt_dir + "/model.safetensors")) {
    GROVE_RETURN_IF_ERROR(trainer->LoadCheckpoint(ckpt_dir).WithContext("resuming from " + ckpt_dir));
    // The store's cursor may be ahead of the checkpoint (steps whose groups
    // were marked consumed after it): versions continue from the larger.
    for (int attempt = 0; attempt < 50 && !proc->draining(); ++attempt) {
      capnp::MallocMessageBuilder mb;
      actors::InitEnvelope(mb, args.id, 0).getBody().initCursorRequest().setConsumerId(args.id);
      Result<actors::Frame> r = replay.Call(mb, {BodyKind::CURSOR_REPLY});
      if (r.ok()) {
        const int64_t cursor = r->envelope().getBody().getCursorReply().getLearnerVersion();
        if (cursor > trainer->version()) trainer->set_version(cursor);
        break;
      }
      proc->WaitFor(200);
    }
    LOG(INFO) << "resumed from " << ckpt_dir << " at policy version " << trainer->version() << " after "
              << trainer->rl_steps() << " GRPO steps";
  } else {
    GROVE_ASSIGN_OR_RETURN(EvalResult init, evaluate("initial weights"));
    GROVE_RETURN_IF_ERROR(WarmStart(*trainer, tok, *task, s, *proc));
    trainer->FreezeReference();
    GROVE_ASSIGN_OR_RETURN(EvalResult warm, evaluate("after warm-start"));
    if (s.checkpoint_every > 0) GROVE_RETURN_IF_ERROR(trainer->SaveCheckpoint(ckpt_dir));
    metrics.Write({{"step", 0}, {"version", trainer->version()}, {"phase", "warmstart"},
                   {"eval_accuracy", warm.accuracy}, {"eval_reward", warm.reward_mean},
                   {"eval_format", warm.format_rate}, {"init_accuracy", init.accuracy}, {"kl", 0.0},
                   {"time_s", elapsed()}});
  }
  GROVE_RETURN_IF_ERROR(publish());
  proc->client().SetPolicyVersion(trainer->version());
  proc->client().SetCounter("step", static_cast<double>(trainer->rl_steps()));

  const model::ModelConfig& mc = trainer->policy().config();
  GroupShape shape{mc.vocab_size, static_cast<int>(mc.moe_layers()), static_cast<int>(mc.top_k),
                   static_cast<int>(mc.experts), mc.max_seq_len};
  int64_t rejected_groups = 0, dropped_stale = 0, reconsumed = 0;
  while (trainer->rl_steps() < s.steps && !proc->draining()) {
    capnp::MallocMessageBuilder mb;
    auto req = actors::InitEnvelope(mb, args.id, 0).getBody().initBatchRequest();
    req.setBatchSize(static_cast<uint32_t>(s.batch_groups));
    req.setLearnerVersion(trainer->version());
    req.setMaxStaleness(s.max_staleness);
    req.setConsumerId(args.id);
    Result<actors::Frame> reply = replay.Call(mb, {BodyKind::BATCH});
    if (!reply.ok()) {
      LOG_EVERY_N(WARNING, 20) << "batch request: " << reply.status();
      proc->WaitFor(200);
      continue;
    }
    auto batch = reply->envelope().getBody().getBatch();
    dropped_stale += static_cast<int64_t>(batch.getDroppedStale());
    // The coordinator replaces the prompts of groups never trained on.
    proc->client().SetCounter("groups_wasted", static_cast<double>(dropped_stale + rejected_groups));
    if (!batch.getReady() || batch.getGroups().size() == 0) {
      proc->WaitFor(static_cast<int>(std::clamp<uint32_t>(batch.getRetryAfterMs(), 10, 1000)));
      continue;
    }
    std::vector<TrainingGroup> groups;
    std::vector<std::string> ids;
    for (auto sg : batch.getGroups()) {
      ids.push_back(sg.getGroup().getGroupId().cStr());
      Result<TrainingGroup> g = DecodeTrainingGroup(sg, shape);
      if (!g.ok()) {
        ++rejected_groups;
        LOG(WARNING) << "refusing a group: " << g.status();
        continue;
      }
      groups.push_back(std::move(*g));
    }
    GrpoStepStats st;
    if (!groups.empty()) {
      GROVE_ASSIGN_OR_RETURN(st, trainer->Step(groups));
    }
    // Mark the batch consumed (with the new cursor) before anything else can
    // fail: a restarted learner must not train on these groups again.
    {
      capnp::MallocMessageBuilder cm;
      auto mark = actors::InitEnvelope(cm, args.id, 0).getBody().initConsumeMark();
      auto list = mark.initGroupIds(static_cast<unsigned>(ids.size()));
      for (size_t i = 0; i < ids.size(); ++i) list.set(static_cast<unsigned>(i), ids[i]);
      mark.setLearnerVersion(trainer->version());
      mark.setConsumerId(args.id);
      Status marked;
      for (int attempt = 0; attempt < 20; ++attempt) {
        Result<actors::Frame> r = replay.Call(cm, {BodyKind::CONSUME_ACK});
        marked = r.status();
        if (marked.ok()) {
          // Fewer newly marked than sent: some group was consumed before.
          // Retries of this same mark are the only innocent cause, so count
          // only on the first attempt; the tests assert this stays 0.
          const uint32_t n = r->envelope().getBody().getConsumeAck().getMarked();
          if (attempt == 0 && n < ids.size()) reconsumed += static_cast<int64_t>(ids.size() - n);
          consumed_log.Write({{"step", trainer->rl_steps()}, {"version", trainer->version()},
                              {"groups", ids}, {"trained", groups.size()}, {"newly_marked", n},
                              {"attempt", attempt}});
          break;
        }
        proc->WaitFor(200);
      }
      if (!marked.ok()) return marked.WithContext("marking a trained batch consumed");
    }
    if (groups.empty()) continue;
    GROVE_RETURN_IF_ERROR(publish());
    proc->client().SetPolicyVersion(trainer->version());
    const int64_t step = trainer->rl_steps();
    if (s.checkpoint_every > 0 && step % s.checkpoint_every == 0)
      GROVE_RETURN_IF_ERROR(trainer->SaveCheckpoint(ckpt_dir));
    nlohmann::json line = {{"step", step},
                           {"version", st.version},
                           {"phase", "grpo"},
                           {"reward_mean", st.reward_mean},
                           {"kl", st.policy.kl_ref_k3_mean},
                           {"clip_frac", st.policy.clip_frac_low + st.policy.clip_frac_high},
                           {"mismatch_kl", st.policy.mismatch_kl_k3},
                           {"tis_capped", st.policy.tis_capped_frac},
                           {"loss", st.loss},
                           {"grad_norm", st.update.grad_norm},
                           {"lr", st.update.lr},
                           {"groups", st.groups},
                           {"groups_dropped", st.groups_dropped},
                           {"groups_rejected", rejected_groups},
                           {"dropped_stale", dropped_stale},
                           {"groups_reconsumed", reconsumed},
                           {"sequences", st.sequences},
                           {"tokens", st.tokens},
                           {"tokens_per_s", st.seconds > 0 ? st.tokens / st.seconds : 0.0},
                           {"staleness", st.staleness_mean},
                           {"staleness_max", st.staleness_max},
                           {"step_s", st.seconds},
                           {"time_s", elapsed()}};
    if ((s.eval_every > 0 && step % s.eval_every == 0) || step == s.steps) {
      GROVE_ASSIGN_OR_RETURN(EvalResult r, evaluate("grpo"));
      line["eval_accuracy"] = r.accuracy;
      line["eval_reward"] = r.reward_mean;
      line["eval_format"] = r.format_rate;
    }
    metrics.Write(line);
    proc->client().SetCounter("step", static_cast<double>(step));
    proc->client().SetCounter("reward_mean", st.reward_mean);
    proc->client().SetCounter("kl", st.policy.kl_ref_k3_mean);
    proc->client().SetCounter("tokens_per_s", st.seconds > 0 ? st.tokens / st.seconds : 0.0);
    proc->client().SetCounter("staleness", st.staleness_mean);
    proc->client().SetCounter("weight_bytes_served", static_cast<double>(publisher->bytes_served()));
  }
  proc->ReportDraining();
  if (s.checkpoint_every > 0) GROVE_RETURN_IF_ERROR(trainer->SaveCheckpoint(ckpt_dir));
  LOG(INFO) << "learner done at step " << trainer->rl_steps() << ", version " << trainer->version();
  proc->Finish(0, "");
  return Status::OK();
}

}  // namespace

Status ValidateLearnerConfig(const Config& config, bool check_device) {
  GROVE_ASSIGN_OR_RETURN(LearnerSettings s, ParseSettings(config));
  GROVE_RETURN_IF_ERROR(ParseGrpoConfig(config, "learner.grpo").status());
  GROVE_ASSIGN_OR_RETURN(model::ModelConfig mc, model::ModelConfig::FromConfig(config.Section("model")));
  if (mc.vocab_size < model::CharTokenizer().vocab_size())
    return Status::InvalidArgument(config.source() + ": model.vocab_size is smaller than the tokenizer's");
  Config task_cfg = config.Section("task");
  GROVE_ASSIGN_OR_RETURN(std::string task_name, task_cfg.String("name", "arithmetic"));
  GROVE_RETURN_IF_ERROR(reward::MakeTask(task_name, task_cfg).status());
  GROVE_RETURN_IF_ERROR(actors::WeightsTransportOptions::FromConfig(config).status());
  if (!check_device) return Status::OK();
  GROVE_ASSIGN_OR_RETURN(LearnerDevice device, ParseLearnerDevice(s.device));
  if (device == LearnerDevice::kGpu && !GrpoTrainer::GpuAvailable())
    return Status::FailedPrecondition(config.source() +
                                      ": learner.device = gpu, but this process sees no GPU (or grove was built "
                                      "without CUDA)");
  return Status::OK();
}

int RunLearner(const RoleArgs& args) {
  Status s = RunLearnerLoop(args);
  if (!s.ok()) {
    LOG(ERROR) << "learner failed: " << s;
    return 1;
  }
  return 0;
}

}  // namespace grove::learner
