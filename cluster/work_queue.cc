#include "cluster/work_queue.h"

namespace grove {

WorkQueue::WorkQueue(PromptSource* source, WorkQueueLimits limits, uint64_t first_id)
    : source_(source), limits_(limits), next_id_(first_id) {}

bool WorkQueue::AssumeHandedOut(uint64_t n) {
  if (n <= handed_out_) return false;
  handed_out_ = n;
  return true;
}

int64_t WorkQueue::Allowance(int64_t learner_version, int64_t wasted) const {
  if (limits_.prompts_per_step <= 0) return -1;
  const int64_t steps = std::max<int64_t>(0, learner_version + 1 + limits_.max_staleness);
  return limits_.prompts_per_step * steps + std::max<int64_t>(0, wasted);
}

WorkQueue::Grant WorkQueue::Take(const std::string& worker, uint32_t max_prompts,
                                 int64_t learner_version, int64_t wasted) {
  Grant grant;
  auto& mine = leases_[worker];
  while (grant.prompts.size() < max_prompts && !requeued_.empty()) {
    Prompt p = std::move(requeued_.front());
    requeued_.pop_front();
    mine.emplace(p.id, p);
    grant.prompts.push_back(std::move(p));
  }
  const int64_t allowance = Allowance(learner_version, wasted);
  while (grant.prompts.size() < max_prompts) {
    if (allowance >= 0 && static_cast<int64_t>(handed_out_) >= allowance) {
      if (grant.prompts.empty()) grant.why_empty = Empty::kStalenessGate;
      break;
    }
    std::optional<Prompt> next = source_ != nullptr ? source_->Next() : std::nullopt;
    if (!next) {
      if (grant.prompts.empty()) grant.why_empty = Empty::kSourceDry;
      break;
    }
    next->id = next_id_++;
    ++handed_out_;
    mine.emplace(next->id, *next);
    grant.prompts.push_back(std::move(*next));
  }
  if (mine.empty()) leases_.erase(worker);
  return grant;
}

size_t WorkQueue::Done(const std::string& worker, const std::vector<uint64_t>& ids) {
  auto it = leases_.find(worker);
  if (it == leases_.end()) return 0;
  size_t released = 0;
  for (uint64_t id : ids) released += it->second.erase(id);
  done_ += released;
  if (it->second.empty()) leases_.erase(it);
  return released;
}

size_t WorkQueue::Requeue(const std::string& worker) {
  auto it = leases_.find(worker);
  if (it == leases_.end()) return 0;
  // Front of the line, in their original order.
  size_t n = it->second.size();
  for (auto rit = it->second.rbegin(); rit != it->second.rend(); ++rit) {
    requeued_.push_front(std::move(rit->second));
  }
  leases_.erase(it);
  return n;
}

size_t WorkQueue::leased() const {
  size_t n = 0;
  for (const auto& [worker, prompts] : leases_) n += prompts.size();
  return n;
}

size_t WorkQueue::leased(const std::string& worker) const {
  auto it = leases_.find(worker);
  return it == leases_.end() ? 0 : it->second.size();
}

}  // namespace grove
