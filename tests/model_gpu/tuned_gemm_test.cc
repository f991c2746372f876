// TunedGemm (model/tuned_gemm.h) against a double reference on fresh random
// bf16 inputs, for every transpose form the model uses, bf16 and fp32
// output, out of place, in place and accumulating. Skips without a GPU.
#include "model/tuned_gemm.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace grove::model {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

class DeviceBytes {
 public:
  explicit DeviceBytes(size_t bytes) : bytes_(bytes) { EXPECT_EQ(cudaMalloc(&p_, bytes), cudaSuccess); }
  ~DeviceBytes() { cudaFree(p_); }
  void Upload(const void* host) { EXPECT_EQ(cudaMemcpy(p_, host, bytes_, cudaMemcpyHostToDevice), cudaSuccess); }
  void Download(void* host) const {
    EXPECT_EQ(cudaMemcpy(host, p_, bytes_, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
  size_t bytes_;
};

std::vector<__nv_bfloat16> RandomBf16(size_t n, float scale, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<__nv_bfloat16> v(n);
  for (auto& x : v) x = __float2bfloat16(dist(rng));
  return v;
}

struct Case {
  bool ta, tb;
  int64_t m, n, k, ldc;
  bool f32;
  float beta;
  enum { kOutOfPlace, kInPlace } where;
};

// Each element within two roundings to the output type -- cuBLASLt may
// round the product op(A) op(B) to it before adding beta C (seen on the
// H100 for bf16: errors of ~2^-9 of the product where D is small), then
// rounds the sum -- each bounded by 2 units of the type's half-ulp
// (bf16 2^-8, fp32 2^-23 of the value), plus fp32 accumulation of K terms
// (K * 2^-24 of their absolute sum).
void ExpectMatches(const Case& t, TunedGemm& gemm, std::mt19937_64& rng) {
  const int64_t a_rows = t.ta ? t.k : t.m, a_cols = t.ta ? t.m : t.k;
  const int64_t b_rows = t.tb ? t.n : t.k, b_cols = t.tb ? t.k : t.n;
  const auto a = RandomBf16(size_t(a_rows * a_cols), 1.f, rng), b = RandomBf16(size_t(b_rows * b_cols), 0.05f, rng);
  const size_t elem = t.f32 ? 4 : 2, d_elems = size_t(t.m * t.ldc);
  std::vector<double> c_vals(d_elems);
  std::vector<uint8_t> c_host(d_elems * elem);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (size_t i = 0; i < d_elems; ++i) {
    const float v = dist(rng);
    if (t.f32) {
      std::memcpy(&c_host[i * 4], &v, 4);
      c_vals[i] = v;
    } else {
      const __nv_bfloat16 h = __float2bfloat16(v);
      std::memcpy(&c_host[i * 2], &h, 2);
      c_vals[i] = __bfloat162float(h);
    }
  }
  DeviceBytes da(a.size() * 2), db(b.size() * 2), dc(d_elems * elem), dd(d_elems * elem);
  da.Upload(a.data());
  db.Upload(b.data());
  dc.Upload(c_host.data());
  GemmCall call{t.ta, t.tb, t.m, t.n, t.k, static_cast<const __nv_bfloat16*>(da.get()), a_cols,
                static_cast<const __nv_bfloat16*>(db.get()), b_cols, t.beta, dc.get(),
                t.where == Case::kInPlace ? dc.get() : dd.get(), t.f32, t.ldc};
  const Status s = gemm.Run(call);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> got(d_elems * elem);
  (t.where == Case::kInPlace ? dc : dd).Download(got.data());
  auto value = [&](const std::vector<uint8_t>& bytes, size_t i) -> double {
    if (t.f32) {
      float v;
      std::memcpy(&v, &bytes[i * 4], 4);
      return v;
    }
    __nv_bfloat16 h;
    std::memcpy(&h, &bytes[i * 2], 2);
    return __bfloat162float(h);
  };
  const double unit = t.f32 ? std::ldexp(1.0, -23) : std::ldexp(1.0, -8);
  int bad = 0;
  for (int64_t i = 0; i < t.m; ++i) {
    for (int64_t j = 0; j < t.n; ++j) {
      double product = 0, abs_sum = 0;
      for (int64_t p = 0; p < t.k; ++p) {
        const double x = __bfloat162float(a[t.ta ? p * a_cols + i : i * a_cols + p]);
        const double y = __bfloat162float(b[t.tb ? j * b_cols + p : p * b_cols + j]);
        product += x * y;
        abs_sum += std::fabs(x * y);
      }
      const double ref = product + t.beta * c_vals[i * t.ldc + j];
      const double g = value(got, i * t.ldc + j);
      const double tol = unit * (std::fabs(ref) + std::fabs(product)) + t.k * std::ldexp(abs_sum, -24);
      if (!(std::fabs(g - ref) <= tol) && ++bad <= 5)
        ADD_FAILURE() << "D[" << i << "," << j << "] = " << g << ", reference " << ref << " (tolerance " << tol
                      << ")";
    }
  }
  EXPECT_EQ(bad, 0) << (t.ta ? "T" : "N") << (t.tb ? "T" : "N") << " " << t.m << "x" << t.n << "x" << t.k;
  if (t.where == Case::kOutOfPlace) {  // C is read, never written
    std::vector<uint8_t> c_after(d_elems * elem);
    dc.Download(c_after.data());
    EXPECT_EQ(c_after, c_host);
  }
}

class TunedGemmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
    ASSERT_EQ(cublasCreate(&handle_), CUBLAS_STATUS_SUCCESS);
    auto g = TunedGemm::Create(handle_, nullptr);
    ASSERT_TRUE(g.ok()) << g.status();
    gemm_ = std::move(*g);
  }
  void TearDown() override {
    gemm_.reset();
    if (handle_) cublasDestroy(handle_);
  }
  cublasHandle_t handle_ = nullptr;
  std::unique_ptr<TunedGemm> gemm_;
};

TEST_F(TunedGemmTest, MatchesReferenceInEveryFormTheModelUses) {
  std::mt19937_64 rng(std::random_device{}());
  const Case cases[] = {
      // forward projections, residual updates (out of place, C read)
      {false, true, 257, 128, 64, 128, false, 0.f, Case::kInPlace},
      {false, true, 64, 256, 1024, 256, false, 1.f, Case::kOutOfPlace},
      {false, true, 1000, 128, 512, 136, false, 1.f, Case::kOutOfPlace},  // ldc past N
      {false, true, 33, 64, 96, 64, true, 0.f, Case::kInPlace},           // fp32 out (router, LM head)
      // dX: dY W, fp32 accumulation into the residual gradient
      {false, false, 200, 96, 160, 96, true, 1.f, Case::kInPlace},
      {false, false, 128, 64, 256, 64, false, 0.f, Case::kInPlace},
      // dW: dY^T X into fp32 gradients, overwritten and accumulated
      {true, false, 96, 128, 512, 128, true, 0.f, Case::kInPlace},
      {true, false, 48, 64, 300, 64, true, 1.f, Case::kInPlace},
      // token counts past 8192 share a power-of-two bucket's timing: the
      // second shape of each pair runs the first one's algorithm
      {false, true, 9000, 64, 64, 64, false, 1.f, Case::kOutOfPlace},
      {false, true, 10000, 64, 64, 64, false, 1.f, Case::kOutOfPlace},
      {true, false, 64, 64, 9000, 64, true, 0.f, Case::kInPlace},
      {true, false, 64, 64, 12000, 64, true, 0.f, Case::kInPlace},
  };
  for (const Case& t : cases) ExpectMatches(t, *gemm_, rng);
  // The same shapes again take the remembered algorithm.
  for (const Case& t : cases) ExpectMatches(t, *gemm_, rng);
}

TEST_F(TunedGemmTest, TwoInstancesGiveTheSameBits) {
  cublasHandle_t other_handle = nullptr;
  ASSERT_EQ(cublasCreate(&other_handle), CUBLAS_STATUS_SUCCESS);
  auto other = TunedGemm::Create(other_handle, nullptr);
  ASSERT_TRUE(other.ok()) << other.status();
  std::mt19937_64 rng(7);
  const int64_t m = 512, n = 256, k = 768;
  const auto a = RandomBf16(size_t(m * k), 1.f, rng), b = RandomBf16(size_t(n * k), 0.05f, rng);
  DeviceBytes da(a.size() * 2), db(b.size() * 2), d1(size_t(m * n) * 4), d2(size_t(m * n) * 4);
  da.Upload(a.data());
  db.Upload(b.data());
  auto call = [&](void* d) {
    return GemmCall{false, true, m, n, k, static_cast<const __nv_bfloat16*>(da.get()), k,
                    static_cast<const __nv_bfloat16*>(db.get()), k, 0.f, d, d, true, n};
  };
  ASSERT_TRUE(gemm_->Run(call(d1.get())).ok());
  ASSERT_TRUE((*other)->Run(call(d2.get())).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> r1(size_t(m * n)), r2(size_t(m * n));
  d1.Download(r1.data());
  d2.Download(r2.data());
  EXPECT_EQ(0, std::memcmp(r1.data(), r2.data(), r1.size() * 4));
  other->reset();
  cublasDestroy(other_handle);
}

TEST_F(TunedGemmTest, RefusesMisalignedAndBadShapes) {
  DeviceBytes buf(8192);
  auto* p = static_cast<__nv_bfloat16*>(buf.get());
  GemmCall misaligned{false, true, 8, 8, 8, p + 1, 8, p, 8, 0.f, p, p, false, 8};
  EXPECT_EQ(gemm_->Run(misaligned).code(), StatusCode::kInvalidArgument);
  GemmCall short_lda{false, true, 8, 8, 16, p, 8, p, 16, 0.f, p, p, false, 8};
  EXPECT_EQ(gemm_->Run(short_lda).code(), StatusCode::kInvalidArgument);
  GemmCall empty{false, true, 0, 8, 8, nullptr, 8, nullptr, 8, 0.f, nullptr, nullptr, false, 8};
  EXPECT_TRUE(gemm_->Run(empty).ok());
}

}  // namespace
}  // namespace grove::model
