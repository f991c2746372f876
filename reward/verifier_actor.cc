#include "reward/verifier_actor.h"

#include <chrono>

#include <glog/logging.h>

#include "actors/latency_window.h"
#include "actors/process.h"
#include "actors/rpc_client.h"
#include "actors/socket.h"
#include "reward/composite_verifier.h"
#include "reward/registry.h"
#include "reward/scoring_pool.h"
#include "reward/task.h"

namespace grove::reward {
namespace {

using actors::BodyKind;

struct VerifierSettings {
  std::string spec;                 // "" : the task's own
  std::vector<std::string> plugins; // shared libraries to load
  int64_t workers = 1;
  int64_t sample_timeout_ms = 2000;
  int64_t memory_limit_mb = 1024;
  int64_t request_timeout_ms = 10000;
};

Result<VerifierSettings> ParseSettings(const Config& cfg) {
  Config s = cfg.Section("verifier");
  GROVE_RETURN_IF_ERROR(
      s.CheckKeys({"spec", "plugins", "workers", "sample_timeout_ms", "memory_limit_mb", "request_timeout_ms"}));
  VerifierSettings o;
  GROVE_ASSIGN_OR_RETURN(o.spec, s.String("spec", ""));
  GROVE_ASSIGN_OR_RETURN(o.plugins, s.StringList("plugins", std::vector<std::string>{}));
  GROVE_ASSIGN_OR_RETURN(o.workers, s.Int("workers", o.workers));
  GROVE_ASSIGN_OR_RETURN(o.sample_timeout_ms, s.Int("sample_timeout_ms", o.sample_timeout_ms));
  GROVE_ASSIGN_OR_RETURN(o.memory_limit_mb, s.Int("memory_limit_mb", o.memory_limit_mb));
  GROVE_ASSIGN_OR_RETURN(o.request_timeout_ms, s.Int("request_timeout_ms", o.request_timeout_ms));
  if (o.workers < 1 || o.workers > 64) return Status::InvalidArgument(cfg.source() + ": verifier.workers must be in [1, 64]");
  if (o.sample_timeout_ms < 1) return Status::InvalidArgument(cfg.source() + ": verifier.sample_timeout_ms must be >= 1");
  if (o.memory_limit_mb < 0) return Status::InvalidArgument(cfg.source() + ": verifier.memory_limit_mb must be >= 0");
  return o;
}

Status RunVerifierLoop(const RoleArgs& args) {
  GROVE_ASSIGN_OR_RETURN(VerifierSettings s, ParseSettings(args.config));
  Config task_cfg = args.config.Section("task");
  GROVE_ASSIGN_OR_RETURN(std::string task_name, task_cfg.String("name", "arithmetic"));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<Task> task, MakeTask(task_name, task_cfg));
  VerifierRegistry registry;
  for (const std::string& path : s.plugins) {
    GROVE_ASSIGN_OR_RETURN(std::string name, registry.LoadPlugin(path));
    LOG(INFO) << "loaded verifier plug-in '" << name << "' from " << path;
  }
  const std::string spec_text = s.spec.empty() ? task->verifier_spec() : s.spec;
  GROVE_ASSIGN_OR_RETURN(std::vector<WeightedVerifier> spec, ParseVerifierSpec(spec_text));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<Verifier> composite, MakeCompositeVerifier(registry, spec));
  // The pool forks its workers now, before any thread exists in this process.
  ScoringPoolOptions po;
  po.num_workers = static_cast<int>(s.workers);
  po.sample_timeout = std::chrono::milliseconds(s.sample_timeout_ms);
  po.memory_limit_bytes = static_cast<size_t>(s.memory_limit_mb) << 20;
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<ScoringPool> pool,
                         ScoringPool::Start(std::shared_ptr<const Verifier>(std::move(composite)), po));

  actors::RouterSocket socket;
  GROVE_ASSIGN_OR_RETURN(std::string endpoint, socket.Bind(args.bind.empty() ? "tcp://127.0.0.1:0" : args.bind));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<actors::ActorProcess> proc,
                         actors::ActorProcess::Start(args, wire::Role::VERIFIER, endpoint));
  LOG(INFO) << "scoring '" << task_name << "' with " << FormatVerifierSpec(spec) << " on " << endpoint;
  proc->client().SetDetail(FormatVerifierSpec(spec));
  std::unique_ptr<actors::RpcClient> replay;

  uint64_t groups = 0, samples = 0;
  double reward_ema = 0, score_seconds = 0;
  // reward_latency: this verifier received a group -> its scores exist.
  // rollout_to_scored: the rollout finished generating it -> its scores exist
  // (wall clocks of two hosts: as good as their time sync; resends included).
  actors::LatencyWindow reward_latency, rollout_to_scored;
  bool have_ema = false;
  while (!proc->draining()) {
    std::optional<actors::Incoming> in = socket.Receive(100);
    if (!in) continue;
    Result<actors::Frame> frame =
        actors::DecodeFrame(in->payload.data(), in->payload.size(), {BodyKind::SAMPLE_GROUP}, &socket.stats());
    if (!frame.ok()) continue;  // counted, logged once per kind
    const auto received = std::chrono::steady_clock::now();
    auto env = frame->envelope();
    auto group = env.getBody().getSampleGroup();
    auto prompt = group.getPrompt();
    std::vector<VerifyInput> inputs;
    for (auto smp : group.getSamples()) {
      VerifyInput vi;
      vi.prompt = std::string_view(prompt.getText().cStr(), prompt.getText().size());
      vi.completion = std::string_view(smp.getText().cStr(), smp.getText().size());
      vi.reference = std::string_view(prompt.getReference().cStr(), prompt.getReference().size());
      vi.token_count = static_cast<long long>(smp.getTokens().size());
      inputs.push_back(vi);
    }
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<VerifyOutput> scores = pool->Score(inputs);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    score_seconds += ms / 1000;
    reward_latency.Add(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - received).count());
    if (group.getCreatedAtMs() > 0) rollout_to_scored.Add(static_cast<double>(actors::WallClockMs() - group.getCreatedAtMs()));

    capnp::MallocMessageBuilder mb;
    auto out = actors::InitEnvelope(mb, args.id, 0);
    auto sg = out.getBody().initScoredGroup();
    sg.setGroup(group);
    sg.setVerifierId(args.id);
    sg.setScoreMs(ms);
    auto rewards = sg.initRewards(static_cast<unsigned>(scores.size()));
    double sum = 0;
    for (size_t i = 0; i < scores.size(); ++i) {
      auto r = rewards[static_cast<unsigned>(i)];
      r.setTotal(scores[i].reward);
      r.setReason(scores[i].reason.substr(0, 200));
      auto subs = r.initScores(static_cast<unsigned>(scores[i].scores.size()));
      for (size_t j = 0; j < scores[i].scores.size(); ++j) {
        subs[static_cast<unsigned>(j)].setName(scores[i].scores[j].name);
        subs[static_cast<unsigned>(j)].setValue(scores[i].scores[j].value);
      }
      sum += scores[i].reward;
    }

    // Forward to the store; its ack (or why not) goes back to the rollout.
    capnp::MallocMessageBuilder reply_mb;
    auto reply = actors::InitEnvelope(reply_mb, args.id, env.getRequestId());
    auto ack = reply.getBody().initInsertAck();
    ack.setGroupId(group.getGroupId());
    if (!replay) {
      Result<std::vector<actors::PeerEndpoint>> peers = proc->client().Lookup(wire::Role::REPLAY);
      if (peers.ok() && !peers->empty()) {
        replay = std::make_unique<actors::RpcClient>(args.id);
        if (!replay->Connect(peers->front().address).ok()) replay.reset();
      }
    }
    if (!replay) {
      ack.setAccepted(false);
      ack.setReason("no replay store reachable");
      ack.setRetryAfterMs(500);
    } else {
      Result<actors::Frame> stored = replay->Call(mb, {BodyKind::INSERT_ACK}, static_cast<int>(s.request_timeout_ms));
      if (stored.ok()) {
        auto a = stored->envelope().getBody().getInsertAck();
        ack.setAccepted(a.getAccepted());
        ack.setDuplicate(a.getDuplicate());
        ack.setReason(a.getReason());
        ack.setRetryAfterMs(a.getRetryAfterMs());
      } else {
        replay.reset();  // it may have restarted elsewhere: look it up again next time
        ack.setAccepted(false);
        ack.setReason("replay store: " + stored.status().ToString());
        ack.setRetryAfterMs(200);
      }
    }
    Status sent = socket.Send(in->peer, actors::EncodeFrame(reply_mb));
    if (!sent.ok()) VLOG(1) << "ack to a gone rollout worker: " << sent;

    ++groups;
    samples += scores.size();
    const double mean = scores.empty() ? 0 : sum / scores.size();
    reward_ema = have_ema ? 0.9 * reward_ema + 0.1 * mean : mean;
    have_ema = true;
    auto& client = proc->client();
    client.SetCounter("groups_scored", static_cast<double>(groups));
    client.SetCounter("scored_per_s", score_seconds > 0 ? samples / score_seconds : 0);
    client.SetCounter("reward_mean", reward_ema);
    client.SetCounter("verifier_failures", static_cast<double>(pool->stats().failed));
    client.SetCounter("bad_frames", static_cast<double>(socket.stats().Total()));
    reward_latency.Publish(client, "reward_latency");
    rollout_to_scored.Publish(client, "rollout_to_scored");
  }
  proc->ReportDraining();
  proc->Finish(0, "");
  return Status::OK();
}

}  // namespace

int RunVerifier(const RoleArgs& args) {
  Status s = RunVerifierLoop(args);
  if (!s.ok()) {
    LOG(ERROR) << "verifier failed: " << s;
    return 1;
  }
  return 0;
}

}  // namespace grove::reward
