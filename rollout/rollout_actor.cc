#include "rollout/rollout_actor.h"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include <cblas.h>
#include <glog/logging.h>

#include "actors/latency_window.h"
#include "actors/process.h"
#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "actors/weights_transport.h"
#include "model/prompt_format.h"
#include "model/tokenizer.h"
#include "model/param_layout.h"
#include "model/transformer.h"
#include "reward/task.h"
#include "rollout/generation_backend.h"
#include "rollout/policy_quantizer.h"
#include "rollout/weight_fetch.h"

namespace grove::rollout {
namespace {

using actors::BodyKind;

struct RolloutSettings {
  int64_t group_size = 8;
  int64_t prompts_per_request = 2;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;
  int64_t max_new_tokens = 32;
  QuantizeSettings quantize;
  BackendSettings backend;
  int64_t request_timeout_ms = 10000;
  int64_t blas_threads = 1;
  // Append "GROUP_ID VERSION" to RUN_DIR/acks/ID.log for every group the
  // store acknowledged: the senders' own record, which an audit holds against
  // the store's contents (tests/chaos). Off by default: one line per group.
  bool ack_log = false;
};

Result<RolloutSettings> ParseSettings(const Config& cfg) {
  Config s = cfg.Section("rollout");
  std::vector<std::string_view> keys = {"group_size",     "prompts_per_request", "temperature", "top_p", "top_k",
                                        "max_new_tokens", "request_timeout_ms",  "blas_threads", "ack_log"};
  keys.insert(keys.end(), QuantizeKeys().begin(), QuantizeKeys().end());
  keys.insert(keys.end(), BackendKeys().begin(), BackendKeys().end());
  GROVE_RETURN_IF_ERROR(s.CheckKeys(keys));
  RolloutSettings o;
  GROVE_ASSIGN_OR_RETURN(o.group_size, s.Int("group_size", o.group_size));
  GROVE_ASSIGN_OR_RETURN(o.prompts_per_request, s.Int("prompts_per_request", o.prompts_per_request));
  GROVE_ASSIGN_OR_RETURN(o.temperature, s.Double("temperature", o.temperature));
  GROVE_ASSIGN_OR_RETURN(o.top_p, s.Double("top_p", o.top_p));
  GROVE_ASSIGN_OR_RETURN(o.top_k, s.Int("top_k", o.top_k));
  GROVE_ASSIGN_OR_RETURN(o.max_new_tokens, s.Int("max_new_tokens", o.max_new_tokens));
  GROVE_ASSIGN_OR_RETURN(o.quantize, ParseQuantizeSettings(s));
  GROVE_ASSIGN_OR_RETURN(o.backend, ParseBackendSettings(s));
  GROVE_ASSIGN_OR_RETURN(o.request_timeout_ms, s.Int("request_timeout_ms", o.request_timeout_ms));
  GROVE_ASSIGN_OR_RETURN(o.blas_threads, s.Int("blas_threads", o.blas_threads));
  GROVE_ASSIGN_OR_RETURN(o.ack_log, s.Bool("ack_log", o.ack_log));
  if (o.group_size < 2 || o.group_size > 1024)
    return Status::InvalidArgument(cfg.source() + ": rollout.group_size must be in [2, 1024] (GRPO compares within a group)");
  if (o.prompts_per_request < 1) return Status::InvalidArgument(cfg.source() + ": rollout.prompts_per_request must be >= 1");
  if (!(o.temperature > 0)) return Status::InvalidArgument(cfg.source() + ": rollout.temperature must be > 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) return Status::InvalidArgument(cfg.source() + ": rollout.top_p must be in (0, 1]");
  if (o.max_new_tokens < 1) return Status::InvalidArgument(cfg.source() + ": rollout.max_new_tokens must be >= 1");
  if (o.request_timeout_ms < 10) return Status::InvalidArgument(cfg.source() + ": rollout.request_timeout_ms must be >= 10");
  return o;
}

// Installs a received snapshot into the engine: the layout must match the
// model's exactly, then the weights are quantized as configured.
// device_flat: the weights on the engine's GPU (snap.flat is empty then).
Status InstallWeights(actors::WeightSnapshot& snap, const float* device_flat, const model::ParamLayout& layout,
                      GenerationBackend& engine) {
  const auto& tensors = layout.tensors();
  uint64_t floats = snap.flat.size();
  for (const actors::TensorSpec& t : snap.tensors) floats = std::max(floats, t.offset + t.count);
  if (snap.tensors.size() != tensors.size() || (device_flat == nullptr && snap.flat.size() != floats) ||
      floats != static_cast<uint64_t>(layout.total()))
    return Status::InvalidArgument("received weights have " + std::to_string(snap.tensors.size()) +
                                   " tensors, this model has " + std::to_string(tensors.size()) +
                                   ": learner and rollout configs differ");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& a = snap.tensors[i];
    const auto& b = tensors[i];
    if (a.name != b.name || a.shape != b.shape || a.offset != static_cast<uint64_t>(b.offset))
      return Status::InvalidArgument("received tensor '" + a.name + "' does not match this model's '" + b.name + "'");
  }
  if (device_flat != nullptr) return engine.InstallFromDevice(snap.version, snap.tensors, device_flat);
  return engine.Install(snap.version, snap.tensors, snap.flat);
}

uint64_t Mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

class VerifierLinks {
 public:
  VerifierLinks(actors::ActorProcess& proc, std::string id) : proc_(proc), id_(std::move(id)) {}

  // The next verifier in round-robin order, refreshing the list when empty.
  Result<actors::RpcClient*> Next() {
    if (links_.empty()) {
      GROVE_ASSIGN_OR_RETURN(auto peers, proc_.client().Lookup(wire::Role::VERIFIER));
      for (const auto& p : peers) {
        auto rpc = std::make_unique<actors::RpcClient>(id_);
        if (rpc->Connect(p.address).ok()) links_.push_back({p.id, std::move(rpc)});
      }
      if (links_.empty()) return Status::Unavailable("no verifier registered");
    }
    cursor_ = (cursor_ + 1) % links_.size();
    return links_[cursor_].rpc.get();
  }
  // Forgets every link (one failed: the set may have changed).
  void Reset() { links_.clear(); }

 private:
  struct Link {
    std::string id;
    std::unique_ptr<actors::RpcClient> rpc;
  };
  actors::ActorProcess& proc_;
  std::string id_;
  std::vector<Link> links_;
  size_t cursor_ = 0;
};

Status RunRolloutLoop(const RoleArgs& args) {
  GROVE_ASSIGN_OR_RETURN(RolloutSettings s, ParseSettings(args.config));
  openblas_set_num_threads(static_cast<int>(std::max<int64_t>(1, s.blas_threads)));
  GROVE_ASSIGN_OR_RETURN(model::ModelConfig mc, model::ModelConfig::FromConfig(args.config.Section("model")));
  const model::ParamLayout layout(mc);
  model::CharTokenizer tok;
  // Plan mode calibrates on prompts of the task this cluster trains on.
  std::vector<std::vector<int32_t>> calibration;
  if (s.quantize.mode == QuantizeMode::kPlan) {
    Config task_cfg = args.config.Section("task");
    GROVE_ASSIGN_OR_RETURN(std::string task_name, task_cfg.String("name", "arithmetic"));
    GROVE_ASSIGN_OR_RETURN(std::unique_ptr<reward::Task> task, reward::MakeTask(task_name, task_cfg));
    for (int64_t i = 0; i < s.quantize.plan_sequences; ++i) {
      GROVE_ASSIGN_OR_RETURN(std::vector<int32_t> p,
                             model::EncodePrompt(tok, task->Generate(reward::Split::kTrain, uint64_t(i)).prompt));
      if (static_cast<int64_t>(p.size()) < mc.max_seq_len) calibration.push_back(std::move(p));
    }
    if (calibration.empty()) return Status::InvalidArgument("rollout: no task prompt fits the model's context");
  }
  // The engine before the process registers: a worker that cannot sample
  // where it was told to (rollout.device = gpu) fails at start, clearly.
  GROVE_ASSIGN_OR_RETURN(
      std::unique_ptr<GenerationBackend> engine,
      MakeGenerationBackend(s.backend, mc, args.id,
                            std::make_unique<PolicyQuantizer>(s.quantize, std::move(calibration), tok.eos_id())));
  const PolicyQuantizer& quantizer = engine->quantizer();
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<actors::ActorProcess> proc,
                         actors::ActorProcess::Start(args, wire::Role::ROLLOUT, ""));
  actors::ActorClient& client = proc->client();
  std::unique_ptr<actors::RpcClient> learner;
  VerifierLinks verifiers(*proc, args.id);
  FetchOptions fetch;
  fetch.timeout_ms = static_cast<int>(s.request_timeout_ms);
  fetch.ipc_to_device = engine->installs_from_device();
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> weight_source,
                         WeightSource::Start(args.config, args.id, args.coordinator, engine->gpu(), fetch,
                                             [&client] { return client.coordinator_policy_version(); }));
  WeightSource& weights = *weight_source;
  actors::LatencyWindow stall(64);

  std::ofstream ack_log;
  if (s.ack_log) {
    if (args.run_dir.empty()) return Status::InvalidArgument("rollout.ack_log needs a run directory (--run_dir)");
    std::filesystem::create_directories(args.run_dir + "/acks");
    const std::string path = args.run_dir + "/acks/" + args.id + ".log";
    ack_log.open(path, std::ios::app);
    if (!ack_log) return Status::IOError("cannot open " + path);
  }

  int64_t version = -1;
  uint64_t groups_sent = 0, tokens_total = 0, prompts_total = 0, resends = 0;
  double gen_seconds = 0;
  const auto start = std::chrono::steady_clock::now();
  // Fetches and installs the learner's newest version if it is newer than
  // ours. Transport trouble is logged and retried later; only weights that
  // do not fit this model's config are an error.
  auto update_weights = [&]() -> Status {
    if (weights.needs_learner() && !learner) {
      Result<std::vector<actors::PeerEndpoint>> peers = client.Lookup(wire::Role::LEARNER);
      if (peers.ok() && !peers->empty()) {
        learner = std::make_unique<actors::RpcClient>(args.id);
        if (!learner->Connect(peers->front().address).ok()) learner.reset();
      }
      if (!learner) return Status::OK();
    }
    const auto t0 = std::chrono::steady_clock::now();
    Result<std::optional<actors::WeightSnapshot>> got = weights.TakeNewer(learner.get(), version);
    if (!got.ok()) {
      if (got.status().code() == StatusCode::kInternal) return got.status();
      LOG_EVERY_N(WARNING, 10) << "weight fetch: " << got.status();
      if (got.status().code() != StatusCode::kAborted) learner.reset();
      return Status::OK();
    }
    if (!got->has_value()) return Status::OK();
    // The stall this version costs the loop: receive (the whole transfer
    // when fetched, the hand-over when a feed received it in the background),
    // then quantize and switch the engine to it.
    const auto t1 = std::chrono::steady_clock::now();
    GROVE_RETURN_IF_ERROR(InstallWeights(**got, weights.device_weights(), layout, *engine));
    const QuantizationReport& q = quantizer.report();
    version = (*got)->version;
    client.SetPolicyVersion(version);
    const auto t2 = std::chrono::steady_clock::now();
    const double receive_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    const double install_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
    const double ms = receive_ms + install_ms;
    stall.Add(ms);
    stall.Publish(client, "weight_stall");
    client.SetCounter("weight_stall_ms", ms);
    client.SetCounter("weight_receive_ms", receive_ms);
    client.SetCounter("weight_install_ms", install_ms);
    LOG(INFO) << "policy version " << version << " on " << engine->name() << " via " << weights.name() << ": stall "
              << ms << " ms (receive " << receive_ms << " ms, quantize + switch " << install_ms << " ms"
              << (engine->last_device_load_seconds() > 0
                      ? ", device load " + std::to_string(1e3 * engine->last_device_load_seconds()) + " ms"
                      : std::string())
              << "); p50 " << stall.Quantile(0.5) << " ms over " << stall.window_size() << " versions";
    client.SetDetail(engine->Detail());
    if (quantizer.plan()) {
      client.SetCounter("plan_s", quantizer.plan_seconds());
      client.SetCounter("plan_kl", quantizer.mismatch().mean_kl);
      client.SetCounter("plan_routes_differ", quantizer.mismatch().routes_differ);
    }
    VLOG(1) << "policy version " << version << ": " << q.tensors_quantized << " tensors quantized, rel err "
            << q.rel_l2_error;
    return Status::OK();
  };
  while (!proc->draining()) {
    // Weights: between requests only, so a group never mixes versions.
    if (version < 0 || client.coordinator_policy_version() > version) {
      GROVE_RETURN_IF_ERROR(update_weights());
      if (version < 0) {
        proc->WaitFor(200);
        continue;
      }
    }

    Result<actors::WorkBatch> work = client.RequestWork(static_cast<uint32_t>(s.prompts_per_request), version);
    if (!work.ok()) {
      LOG_EVERY_N(WARNING, 10) << "work request: " << work.status();
      proc->WaitFor(200);
      continue;
    }
    if (work->prompts.empty()) {
      proc->WaitFor(static_cast<int>(std::clamp<uint32_t>(work->retry_after_ms, 10, 1000)));
      continue;
    }
    // A newer policy exists: take it before sampling, so these prompts are
    // not sampled from weights the learner is about to find too stale.
    if (work->policy_version > version) GROVE_RETURN_IF_ERROR(update_weights());
    auto sampling = [&](uint64_t prompt_id) {
      model::SamplingOptions so;
      so.temperature = s.temperature;
      so.top_p = s.top_p;
      so.top_k = s.top_k;
      so.max_new_tokens = s.max_new_tokens;
      so.stop_tokens = {tok.eos_id()};
      so.seed = Mix(Mix(Mix(std::hash<std::string>{}(args.id), prompt_id), static_cast<uint64_t>(version)),
                    args.restarts);
      return so;
    };
    std::vector<Result<std::vector<int32_t>>> encoded;
    for (const Prompt& p : work->prompts) encoded.push_back(model::EncodePrompt(tok, p.text));
    auto sampleable = [&](size_t i) {
      return encoded[i].ok() && static_cast<int64_t>(encoded[i]->size()) < mc.max_seq_len;
    };
    // The GPU engine samples every group of the request in one batch; the
    // groups are then sent one by one as on the CPU.
    std::vector<std::vector<model::Completion<float>>> joined;
    double joined_ms = 0;
    if (engine->joins_groups()) {
      std::vector<std::vector<int32_t>> all;
      for (size_t i = 0; i < encoded.size(); ++i)
        if (sampleable(i)) all.insert(all.end(), static_cast<size_t>(s.group_size), *encoded[i]);
      if (!all.empty()) {
        const auto t0 = std::chrono::steady_clock::now();
        GROVE_ASSIGN_OR_RETURN(std::vector<model::Completion<float>> comps,
                               engine->Generate(all, sampling(work->prompts.front().id)));
        joined_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        gen_seconds += joined_ms / 1e3;
        if (comps.size() != all.size())
          return Status::Internal("the engine returned " + std::to_string(comps.size()) + " completions for " +
                                  std::to_string(all.size()) + " prompts");
        joined.resize(encoded.size());
        size_t next = 0;
        for (size_t i = 0; i < encoded.size(); ++i) {
          if (!sampleable(i)) continue;
          for (int64_t k = 0; k < s.group_size; ++k) joined[i].push_back(std::move(comps[next++]));
        }
      }
    }
    std::vector<uint64_t> done;
    for (size_t pi = 0; pi < work->prompts.size(); ++pi) {
      const Prompt& p = work->prompts[pi];
      const Result<std::vector<int32_t>>& ptoks = encoded[pi];
      if (!sampleable(pi)) {
        // A prompt the model cannot read is the task's fault: report it done
        // so it is not handed out forever, and say so.
        LOG(ERROR) << "prompt " << p.id << " cannot be sampled: "
                   << (ptoks.ok() ? "longer than the model's context" : ptoks.status().ToString());
        done.push_back(p.id);
        continue;
      }
      std::vector<model::Completion<float>> completions;
      double generate_ms = joined_ms;
      if (!joined.empty()) {
        completions = std::move(joined[pi]);
      } else {
        std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(s.group_size), *ptoks);
        const auto t0 = std::chrono::steady_clock::now();
        GROVE_ASSIGN_OR_RETURN(completions, engine->Generate(prompts, sampling(p.id)));
        generate_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        gen_seconds += generate_ms / 1e3;
      }

      capnp::MallocMessageBuilder mb;
      auto env = actors::InitEnvelope(mb, args.id, 0);
      auto g = env.getBody().initSampleGroup();
      const std::string group_id = args.id + ":" + std::to_string(args.restarts) + ":" + std::to_string(p.id);
      g.setGroupId(group_id);
      auto wp = g.initPrompt();
      wp.setId(p.id);
      wp.setTask(p.task);
      wp.setText(p.text);
      wp.setReference(p.reference);
      wp.setSplit("train");
      auto pt = g.initPromptTokens(static_cast<unsigned>(ptoks->size()));
      for (size_t i = 0; i < ptoks->size(); ++i) pt.set(static_cast<unsigned>(i), (*ptoks)[i]);
      g.setPolicyVersion(version);
      g.setRolloutId(args.id);
      g.setGenerateMs(generate_ms);
      g.setCreatedAtMs(actors::WallClockMs());
      const size_t row = static_cast<size_t>(mc.moe_layers() * mc.top_k);
      const size_t prompt_route_values = row * ptoks->size();
      if (row > 0 && !completions.empty() && completions[0].routes.size() >= prompt_route_values) {
        auto pr = g.initPromptRoutedExperts(static_cast<unsigned>(prompt_route_values));
        for (size_t i = 0; i < prompt_route_values; ++i) pr.set(static_cast<unsigned>(i), completions[0].routes[i]);
      }
      auto samples = g.initSamples(static_cast<unsigned>(completions.size()));
      for (size_t i = 0; i < completions.size(); ++i) {
        const auto& c = completions[i];
        auto smp = samples[static_cast<unsigned>(i)];
        auto t = smp.initTokens(static_cast<unsigned>(c.tokens.size()));
        auto lp = smp.initLogprobs(static_cast<unsigned>(c.logprobs.size()));
        for (size_t j = 0; j < c.tokens.size(); ++j) t.set(static_cast<unsigned>(j), c.tokens[j]);
        for (size_t j = 0; j < c.logprobs.size(); ++j) lp.set(static_cast<unsigned>(j), c.logprobs[j]);
        if (row > 0 && c.routes.size() >= prompt_route_values) {
          auto re = smp.initRoutedExperts(static_cast<unsigned>(c.routes.size() - prompt_route_values));
          for (size_t j = prompt_route_values; j < c.routes.size(); ++j)
            re.set(static_cast<unsigned>(j - prompt_route_values), c.routes[j]);
        }
        smp.setMoeLayers(static_cast<uint16_t>(mc.moe_layers()));
        smp.setTopK(static_cast<uint16_t>(mc.top_k));
        smp.setPolicyVersion(version);
        smp.setFinish(c.finish == model::FinishReason::kStop ? wire::FinishReason::STOP : wire::FinishReason::LENGTH);
        Result<std::string> text = model::DecodeCompletion(tok, c.tokens);
        smp.setText(text.ok() ? *text : std::string());
        tokens_total += c.tokens.size();
      }

      // Deliver until stored: the verifier answers with the store's ack.
      bool stored = false;
      while (!stored && !proc->stopping()) {
        Result<actors::RpcClient*> v = verifiers.Next();
        // Plain sleeps here: WaitFor returns at once while draining, and a
        // draining worker still delivers the group it holds.
        if (!v.ok()) {  // no verifier yet (or all gone): keep the group and wait
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
          continue;
        }
        Result<actors::Frame> ack = (*v)->Call(mb, {BodyKind::INSERT_ACK}, static_cast<int>(s.request_timeout_ms));
        if (!ack.ok()) {
          ++resends;
          LOG(WARNING) << "group " << p.id << " not acknowledged (" << ack.status() << "); sending again";
          verifiers.Reset();
          continue;
        }
        auto a = ack->envelope().getBody().getInsertAck();
        if (a.getAccepted()) {
          stored = true;
          if (ack_log.is_open()) ack_log << group_id << " " << version << std::endl;
        } else {
          // Back-pressure from the store: wait as told, then send again.
          ++resends;
          std::this_thread::sleep_for(std::chrono::milliseconds(std::clamp<uint32_t>(a.getRetryAfterMs(), 20, 2000)));
        }
      }
      if (!stored) break;  // stopping: the lease returns the prompt to the queue
      done.push_back(p.id);
      ++groups_sent;
      ++prompts_total;
    }
    if (!done.empty()) {
      Status st = client.PromptDone(done);
      if (!st.ok()) LOG(WARNING) << "prompt done: " << st;
    }
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    client.SetCounter("groups_sent", static_cast<double>(groups_sent));
    client.SetCounter("tokens_per_s", gen_seconds > 0 ? tokens_total / gen_seconds : 0);
    client.SetCounter("prompts_per_s", wall > 0 ? prompts_total / wall : 0);
    client.SetCounter("resends", static_cast<double>(resends));
  }
  proc->ReportDraining();
  proc->Finish(0, "");
  return Status::OK();
}

}  // namespace

Status ValidateRolloutConfig(const Config& config, bool check_device) {
  GROVE_ASSIGN_OR_RETURN(RolloutSettings s, ParseSettings(config));
  GROVE_ASSIGN_OR_RETURN(model::ModelConfig mc, model::ModelConfig::FromConfig(config.Section("model")));
  if (mc.vocab_size < model::CharTokenizer().vocab_size())
    return Status::InvalidArgument(config.source() + ": model.vocab_size is smaller than the tokenizer's");
  Config task_cfg = config.Section("task");
  GROVE_ASSIGN_OR_RETURN(std::string task_name, task_cfg.String("name", "arithmetic"));
  GROVE_RETURN_IF_ERROR(reward::MakeTask(task_name, task_cfg).status());
  GROVE_RETURN_IF_ERROR(actors::WeightsTransportOptions::FromConfig(config).status());
  if (!check_device || s.backend.device != RolloutDevice::kGpu) return Status::OK();
  const int count = GenerationGpuCount();
  if (count == 0)
    return Status::FailedPrecondition(config.source() +
                                      ": rollout.device = gpu, but this build has no GPU engine or this process "
                                      "sees no GPU");
  return PickGpu(s.backend.gpu, "rollout-0", count).status();
}

int RunRollout(const RoleArgs& args) {
  Status s = RunRolloutLoop(args);
  if (!s.ok()) {
    LOG(ERROR) << "rollout failed: " << s;
    return 1;
  }
  return 0;
}

}  // namespace grove::rollout
