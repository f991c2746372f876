// The weight-broadcast group as its members see it, and the one request that
// asks the coordinator about it (docs/weights.md). The coordinator's side is
// cluster/weight_group_membership.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "actors/rpc_client.h"
#include "actors/schema/control.capnp.h"
#include "base/result.h"

namespace grove::actors {

struct WeightGroupView {
  uint64_t epoch = 0;  // 0: no group formed yet
  int32_t rank = -1;   // of the asker; -1: not a member of `epoch`
  int32_t size = 0;
  std::string unique_id;             // the NCCL unique id bytes of `epoch`
  std::vector<std::string> members;  // rank order; members[0] is the learner
  bool failed = false;               // `epoch` was reported failed: members abort it
  bool reform_needed = false;        // for the learner: propose epoch + 1
  int64_t policy_version = 0;        // the newest version the learner published, as the coordinator knows it
};

// One weightGroupRequest to the coordinator. `unique_id` only for propose.
// Errors: Unavailable/DeadlineExceeded (no answer), FailedPrecondition (the
// coordinator refused: not registered, wrong epoch, not the learner).
Result<WeightGroupView> CallWeightGroup(RpcClient& coordinator, wire::WeightGroupAction action,
                                        uint64_t epoch, const std::string& unique_id,
                                        int timeout_ms);

}  // namespace grove::actors
