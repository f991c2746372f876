#include "learner/snapshot_pool.h"

#include <utility>

namespace grove::learner {

SnapshotPool::SnapshotPool(size_t max_free, BufferHooks hooks) : shelf_(std::make_shared<Shelf>()) {
  shelf_->max_free = max_free;
  shelf_->hooks = std::move(hooks);
}

SnapshotPool::Shelf::~Shelf() {
  if (hooks.freed)
    for (std::vector<float>& b : free) hooks.freed(b);
}

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
  if (buffer.size() != floats) {
    buffer = std::vector<float>(floats);
    if (shelf_->hooks.made && floats > 0) shelf_->hooks.made(buffer);
  }
  // The deleter holds the shelf, not the pool: a snapshot may outlive both
  // (then its buffer is freed, through the freed hook it keeps a copy of).
  std::weak_ptr<Shelf> shelf = shelf_;
  auto* snap = new actors::WeightSnapshot();
  snap->flat = std::move(buffer);
  return std::shared_ptr<actors::WeightSnapshot>(snap, [shelf, freed = shelf_->hooks.freed](actors::WeightSnapshot* s) {
    bool kept = false;
    if (auto owner = shelf.lock()) {
      std::lock_guard<std::mutex> lock(owner->mu);
      kept = owner->free.size() < owner->max_free && !s->flat.empty();
      if (kept) owner->free.push_back(std::move(s->flat));
    }
    if (!kept && freed && !s->flat.empty()) freed(s->flat);
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
