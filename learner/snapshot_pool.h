// SnapshotPool: the flat buffers of published weight versions, recycled.
// The learner publishes one actors::WeightSnapshot per step and the
// publisher, the NCCL broadcaster and the CUDA IPC export drop each one a
// version or two later. A fresh buffer per version means a fresh mapping of
// the model's size (6.7 GB for the 1.7B reference model) whose every page
// faults in again on the copy; a buffer given back when its last holder lets
// go is taken again instead.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "actors/weight_transfer.h"

namespace grove::learner {

class SnapshotPool {
 public:
  // Called on each buffer the pool makes (after it has its size) and on
  // each it frees (before), also when a snapshot outlives the pool: the GPU
  // learner pins them (cudaHostRegister) so that the per-version download
  // and the NCCL sender's upload run at the bus's speed. A made hook that
  // fails leaves the buffer as it is (it still works, slower); the freed
  // hook is called for every buffer the made hook was called on.
  struct BufferHooks {
    std::function<void(std::vector<float>&)> made;
    std::function<void(std::vector<float>&)> freed;
  };
  // Keeps at most `max_free` released buffers (others are freed).
  explicit SnapshotPool(size_t max_free = 2, BufferHooks hooks = {});

  // A snapshot whose `flat` holds `floats` values, unspecified (a released
  // buffer of that size when there is one; else new, zero-filled); the other
  // fields default. Its buffer goes back to the pool when the last
  // shared_ptr to it is dropped, also after the pool itself is gone (it is
  // freed then). Thread-safe.
  std::shared_ptr<actors::WeightSnapshot> Take(size_t floats);

  // Released buffers waiting to be taken.
  size_t free_buffers() const;
  // Buffers made new by Take (not recycled), for tests and logs.
  size_t buffers_made() const;

 private:
  struct Shelf {
    ~Shelf();
    std::mutex mu;
    std::vector<std::vector<float>> free;
    size_t max_free = 0;
    size_t made = 0;
    BufferHooks hooks;
  };
  std::shared_ptr<Shelf> shelf_;
};

}  // namespace grove::learner
