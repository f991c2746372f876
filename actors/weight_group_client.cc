#include "actors/weight_group_client.h"

namespace grove::actors {

Result<WeightGroupView> CallWeightGroup(RpcClient& coordinator, wire::WeightGroupAction action,
                                        uint64_t epoch, const std::string& unique_id,
                                        int timeout_ms) {
  capnp::MallocMessageBuilder msg;
  auto req = InitEnvelope(msg, coordinator.sender_id(), 0).getBody().initWeightGroupRequest();
  req.setAction(action);
  req.setEpoch(epoch);
  req.setUniqueId(kj::arrayPtr(reinterpret_cast<const kj::byte*>(unique_id.data()), unique_id.size()));
  GROVE_ASSIGN_OR_RETURN(Frame reply, coordinator.Call(msg, {BodyKind::WEIGHT_GROUP_REPLY}, timeout_ms));
  auto r = reply.envelope().getBody().getWeightGroupReply();
  WeightGroupView v;
  v.epoch = r.getEpoch();
  v.rank = r.getRank();
  v.size = r.getSize();
  auto id = r.getUniqueId();
  v.unique_id.assign(reinterpret_cast<const char*>(id.begin()), id.size());
  for (auto m : r.getMembers()) v.members.emplace_back(m.cStr());
  v.failed = r.getFailed();
  v.reform_needed = r.getReformNeeded();
  v.policy_version = r.getPolicyVersion();
  if (v.size < 0 || static_cast<size_t>(v.size) != v.members.size() || v.rank >= v.size) {
    return Status::Corruption("weight group reply: rank " + std::to_string(v.rank) + " of size " +
                              std::to_string(v.size) + " with " + std::to_string(v.members.size()) +
                              " members");
  }
  return v;
}

}  // namespace grove::actors
