#include "learner/snapshot_pool.h"

#include <utility>

namespace grove::learner {

SnapshotPool::SnapshotPool(size_t max_free) : shelf_(std::make_shared<Shelf>()) { shelf_->max_free = max_free; }

std::shared_ptr<actors::WeightSnapshot> SnapshotPool::Take(size_t floats) {
  std::vector<float> buffer;
  {
    std::lock_guard<std::mutex> lock(shelf_->mu);
    for (auto it = shelf_->free.begin(); it != shelf_->free.end(); ++it) {
      if (it->size() == floats) {
        buffer = std::move(*it);
        shelf_->free.erase(it);
        break;
      }
    }
    if (buffer.size() != floats) ++shelf_->made;
  }
  if (buffer.size() != floats) buffer.resize(floats);
  // The deleter holds the shelf, not the pool: a snapshot may outlive both.
  std::weak_ptr<Shelf> shelf = shelf_;
  auto* snap = new actors::WeightSnapshot();
  snap->flat = std::move(buffer);
  return std::shared_ptr<actors::WeightSnapshot>(snap, [shelf](actors::WeightSnapshot* s) {
    if (auto owner = shelf.lock()) {
      std::lock_guard<std::mutex> lock(owner->mu);
      if (owner->free.size() < owner->max_free && !s->flat.empty()) owner->free.push_back(std::move(s->flat));
    }
    delete s;
  });
}

size_t SnapshotPool::free_buffers() const {
  std::lock_guard<std::mutex> lock(shelf_->mu);
  return shelf_->free.size();
}

size_t SnapshotPool::buffers_made() const {
  std::lock_guard<std::mutex> lock(shelf_->mu);
  return shelf_->made;
}

}  // namespace grove::learner
