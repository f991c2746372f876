// SnapshotPool: a released version's buffer is the next one's; held ones
// never are; sizes must match; at most max_free wait; a snapshot outliving
// its pool is simply freed.
#include "learner/snapshot_pool.h"

#include <gtest/gtest.h>

#include <set>
#include <thread>
#include <vector>

namespace grove::learner {
namespace {

TEST(SnapshotPool, ReusesReleasedBuffersOnlyAndBoundsTheShelf) {
  SnapshotPool pool(/*max_free=*/2);
  auto a = pool.Take(1000);
  ASSERT_EQ(a->flat.size(), 1000u);
  a->flat[7] = 7.f;
  const float* a_data = a->flat.data();
  auto b = pool.Take(1000);  // a is held: a new buffer
  EXPECT_NE(b->flat.data(), a_data);
  EXPECT_EQ(pool.buffers_made(), 2u);

  std::shared_ptr<const actors::WeightSnapshot> held = a;  // as the publisher holds a version
  a.reset();
  EXPECT_EQ(pool.free_buffers(), 0u);
  held.reset();
  EXPECT_EQ(pool.free_buffers(), 1u);
  auto c = pool.Take(1000);  // a's buffer again, contents as left
  EXPECT_EQ(c->flat.data(), a_data);
  EXPECT_EQ(c->flat[7], 7.f);
  EXPECT_EQ(c->version, -1);  // the snapshot's other fields start fresh
  EXPECT_TRUE(c->tensors.empty());
  EXPECT_EQ(pool.buffers_made(), 2u);

  auto d = pool.Take(500);  // another size: never a 1000-float buffer
  EXPECT_EQ(d->flat.size(), 500u);
  EXPECT_EQ(pool.buffers_made(), 3u);

  b.reset();
  c.reset();
  d.reset();
  EXPECT_EQ(pool.free_buffers(), 2u);  // max_free: the third was freed
}

TEST(SnapshotPool, SnapshotsOutliveTheirPoolAndThreadsShareIt) {
  std::shared_ptr<actors::WeightSnapshot> late;
  {
    SnapshotPool pool(2);
    late = pool.Take(64);
  }
  late->flat[0] = 1.f;
  late.reset();  // the pool is gone: freed, no crash

  SnapshotPool pool(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&pool, t] {
      for (int i = 0; i < 200; ++i) {
        auto s = pool.Take(256);
        s->flat[i % 256] = float(t);
      }
    });
  for (std::thread& t : threads) t.join();
  EXPECT_LE(pool.buffers_made(), 4u);  // at most one buffer per thread at a time
  EXPECT_LE(pool.free_buffers(), 4u);
}

// The hooks (the GPU learner pins buffers with them): made once per new
// buffer, never for a recycled one; freed once for each made buffer, at the
// moment it is freed: beyond max_free, with the pool, or after it.
TEST(SnapshotPool, HooksSeeEveryBufferMadeAndFreedOnce) {
  // Live: made and not yet freed (an address may come back after a free).
  std::set<const float*> live;
  int made = 0, freed = 0;
  SnapshotPool::BufferHooks hooks{[&](std::vector<float>& b) {
                                    ++made;
                                    EXPECT_TRUE(live.insert(b.data()).second) << "made twice";
                                  },
                                  [&](std::vector<float>& b) {
                                    ++freed;
                                    EXPECT_EQ(live.erase(b.data()), 1u) << "freed without made, or twice";
                                  }};
  std::shared_ptr<actors::WeightSnapshot> late;
  {
    SnapshotPool pool(/*max_free=*/1, hooks);
    auto a = pool.Take(100), b = pool.Take(100);
    EXPECT_EQ(made, 2);
    const float* a_data = a->flat.data();
    a.reset();  // kept on the shelf
    EXPECT_EQ(freed, 0);
    b.reset();  // beyond max_free: freed now
    EXPECT_EQ(freed, 1);
    auto c = pool.Take(100);  // a's buffer: nothing made
    EXPECT_EQ(c->flat.data(), a_data);
    EXPECT_EQ(made, 2);
    late = std::move(c);
    auto d = pool.Take(100);  // made; back on the shelf, freed with the pool
    EXPECT_EQ(made, 3);
    d.reset();
    EXPECT_EQ(freed, 1);
  }
  EXPECT_EQ(freed, 2);
  late.reset();  // after the pool
  EXPECT_EQ(freed, 3);
  EXPECT_TRUE(live.empty());
}

}  // namespace
}  // namespace grove::learner
