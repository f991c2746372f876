// kernels/weight_checksum.h: the device WeightSum against its host
// reference on fresh random bytes (exact: it is integer arithmetic, so the
// two must agree to the bit), including an odd float count (the zero-padded
// tail word) and sizes that do not fill the grid; and the properties the
// IPC check relies on (a changed bit, two swapped words, a shorter buffer
// all change it).
#include <cstring>

#include "kernels/weight_checksum.h"
#include "tests/kernels/gpu_test_util.h"

namespace grove::kernels {
namespace {

std::vector<float> RandomBits(std::mt19937_64& rng, size_t floats) {
  std::vector<float> v(floats);
  for (float& x : v) {
    const uint32_t bits = static_cast<uint32_t>(rng());
    std::memcpy(&x, &bits, 4);
  }
  return v;
}

TEST(WeightSum, HostReferenceSeesEveryChange) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::vector<float> a = RandomBits(rng, 1001);
  const uint64_t base = WeightSumHost(a.data(), a.size() * 4);
  std::vector<float> b = a;
  uint32_t bits;
  std::memcpy(&bits, &b[500], 4);
  bits ^= 1u << (rng() % 32);
  std::memcpy(&b[500], &bits, 4);
  EXPECT_NE(WeightSumHost(b.data(), b.size() * 4), base) << "one flipped bit";
  b = a;
  std::swap(b[2], b[4]);  // words 1 and 2 swap their first halves
  std::swap(b[3], b[5]);  // and their second: two whole words swapped
  EXPECT_NE(WeightSumHost(b.data(), b.size() * 4), base) << "two swapped words";
  EXPECT_NE(WeightSumHost(a.data(), (a.size() - 1) * 4), base) << "one float fewer";
  EXPECT_EQ(WeightSumHost(a.data(), a.size() * 4), base);
}

TEST(WeightSum, DeviceMatchesHostBitForBit) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  testing::DeviceBuffer<uint64_t> scratch(1);
  cudaStream_t stream;
  GROVE_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (size_t floats : {size_t{1}, size_t{2}, size_t{3}, size_t{1023}, size_t{4096}, size_t{1000003},
                        size_t{(1 << 24) + 5}}) {
    SCOPED_TRACE(floats);
    std::vector<float> host = RandomBits(rng, floats);
    testing::DeviceBuffer<float> dev(floats);
    ASSERT_NE(dev.get(), nullptr);
    GROVE_CUDA_OK(dev.Upload(host));
    Result<uint64_t> got = WeightSumDevice(dev.get(), floats * 4, scratch.get(), stream);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, WeightSumHost(host.data(), floats * 4));
  }
  // Bad arguments: a clear error, no launch.
  testing::DeviceBuffer<float> dev(8);
  EXPECT_EQ(WeightSumDevice(dev.get(), 6, scratch.get(), stream).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(WeightSumDevice(reinterpret_cast<const char*>(dev.get()) + 4, 8, scratch.get(), stream).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(WeightSumDevice(dev.get(), 8, nullptr, stream).status().code(), StatusCode::kInvalidArgument);
  GROVE_CUDA_OK(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace grove::kernels
