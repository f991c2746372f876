# Data plane: prompts, sampled and scored groups, learner batches, weights.
# Field ordinals are explicit and only ever appended.
@0xa83022a3daadf274;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("grove::wire");

struct Prompt {
  id @0 :UInt64;         # unique per cluster run (coordinator's prompt cursor)
  task @1 :Text;         # task name, e.g. "arithmetic"
  text @2 :Text;         # the prompt as the model sees it
  reference @3 :Text;    # the task's reference data, JSON
  split @4 :Text;        # "train" or "eval"
}

# The coordinator's answer to a WorkRequest.
struct PromptBatch {
  prompts @0 :List(Prompt);
  policyVersion @1 :Int64;   # newest version the coordinator knows
  retryAfterMs @2 :UInt32;   # no work now (rate limit or staleness bound): ask again later
}

struct WorkRequest {
  maxPrompts @0 :UInt32;
  policyVersion @1 :Int64;   # the version the worker will sample with
}

# The worker tells the coordinator its prompts are safely stored, so they are
# not handed out again when the worker dies.
struct PromptDone {
  promptIds @0 :List(UInt64);
}

enum FinishReason {
  stop @0;      # produced a stop token
  length @1;    # hit the maximum length
}

struct Sample {
  tokens @0 :List(Int32);        # completion tokens only
  logprobs @1 :List(Float32);    # per completion token, under the sampling policy
  # Routed experts, flattened [row][moeLayer][k], one row per completion
  # token that was fed back into the model: every token but the last
  # (tokens.size() - 1 rows; empty when routing is not recorded).
  routedExperts @2 :List(UInt16);
  moeLayers @3 :UInt16;
  topK @4 :UInt16;
  policyVersion @5 :Int64;
  finish @6 :FinishReason;
  text @7 :Text;                 # the completion decoded
}

struct SampleGroup {
  groupId @0 :Text;             # unique: "<rollout id>:<prompt id>:<attempt>"
  prompt @1 :Prompt;
  promptTokens @2 :List(Int32);
  samples @3 :List(Sample);
  policyVersion @4 :Int64;
  rolloutId @5 :Text;
  generateMs @6 :Float64;
  createdAtMs @7 :Int64;
  # Routed experts of the prompt tokens at prefill, flattened like
  # Sample.routedExperts; shared by every sample of the group.
  promptRoutedExperts @8 :List(UInt16);
}

struct NamedScore {
  name @0 :Text;
  value @1 :Float64;
}

struct Reward {
  total @0 :Float64;
  reason @1 :Text;
  scores @2 :List(NamedScore);
}

struct ScoredGroup {
  group @0 :SampleGroup;
  rewards @1 :List(Reward);     # one per sample, same order
  verifierId @2 :Text;
  scoreMs @3 :Float64;
}

struct InsertAck {
  groupId @0 :Text;
  accepted @1 :Bool;            # durably stored (or already stored)
  duplicate @2 :Bool;
  reason @3 :Text;              # why not accepted (e.g. "queue full: retry")
  retryAfterMs @4 :UInt32;
}

struct BatchRequest {
  batchSize @0 :UInt32;
  learnerVersion @1 :Int64;
  maxStaleness @2 :Int64;       # groups with learnerVersion - version > this are dropped
  consumerId @3 :Text;
}

struct Batch {
  groups @0 :List(ScoredGroup);
  droppedStale @1 :UInt64;      # dropped for staleness while forming this batch
  ready @2 :Bool;               # false: not enough data yet (rate limiter); ask again
  retryAfterMs @3 :UInt32;
}

# The learner marks the groups of a finished step consumed, with its data
# cursor, in one message: a learner that restarts sees neither twice.
struct ConsumeMark {
  groupIds @0 :List(Text);
  learnerVersion @1 :Int64;
  consumerId @2 :Text;
}

struct ConsumeAck {
  marked @0 :UInt32;
}

struct CursorRequest {
  consumerId @0 :Text;
}

struct CursorReply {
  learnerVersion @0 :Int64;     # -1: no cursor stored
  consumed @1 :UInt64;
}

enum DType {
  f32 @0;
  bf16 @1;
  f16 @2;
  i8 @3;
  u8 @4;
  i32 @5;
}

struct TensorMeta {
  name @0 :Text;
  dtype @1 :DType;
  shape @2 :List(Int64);
  offset @3 :UInt64;    # byte offset in the flat weight buffer
  bytes @4 :UInt64;
}

# Announces a policy version and the layout of its flat weight buffer; the
# buffer follows as WeightChunk messages (buckets).
struct WeightAnnounce {
  version @0 :Int64;
  totalBytes @1 :UInt64;
  chunkBytes @2 :UInt64;
  tensors @3 :List(TensorMeta);
  checksum @4 :UInt64;   # of the whole flat buffer
  # Appended: set when the bytes are not sent as chunks but lie in the
  # sender's GPU memory, exported as a CUDA IPC handle (same GPU only).
  ipcHandle @5 :Data;
  ipcDevice @6 :Int32;
  # The UUID of the GPU the sender's weights lie on, on every announce of a
  # sender that can export them (empty: none). A worker whose GPU has this
  # UUID asks with WeightRequest.deviceUuid and gets ipcHandle set.
  deviceUuid @7 :Data;
}

struct WeightChunk {
  version @0 :Int64;
  offset @1 :UInt64;
  data @2 :Data;
}

# Pull-based weight transfer. Without wantChunk: "what is the newest
# version?", answered by a WeightAnnounce (version <= haveVersion: nothing
# newer). With wantChunk: the chunk of `version` at byte `offset`, answered
# by a WeightChunk, or an error when that version is no longer held.
struct WeightRequest {
  haveVersion @0 :Int64;   # -1: none
  wantChunk @1 :Bool;
  version @2 :Int64;
  offset @3 :UInt64;
  # Appended: the UUID of the asking worker's GPU. When it is the sender's
  # (WeightAnnounce.deviceUuid), the announce carries a CUDA IPC handle
  # instead of inviting chunk requests.
  deviceUuid @4 :Data;
}
