// The replay store process (`grove run replay`): serves ScoredGroup inserts
// (from verifiers), batch requests, consume marks and cursor reads (from the
// learner) on its data socket, over a ReplayService on RocksDB in
// RUN_DIR/replay. An insert is acknowledged only once the store says it is
// durable (per the configured sync mode), so a sender that gets no ack sends
// again and the store keeps one copy. Inserts run on a few threads so that
// concurrent ones share a group commit; everything else is answered inline.
// A cursor request is how a consumer (the learner) starts or resumes: it also
// ends that consumer's leases, whose batches died with its previous process,
// so they are served again instead of never.
#pragma once

#include "actors/role_args.h"

namespace grove::replay {

int RunReplay(const RoleArgs& args);

}  // namespace grove::replay
