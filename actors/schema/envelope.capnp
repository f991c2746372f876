# Every frame on every grove socket is one Envelope. The union says which
# message it carries, so a frame of the wrong kind is recognized and dropped
# instead of being misread as another struct.
@0xd7c560067691a568;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("grove::wire");

using Control = import "control.capnp";
using Data = import "data.capnp";

const kMagic :UInt32 = 0x47525631;   # "GRV1"

struct Envelope {
  magic @0 :UInt32;          # must be kMagic
  sender @1 :Text;           # actor id of the sender
  requestId @2 :UInt64;      # echoed in the reply
  sentAtMs @3 :Int64;

  body :union {
    none @4 :Void;
    register @5 :Control.Register;
    registerAck @6 :Control.RegisterAck;
    heartbeat @7 :Control.Heartbeat;
    heartbeatAck @8 :Control.HeartbeatAck;
    command @9 :Control.Command;
    commandReply @10 :Control.CommandReply;
    statusRequest @11 :Control.StatusRequest;
    statusReply @12 :Control.StatusReply;
    lookupRequest @13 :Control.LookupRequest;
    lookupReply @14 :Control.LookupReply;
    exitReport @15 :Control.ExitReport;
    error @16 :Control.ErrorReply;

    workRequest @17 :Data.WorkRequest;
    promptBatch @18 :Data.PromptBatch;
    promptDone @19 :Data.PromptDone;
    sampleGroup @20 :Data.SampleGroup;
    scoredGroup @21 :Data.ScoredGroup;
    insertAck @22 :Data.InsertAck;
    batchRequest @23 :Data.BatchRequest;
    batch @24 :Data.Batch;
    consumeMark @25 :Data.ConsumeMark;
    consumeAck @26 :Data.ConsumeAck;
    cursorRequest @27 :Data.CursorRequest;
    cursorReply @28 :Data.CursorReply;
    weightAnnounce @29 :Data.WeightAnnounce;
    weightChunk @30 :Data.WeightChunk;
    weightRequest @31 :Data.WeightRequest;

    # Appended: launcher control (grove scale).
    scaleRequest @32 :Control.ScaleRequest;
    scaleReply @33 :Control.ScaleReply;

    # Appended: the NCCL weight-broadcast group (coordinator).
    weightGroupRequest @34 :Control.WeightGroupRequest;
    weightGroupReply @35 :Control.WeightGroupReply;
  }
}
