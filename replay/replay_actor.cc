#include "replay/replay_actor.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include <capnp/serialize.h>
#include <glog/logging.h>

#include "actors/process.h"
#include "actors/socket.h"
#include "replay/replay_config.h"
#include "replay/replay_service.h"

namespace grove::replay {
namespace {

using actors::BodyKind;

Result<ReplayOptions> ParseOptions(const RoleArgs& args) {
  // The store lives in the run directory unless [replay] path says otherwise.
  Config cfg = args.config;
  if (!cfg.Has("replay.path")) {
    const std::string base = args.run_dir.empty() ? "." : args.run_dir;
    GROVE_RETURN_IF_ERROR(cfg.Override("replay.path=\"" + base + "/replay\""));
  }
  return ReplayOptionsFromConfig(cfg.Section("replay"));
}

std::string Serialize(wire::ScoredGroup::Reader group) {
  capnp::MallocMessageBuilder mb;
  mb.setRoot(group);
  kj::Array<capnp::word> words = capnp::messageToFlatArray(mb);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

struct Reply {
  std::string peer;
  std::string frame;
};

class ReplayServer {
 public:
  ReplayServer(const RoleArgs& args, ReplayService& service, actors::RouterSocket& socket)
      : args_(args), service_(service), socket_(socket) {}

  // Inserts block until durable: they run on worker threads so that
  // concurrent ones share one fsync (group commit).
  void StartWorkers(int n) {
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { Work(); });
  }
  void StopWorkers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void Handle(actors::Incoming& in) {
    Result<actors::Frame> frame = actors::DecodeFrame(
        in.payload.data(), in.payload.size(),
        {BodyKind::SCORED_GROUP, BodyKind::BATCH_REQUEST, BodyKind::CONSUME_MARK, BodyKind::CURSOR_REQUEST},
        &socket_.stats());
    if (!frame.ok()) return;  // counted and logged once per kind
    auto env = frame->envelope();
    if (frame->kind() == BodyKind::SCORED_GROUP) {
      auto sg = env.getBody().getScoredGroup();
      Job job{in.peer, env.getRequestId(), GroupRecord{sg.getGroup().getGroupId().cStr(),
                                                       sg.getGroup().getPolicyVersion(), Serialize(sg), 0}};
      if (job.record.group_id.empty()) {
        Send(job.peer, job.request_id, [](wire::Envelope::Body::Builder b) {
          b.initError().setMessage("scored group without an id");
        });
        return;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        jobs_.push_back(std::move(job));
      }
      cv_.notify_one();
      return;
    }
    if (frame->kind() == BodyKind::BATCH_REQUEST) {
      auto req = env.getBody().getBatchRequest();
      const size_t n = std::min<uint32_t>(req.getBatchSize(), 4096);
      Result<SampledBatch> b =
          service_.SampleBatch(n, req.getLearnerVersion(), req.getMaxStaleness(), req.getConsumerId().cStr());
      capnp::MallocMessageBuilder mb;
      auto out = actors::InitEnvelope(mb, args_.id, env.getRequestId());
      if (!b.ok()) {
        out.getBody().initError().setMessage(b.status().ToString());
      } else {
        auto batch = out.getBody().initBatch();
        batch.setDroppedStale(b->dropped_stale);
        batch.setReady(b->ready && !b->groups.empty());
        batch.setRetryAfterMs(b->ready ? 0 : 50);
        auto groups = batch.initGroups(static_cast<unsigned>(b->groups.size()));
        for (size_t i = 0; i < b->groups.size(); ++i) {
          const std::string& p = b->groups[i].payload;
          kj::Array<capnp::word> words = kj::heapArray<capnp::word>((p.size() + 7) / 8);
          memcpy(words.begin(), p.data(), p.size());
          capnp::FlatArrayMessageReader reader(words);
          groups.setWithCaveats(static_cast<unsigned>(i), reader.getRoot<wire::ScoredGroup>());
        }
      }
      Post(in.peer, actors::EncodeFrame(mb));
      return;
    }
    if (frame->kind() == BodyKind::CONSUME_MARK) {
      auto mark = env.getBody().getConsumeMark();
      std::vector<std::string> ids;
      for (auto id : mark.getGroupIds()) ids.emplace_back(id.cStr());
      Result<uint64_t> marked = service_.MarkConsumed(ids, mark.getLearnerVersion(), mark.getConsumerId().cStr());
      Send(in.peer, env.getRequestId(), [&](wire::Envelope::Body::Builder b) {
        if (marked.ok()) {
          b.initConsumeAck().setMarked(static_cast<uint32_t>(*marked));
        } else {
          b.initError().setMessage(marked.status().ToString());
        }
      });
      return;
    }
    auto req = env.getBody().getCursorRequest();
    // A consumer reads its cursor when it (re)starts: the batches it had
    // leased died with its previous process, so serve them again.
    if (uint64_t n = service_.ReleaseLeases(req.getConsumerId().cStr()))
      LOG(INFO) << "released " << n << " groups leased to " << req.getConsumerId().cStr() << " (it restarted)";
    Result<DataCursor> cursor = service_.Cursor(req.getConsumerId().cStr());
    Send(in.peer, env.getRequestId(), [&](wire::Envelope::Body::Builder b) {
      if (cursor.ok()) {
        auto c = b.initCursorReply();
        c.setLearnerVersion(cursor->learner_version);
        c.setConsumed(cursor->consumed);
      } else {
        b.initError().setMessage(cursor.status().ToString());
      }
    });
  }

  // Sends the replies the insert workers produced (ZeroMQ sockets belong to
  // one thread: workers never touch the socket).
  void Flush() {
    std::deque<Reply> out;
    {
      std::lock_guard<std::mutex> lock(reply_mu_);
      out.swap(replies_);
    }
    for (Reply& r : out) {
      Status s = socket_.Send(r.peer, std::move(r.frame));
      if (!s.ok()) VLOG(1) << "reply to a gone peer: " << s;
    }
  }

 private:
  struct Job {
    std::string peer;
    uint64_t request_id;
    GroupRecord record;
  };

  template <typename Fill>
  void Send(const std::string& peer, uint64_t request_id, Fill fill) {
    capnp::MallocMessageBuilder mb;
    fill(actors::InitEnvelope(mb, args_.id, request_id).getBody());
    Post(peer, actors::EncodeFrame(mb));
  }
  void Post(const std::string& peer, std::string frame) {
    std::lock_guard<std::mutex> lock(reply_mu_);
    replies_.push_back({peer, std::move(frame)});
  }

  void Work() {
    while (true) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      Result<InsertOutcome> r = service_.Insert(job.record);
      Send(job.peer, job.request_id, [&](wire::Envelope::Body::Builder b) {
        auto ack = b.initInsertAck();
        ack.setGroupId(job.record.group_id);
        if (r.ok()) {
          ack.setAccepted(true);
          ack.setDuplicate(*r == InsertOutcome::kDuplicate);
          if (*r == InsertOutcome::kBelowRetentionFloor) ack.setReason("older than the retention floor: dropped as stale");
        } else if (r.status().code() == StatusCode::kResourceExhausted) {
          ack.setAccepted(false);
          ack.setReason(r.status().message());
          ack.setRetryAfterMs(100);
        } else {
          ack.setAccepted(false);
          ack.setReason(r.status().ToString());
          ack.setRetryAfterMs(500);
        }
      });
    }
  }

  const RoleArgs& args_;
  ReplayService& service_;
  actors::RouterSocket& socket_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
  std::mutex reply_mu_;
  std::deque<Reply> replies_;
};

Status RunReplayLoop(const RoleArgs& args) {
  GROVE_ASSIGN_OR_RETURN(ReplayOptions options, ParseOptions(args));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<ReplayService> service, ReplayService::Open(options));
  actors::RouterSocket socket;
  GROVE_ASSIGN_OR_RETURN(std::string endpoint, socket.Bind(args.bind.empty() ? "tcp://127.0.0.1:0" : args.bind));
  GROVE_ASSIGN_OR_RETURN(std::unique_ptr<actors::ActorProcess> proc,
                         actors::ActorProcess::Start(args, wire::Role::REPLAY, endpoint));
  LOG(INFO) << "replay store at " << options.store.path << " (" << SyncModeName(options.store.sync_mode)
            << ") serving on " << endpoint;
  ReplayServer server(args, *service, socket);
  // Enough concurrent inserts for group commit to share an fsync between
  // the verifiers' sends; each thread only waits on the store.
  server.StartWorkers(4);
  int64_t last_report = 0;
  while (!proc->draining()) {
    std::optional<actors::Incoming> in = socket.Receive(5);
    if (in) server.Handle(*in);
    server.Flush();
    if (actors::MonotonicMs() - last_report > 250) {
      last_report = actors::MonotonicMs();
      ReplayCounters c = service->Counters();
      auto& client = proc->client();
      client.SetCounter("groups_stored", static_cast<double>(c.stored));
      client.SetCounter("bytes_stored", static_cast<double>(c.stored_bytes));
      client.SetCounter("served", static_cast<double>(c.served));
      client.SetCounter("dropped_stale", static_cast<double>(c.dropped_stale));
      client.SetCounter("consumed", static_cast<double>(c.consumed));
      client.SetCounter("duplicates", static_cast<double>(c.duplicates));
      client.SetCounter("queue_depth", static_cast<double>(c.queue_depth));
      client.SetCounter("refused_full", static_cast<double>(c.refused_full));
      client.SetCounter("bad_frames", static_cast<double>(socket.stats().Total()));
    }
  }
  proc->ReportDraining();
  // Finish the inserts already taken, answer them, then close the store.
  server.StopWorkers();
  server.Flush();
  service->Close();
  proc->Finish(0, "");
  return Status::OK();
}

}  // namespace

int RunReplay(const RoleArgs& args) {
  Status s = RunReplayLoop(args);
  if (!s.ok()) {
    LOG(ERROR) << "replay failed: " << s;
    return 1;
  }
  return 0;
}

}  // namespace grove::replay
