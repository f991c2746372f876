#include "cluster/weight_group_membership.h"

#include <algorithm>

namespace grove {

WeightGroupView WeightGroupMembership::View(const std::string& id) const {
  WeightGroupView v;
  v.epoch = epoch_;
  v.size = static_cast<int32_t>(members_.size());
  v.unique_id = unique_id_;
  v.members = members_;
  v.failed = failed_;
  for (size_t r = 0; r < members_.size(); ++r) {
    if (members_[r] == id) v.rank = static_cast<int32_t>(r);
  }
  return v;
}

WeightGroupView WeightGroupMembership::PollWorker(const std::string& id, int64_t now_ms) {
  candidates_[id] = now_ms;
  return View(id);
}

std::vector<std::string> WeightGroupMembership::Desired(
    int64_t now_ms, const std::function<bool(const std::string&)>& alive) const {
  std::vector<std::string> out;
  for (const auto& [id, last_poll] : candidates_) {  // std::map: sorted, so ranks are stable
    if (now_ms - last_poll > candidate_ttl_ms_) continue;
    if (failed_ && last_poll <= failed_at_ms_) continue;  // must prove it outlived the failure
    if (alive && !alive(id)) continue;
    out.push_back(id);
  }
  return out;
}

WeightGroupView WeightGroupMembership::PollLearner(
    const std::string& learner_id, int64_t now_ms, const std::function<bool(const std::string&)>& alive) {
  WeightGroupView v = View(learner_id);
  const std::vector<std::string> desired = Desired(now_ms, alive);
  if (epoch_ == 0 || learner_id != learner_id_) {
    // No group yet, or one formed by a previous learner: form one as soon
    // as there is a worker to send to.
    v.reform_needed = !desired.empty();
  } else {
    std::vector<std::string> workers(members_.begin() + 1, members_.end());
    v.reform_needed = failed_ || workers != desired;
  }
  return v;
}

Status WeightGroupMembership::Propose(const std::string& learner_id, uint64_t epoch,
                                      std::string unique_id, int64_t now_ms,
                                      const std::function<bool(const std::string&)>& alive) {
  if (learner_id.empty()) return Status::InvalidArgument("weight group: propose needs a learner id");
  if (epoch != epoch_ + 1) {
    return Status::InvalidArgument("weight group: proposed epoch " + std::to_string(epoch) +
                                   ", the next is " + std::to_string(epoch_ + 1));
  }
  if (unique_id.empty()) return Status::InvalidArgument("weight group: propose needs a unique id");
  if (!learner_id_.empty() && learner_id_ != learner_id && epoch_ > 0 && !failed_) {
    // A second learner would split the group; the first must fail or be forgotten.
    bool first_is_alive = !alive || alive(learner_id_);
    if (first_is_alive) {
      return Status::InvalidArgument("weight group: " + learner_id_ + " leads it, not " + learner_id);
    }
  }
  std::vector<std::string> members{learner_id};
  for (std::string& id : Desired(now_ms, alive)) {
    if (id != learner_id) members.push_back(std::move(id));
  }
  if (failed_) {
    // Candidates silent since the failure are presumed dead (a worker killed
    // mid-broadcast never polls again); a live one polls and is back next time.
    std::erase_if(candidates_, [&](const auto& c) { return c.second <= failed_at_ms_; });
  }
  epoch_ = epoch;
  unique_id_ = std::move(unique_id);
  members_ = std::move(members);
  learner_id_ = learner_id;
  failed_ = false;
  failed_at_ms_ = 0;
  return Status::OK();
}

Status WeightGroupMembership::Fail(const std::string& learner_id, uint64_t epoch, int64_t now_ms) {
  if (learner_id != learner_id_) {
    return Status::InvalidArgument("weight group: " + learner_id + " does not lead it");
  }
  if (epoch != epoch_) return Status::OK();  // an older epoch: already replaced
  if (!failed_) {
    failed_ = true;
    failed_at_ms_ = now_ms;
  }
  return Status::OK();
}

void WeightGroupMembership::Forget(const std::string& id) {
  candidates_.erase(id);
  if (id == learner_id_ && epoch_ > 0 && !failed_) {
    // The learner is gone: its epoch can carry nothing more.
    failed_ = true;
  }
}

}  // namespace grove
