// The rollout engine's quantized kernels against CPU references:
// QuantizeWeight bit for bit against rollout/'s quantizers, QuantLinear and
// MoeDecodeForward against double-precision sums over the dequantized
// weights (rollout::RoundTripInPlace), the device unpack instructions against
// their host twins. Argument checks run anywhere; the rest skips without a GPU.
//
// Tolerances. The CUDA-core path multiplies a bf16 x by the exact fp32
// dequantized weight (q * scale, the same fp32 product the CPU dequantizer
// forms) and accumulates in fp32: with recursive or tree summation of k
// products, each rounding is relative 2^-24, so |y - y_ref| <= 2 k 2^-24
// sum_j |x_j w_j| (the usual gamma_k bound, the factor 2 covering the
// product's own rounding and the tensor cores' truncating fp32 adds, whose
// error per add stays below one ulp = 2^-23); the tensor-core path sums exact
// products q x and scales the sum (one more rounding, inside the same bound
// as the 2^-24 of fl(q * scale) it replaces); with Accumulate::kAdd one more
// rounding of the sum, 2^-23 |y|.
// The MoE adds the bf16 rounding of h before W2: the GPU's h before rounding
// differs from the reference's by the bound above (through silu and the
// product), so the rounded values can differ by one bf16 ulp when they sit
// near a rounding boundary; the bound per output charges every h element one
// ulp plus that pre-rounding error, times |W2| and |gate|.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <random>
#include <vector>

#include "kernels/moe_decode.h"
#include "kernels/moe_decode_internal.h"
#include "kernels/programmatic_launch.h"
#include "kernels/quant_linear.h"
#include "kernels/quant_linear_internal.h"
#include "kernels/quant_unpack.h"
#include "kernels/router.h"
#include "rollout/int4_quantizer.h"
#include "rollout/int8_quantizer.h"
#include "rollout/precision_format.h"
#include "tests/kernels/gpu_test_util.h"
#include "tests/kernels/ptx_wrappers_kernels.h"

namespace grove::kernels {
namespace {

using detail::QuantLinearPath;
using testing::DeviceBuffer;

constexpr double kU = 1.0 / (1 << 24);  // fp32 unit roundoff

rollout::PrecisionFormat ToPrecision(QuantFormat f) {
  return f == QuantFormat::kBF16 ? rollout::PrecisionFormat::kBF16
         : f == QuantFormat::kInt8 ? rollout::PrecisionFormat::kInt8
                                   : rollout::PrecisionFormat::kInt4;
}
const char* Name(QuantFormat f) { return f == QuantFormat::kBF16 ? "bf16" : f == QuantFormat::kInt8 ? "int8" : "int4"; }

std::vector<float> RandomWeights(std::mt19937_64& rng, int64_t n, int64_t k) {
  std::normal_distribution<float> dist(0.f, 1.f / std::sqrt(static_cast<float>(k)));
  std::vector<float> w(n * k);
  for (auto& v : w) v = dist(rng);
  return w;
}

// A weight quantized on the device, plus the fp32 values the CPU dequantizer gives.
struct DeviceWeight {
  DeviceBuffer<uint8_t> data;
  DeviceBuffer<float> scales;
  QuantWeight w;
  std::vector<float> dequant;  // [n, k]
  DeviceWeight(QuantFormat f, int64_t n, int64_t k)
      : data(QuantDataBytes(f, n, k)), scales(std::max<int64_t>(1, QuantScaleCount(f, n, k))) {
    w.format = f;
    w.n = static_cast<int32_t>(n);
    w.k = static_cast<int32_t>(k);
    w.data = data.get();
    w.scales = f == QuantFormat::kBF16 ? nullptr : scales.get();
  }
};

// Quantizes `fp32` on the GPU into `out` and fills its CPU dequantized twin.
void QuantizeOnGpu(const std::vector<float>& fp32, DeviceWeight* out) {
  DeviceBuffer<float> dw(fp32.size());
  ASSERT_EQ(dw.Upload(fp32), cudaSuccess);
  const Status s = QuantizeWeight(dw.get(), out->w.n, out->w.k, out->w.format, out->data.get(), out->scales.get(), nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  out->dequant = fp32;
  rollout::RoundTripInPlace(ToPrecision(out->w.format), out->dequant.data(), out->w.n, out->w.k);
}

// ---- Argument checks (no GPU needed: they fail before any CUDA call) ----

TEST(QuantLinearArgs, BadShapesAndPointersAreRejected) {
  alignas(16) static __nv_bfloat16 x[256];
  alignas(16) static float y[256];
  alignas(16) static uint8_t data[4096];
  QuantWeight w{QuantFormat::kBF16, 8, 100, data, nullptr};
  EXPECT_FALSE(QuantLinear(x, 128, 1, w, y, 8, Accumulate::kOverwrite, nullptr, 0, nullptr).ok());  // k % 128
  w.k = 128;
  w.n = 12;
  EXPECT_FALSE(QuantLinear(x, 128, 1, w, y, 12, Accumulate::kOverwrite, nullptr, 0, nullptr).ok());  // n % 8
  w.n = 8;
  EXPECT_FALSE(QuantLinear(x, 128, 0, w, y, 8, Accumulate::kOverwrite, nullptr, 0, nullptr).ok());    // m
  EXPECT_FALSE(QuantLinear(x, 64, 1, w, y, 8, Accumulate::kOverwrite, nullptr, 0, nullptr).ok());     // ldx < k
  EXPECT_FALSE(QuantLinear(x, 128, 1, w, y, 4, Accumulate::kOverwrite, nullptr, 0, nullptr).ok());    // ldy < n
  EXPECT_FALSE(QuantLinear(x + 1, 128, 1, w, y, 8, Accumulate::kOverwrite, nullptr, 0, nullptr).ok()); // alignment
  w.format = QuantFormat::kInt4;
  EXPECT_FALSE(QuantLinear(x, 128, 1, w, y, 8, Accumulate::kOverwrite, nullptr, 0, nullptr).ok());    // no scales
  w.format = static_cast<QuantFormat>(7);
  EXPECT_FALSE(QuantLinear(x, 128, 1, w, y, 8, Accumulate::kOverwrite, nullptr, 0, nullptr).ok());
  EXPECT_FALSE(QuantizeWeight(y, 8, 128, QuantFormat::kInt8, data, nullptr, nullptr).ok());
  EXPECT_FALSE(QuantizeWeight(y, 8, 120, QuantFormat::kBF16, data, nullptr, nullptr).ok());
}

TEST(QuantSizes, MatchTheCpuLayouts) {
  EXPECT_EQ(QuantDataBytes(QuantFormat::kBF16, 16, 256), 16u * 256 * 2);
  EXPECT_EQ(QuantDataBytes(QuantFormat::kInt8, 16, 256), 16u * 256);
  EXPECT_EQ(QuantDataBytes(QuantFormat::kInt4, 16, 256), 16u * 256 / 2);
  EXPECT_EQ(QuantScaleCount(QuantFormat::kBF16, 16, 256), 0);
  EXPECT_EQ(QuantScaleCount(QuantFormat::kInt8, 16, 256), 16);
  EXPECT_EQ(QuantScaleCount(QuantFormat::kInt4, 16, 256), 32);
  EXPECT_EQ(8.0 * QuantDataBytes(QuantFormat::kInt4, 24, 384) + 32.0 * QuantScaleCount(QuantFormat::kInt4, 24, 384),
            rollout::Int4StorageBits(24, 384));
}

TEST(MoeDecodeArgs, BadArgumentsAreRejected) {
  MoeDecodeArgs a;
  a.m = 1;
  a.hidden = 100;
  a.expert_hidden = 128;
  a.experts = 4;
  a.top_k = 2;
  EXPECT_FALSE(MoeDecodeForward(a, nullptr).ok());  // hidden % 128
  a.hidden = 128;
  a.top_k = 5;
  EXPECT_FALSE(MoeDecodeForward(a, nullptr).ok());  // top_k > experts
  a.top_k = 2;
  EXPECT_FALSE(MoeDecodeForward(a, nullptr).ok());  // null pointers
  a.m = 0;
  EXPECT_TRUE(MoeDecodeForward(a, nullptr).ok());   // nothing to do
  a.mma_tiles_per_block = 3;                        // rejected even with nothing to do
  Status s = MoeDecodeForward(a, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.ToString().find("mma_tiles_per_block"), std::string::npos) << s.ToString();
  a.mma_tiles_per_block = 4;
  a.mma_min_slots_per_expert = -1;
  s = MoeDecodeForward(a, nullptr);
  EXPECT_NE(s.ToString().find("mma_min_slots_per_expert"), std::string::npos) << s.ToString();
  a.mma_min_slots_per_expert = 0;
  a.mma_paired_up_max_tokens = -1;
  s = MoeDecodeForward(a, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.ToString().find("mma_paired_up_max_tokens"), std::string::npos) << s.ToString();
}

// ---- GPU ----

TEST(QuantUnpackGpu, DeviceInstructionsMatchTheHostTwins) {
  GROVE_SKIP_WITHOUT_GPU();
  std::vector<uint32_t> words;
  for (uint32_t i = 0; i < (1u << 16); ++i) {
    words.push_back(i | (i << 16));       // every 16-bit pattern, both halves
    words.push_back(i * 0x9E3779B9u);     // spread patterns
  }
  std::vector<float> q4, q8;
  ASSERT_EQ(testing::RunQuantUnpack(words, &q4, &q8), 0);
  for (size_t i = 0; i < words.size(); ++i) {
    float h4[8], h8[4];
    Int4WordToFloats(words[i], h4);
    Int8WordToFloats(words[i], h8);
    for (int e = 0; e < 8; ++e) ASSERT_EQ(q4[8 * i + e], h4[e]) << std::hex << words[i] << " int4 column " << e;
    for (int e = 0; e < 4; ++e) ASSERT_EQ(q8[4 * i + e], h8[e]) << std::hex << words[i] << " int8 byte " << e;
  }
}

TEST(QuantizeWeightGpu, BitIdenticalToTheCpuQuantizers) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t shapes[][2] = {{8, 128}, {24, 384}, {1536, 1024}, {1024, 2816}};
  for (const auto& shape : shapes) {
    const int64_t n = shape[0], k = shape[1];
    std::vector<float> w = RandomWeights(rng, n, k);
    std::fill(w.begin(), w.begin() + k, 0.f);              // an all-zero row
    std::fill(w.begin() + k + 128, w.begin() + k + 256 > w.begin() + 2 * k ? w.begin() + 2 * k : w.begin() + k + 256,
              0.f);                                        // an all-zero int4 group (when k > 128)
    // Exact ties: row 2 has max 7 and halves, so w / scale lands on .5 (int4
    // rounds them to even), and values that are exact multiples.
    const float ties[] = {7.f, 3.5f, -2.5f, 0.5f, -6.5f, 1.5f, 4.f, -7.f};
    for (int i = 0; i < 8; ++i) w[2 * k + i] = ties[i];
    for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4}) {
      SCOPED_TRACE(std::string(Name(f)) + " [" + std::to_string(n) + ", " + std::to_string(k) + "]");
      DeviceWeight dw(f, n, k);
      QuantizeOnGpu(w, &dw);
      std::vector<uint8_t> bytes;
      std::vector<float> scales;
      ASSERT_EQ(dw.data.Download(&bytes), cudaSuccess);
      ASSERT_EQ(dw.scales.Download(&scales), cudaSuccess);
      if (f == QuantFormat::kBF16) {
        for (int64_t i = 0; i < n * k; ++i) {
          const float want = rollout::RoundToBf16(w[i]);
          uint32_t bits;
          std::memcpy(&bits, &want, 4);
          uint16_t got;
          std::memcpy(&got, bytes.data() + 2 * i, 2);
          ASSERT_EQ(got, bits >> 16) << "element " << i;
        }
      } else if (f == QuantFormat::kInt8) {
        const rollout::Int8Matrix m = rollout::QuantizeInt8PerRow(w.data(), n, k);
        ASSERT_EQ(std::memcmp(bytes.data(), m.q.data(), n * k), 0);
        ASSERT_EQ(std::memcmp(scales.data(), m.scales.data(), n * 4), 0);
      } else {
        auto m = rollout::QuantizeInt4Grouped(w.data(), n, k);
        ASSERT_TRUE(m.ok());
        ASSERT_EQ(std::memcmp(bytes.data(), m->packed.data(), n * k / 2), 0);
        ASSERT_EQ(std::memcmp(scales.data(), m->scales.data(), m->scales.size() * 4), 0);
      }
    }
  }
}

// DequantizeToBf16 (the cuBLAS path's copy of a quantized linear): every
// element the bf16 rounding of the CPU dequantizer's fp32 value, bit for bit.
TEST(QuantizeWeightGpu, DequantizeToBf16IsTheCpuValueRounded) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t shapes[][2] = {{8, 128}, {40, 640}, {1024, 2816}};
  for (const auto& shape : shapes) {
    const int64_t n = shape[0], k = shape[1];
    const std::vector<float> w = RandomWeights(rng, n, k);
    for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4}) {
      SCOPED_TRACE(std::string(Name(f)) + " [" + std::to_string(n) + ", " + std::to_string(k) + "]");
      DeviceWeight dw(f, n, k);
      QuantizeOnGpu(w, &dw);
      DeviceBuffer<uint16_t> out(n * k);
      const Status st = DequantizeToBf16(dw.w, reinterpret_cast<__nv_bfloat16*>(out.get()), nullptr);
      ASSERT_TRUE(st.ok()) << st.ToString();
      std::vector<uint16_t> got;
      ASSERT_EQ(out.Download(&got), cudaSuccess);
      for (int64_t i = 0; i < n * k; ++i) {
        const float want = rollout::RoundToBf16(dw.dequant[i]);
        uint32_t bits;
        std::memcpy(&bits, &want, 4);
        ASSERT_EQ(got[i], bits >> 16) << "element " << i << " (" << dw.dequant[i] << ")";
      }
    }
  }
  // Bad arguments: a shape QuantLinear refuses, a null output.
  DeviceWeight dw(QuantFormat::kInt4, 8, 128);
  QuantWeight bad = dw.w;
  bad.k = 100;
  DeviceBuffer<uint16_t> out(8 * 128);
  EXPECT_FALSE(DequantizeToBf16(bad, reinterpret_cast<__nv_bfloat16*>(out.get()), nullptr).ok());
  EXPECT_FALSE(DequantizeToBf16(dw.w, nullptr, nullptr).ok());
}

// y = x W^T (+ y0) against the double-precision reference, every element
// within the bound of the file comment.
const char* PathName(QuantLinearPath p) {
  switch (p) {
    case QuantLinearPath::kAuto: return "auto";
    case QuantLinearPath::kCudaCore: return "cuda-core";
    case QuantLinearPath::kTensorCore: return "tensor-core";
    case QuantLinearPath::kCudaCoreRows1: return "cuda-core 1 row/warp";
    case QuantLinearPath::kCudaCoreRows4: return "cuda-core 4 rows/warp";
  }
  return "?";
}

void CheckQuantLinear(std::mt19937_64& rng, QuantFormat f, int64_t n, int64_t k, const std::vector<int>& ms,
                      bool padded, QuantLinearPath path = QuantLinearPath::kAuto) {
  SCOPED_TRACE(std::string(Name(f)) + " [" + std::to_string(n) + ", " + std::to_string(k) + "] " + PathName(path));
  DeviceWeight dw(f, n, k);
  QuantizeOnGpu(RandomWeights(rng, n, k), &dw);
  const int64_t ldx = padded ? k + 8 : k, ldy = padded ? n + 4 : n;
  for (size_t mi = 0; mi < ms.size(); ++mi) {
    const int m = ms[mi];
    const Accumulate mode = (mi % 2 == 0) ? Accumulate::kOverwrite : Accumulate::kAdd;
    SCOPED_TRACE("m " + std::to_string(m) + (mode == Accumulate::kAdd ? " add" : " overwrite"));
    std::vector<__nv_bfloat16> xb;
    std::vector<double> xd;
    testing::RandomBf16(rng, static_cast<size_t>(m) * ldx, &xb, &xd);
    std::vector<float> y0(static_cast<size_t>(m) * ldy);
    std::uniform_real_distribution<float> yd(-1.f, 1.f);
    for (auto& v : y0) v = yd(rng);
    DeviceBuffer<__nv_bfloat16> dx(xb.size());
    DeviceBuffer<float> dy(y0.size());
    ASSERT_EQ(dx.Upload(xb), cudaSuccess);
    ASSERT_EQ(dy.Upload(y0), cudaSuccess);
    const Status s = path == QuantLinearPath::kAuto
                         ? QuantLinear(dx.get(), ldx, m, dw.w, dy.get(), ldy, mode, nullptr, 0, nullptr)
                         : detail::QuantLinearOnPath(path, dx.get(), ldx, m, dw.w, dy.get(), ldy, mode, nullptr);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> y;
    ASSERT_EQ(dy.Download(&y), cudaSuccess);
    for (int i = 0; i < m; ++i) {
      for (int64_t r = 0; r < n; ++r) {
        const double* xr = xd.data() + i * ldx;
        const float* wr = dw.dequant.data() + r * k;
        double sum = 0, mag = 0;
        for (int64_t c = 0; c < k; ++c) {
          const double p = xr[c] * static_cast<double>(wr[c]);
          sum += p;
          mag += std::fabs(p);
        }
        double bound = 2.0 * k * kU * mag + 1e-30;
        if (mode == Accumulate::kAdd) {
          sum += y0[i * ldy + r];
          bound += 2 * kU * (std::fabs(sum) + mag);
        }
        ASSERT_NEAR(y[i * ldy + r], sum, bound) << "row " << i << " col " << r;
      }
      // Columns past n in the padded rows are never written.
      for (int64_t r = n; r < ldy; ++r) ASSERT_EQ(y[i * ldy + r], y0[i * ldy + r]);
    }
  }
}

TEST(QuantLinearGpu, MatchesTheDequantizedReference) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const std::vector<int> all_m = {1, 3, 8, 16, 17, 64, 300};
  for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4}) {
    CheckQuantLinear(rng, f, 8, 128, all_m, true);
    CheckQuantLinear(rng, f, 24, 384, all_m, false);
    CheckQuantLinear(rng, f, 40, 640, all_m, true);
    CheckQuantLinear(rng, f, 1536, 1024, {1, 3, 8, 16, 17, 64}, false);  // qkv
    CheckQuantLinear(rng, f, 1024, 1024, {1, 16, 300}, false);           // wo
    CheckQuantLinear(rng, f, 2816, 1024, {1, 8, 17}, false);             // dense up
    CheckQuantLinear(rng, f, 1024, 2816, {1, 16, 17}, true);             // dense down
    CheckQuantLinear(rng, f, 32768, 1024, {1, 3}, false);                // lm head
  }
}

TEST(QuantLinearGpu, BothPathsAtEveryBatchShape) {
  // kAuto takes the CUDA-core path at m = 1 only; the MoE uses its core at
  // every token count, and the tensor-core path at m = 1 is valid too.
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4}) {
    CheckQuantLinear(rng, f, 40, 640, {1, 2, 5, 16, 33}, true, QuantLinearPath::kCudaCore);
    CheckQuantLinear(rng, f, 1024, 2816, {3, 16, 17}, false, QuantLinearPath::kCudaCore);
    CheckQuantLinear(rng, f, 40, 640, {1, 2, 5, 16, 33}, true, QuantLinearPath::kTensorCore);
    CheckQuantLinear(rng, f, 1536, 1024, {1}, false, QuantLinearPath::kTensorCore);
  }
}

TEST(QuantLinearGpu, RowsPerWarpVariantsGiveTheSameBits) {
  // kCudaCoreRows1/4 change only how rows are dealt to warps: against the
  // reference on small shapes, and bit-equal to kCudaCore on the gpu-ref
  // decode shapes (qkv, wo, dense w1|w3, dense w2, a lm_head slice) at m =
  // 1, 4 and 17 (two passes).
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const QuantLinearPath variants[2] = {QuantLinearPath::kCudaCoreRows1, QuantLinearPath::kCudaCoreRows4};
  const int64_t shapes[5][2] = {{1536, 1024}, {1024, 1024}, {5632, 1024}, {1024, 2816}, {4096, 1024}};
  for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4}) {
    for (QuantLinearPath p : variants) {
      CheckQuantLinear(rng, f, 8, 128, {1, 3, 16}, true, p);
      CheckQuantLinear(rng, f, 40, 640, {1, 2, 5, 17}, false, p);
    }
    for (const auto& shape : shapes) {
      const int64_t n = shape[0], k = shape[1];
      DeviceWeight dw(f, n, k);
      QuantizeOnGpu(RandomWeights(rng, n, k), &dw);
      for (int m : {1, 4, 17}) {
        std::vector<__nv_bfloat16> xb;
        std::vector<double> xd;
        testing::RandomBf16(rng, static_cast<size_t>(m) * k, &xb, &xd);
        DeviceBuffer<__nv_bfloat16> dx(xb.size());
        ASSERT_EQ(dx.Upload(xb), cudaSuccess);
        DeviceBuffer<float> want(static_cast<size_t>(m) * n);
        ASSERT_TRUE(detail::QuantLinearOnPath(QuantLinearPath::kCudaCore, dx.get(), k, m, dw.w, want.get(), n,
                                              Accumulate::kOverwrite, nullptr)
                        .ok());
        std::vector<float> a;
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        ASSERT_EQ(want.Download(&a), cudaSuccess);
        for (QuantLinearPath p : variants) {
          DeviceBuffer<float> got(static_cast<size_t>(m) * n);
          ASSERT_TRUE(
              detail::QuantLinearOnPath(p, dx.get(), k, m, dw.w, got.get(), n, Accumulate::kOverwrite, nullptr).ok());
          std::vector<float> b;
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          ASSERT_EQ(got.Download(&b), cudaSuccess);
          ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0)
              << Name(f) << " [" << n << ", " << k << "] m " << m << " " << PathName(p);
        }
      }
    }
  }
}

double Bf16Ulp(double v) {
  if (v == 0) return std::ldexp(1.0, -133);  // smallest bf16 subnormal step
  int e;
  std::frexp(std::fabs(v), &e);  // |v| in [2^(e-1), 2^e)
  return std::ldexp(1.0, e - 1 - 7);
}

// QuantLinearRmsNormed: the normed row it writes (block 0) within one bf16
// ulp of bf16(x * rstd * w) with rstd in double -- the kernel's fp32 rstd
// (k ordered fp32 adds, relative error <= k 2^-24 = 6e-5 at k = 1024, plus
// the rsqrt's and two products' roundings) moves the value before rounding
// by far less than a bf16 ulp (2^-8 relative), so the rounding can flip at
// most one ulp near a boundary -- and y bit-equal to QuantLinear's m = 1
// CUDA-core GEMV on that very row (the fused kernel stages the same bf16
// values into the same GEMV). With programmatic launch on (the attribute and
// the L2 prefetch prologue) the same bits again.
void CheckRmsNormed(std::mt19937_64& rng, QuantFormat f, int64_t n, int64_t k, Accumulate mode) {
  SCOPED_TRACE(std::string(Name(f)) + " [" + std::to_string(n) + ", " + std::to_string(k) + "]" +
               (mode == Accumulate::kAdd ? " add" : " overwrite"));
  DeviceWeight dw(f, n, k);
  QuantizeOnGpu(RandomWeights(rng, n, k), &dw);
  std::normal_distribution<float> xd(0.f, 3.f), wd(1.f, 0.3f);
  std::vector<float> x(k), nw(k), y0(n);
  for (auto& v : x) v = xd(rng);
  for (auto& v : nw) v = wd(rng);
  for (auto& v : y0) v = xd(rng);
  const float eps = 1e-5f;
  DeviceBuffer<float> dx(k), dnw(k), dy(n), dwant(n);
  DeviceBuffer<__nv_bfloat16> dnormed(k);
  ASSERT_EQ(dx.Upload(x), cudaSuccess);
  ASSERT_EQ(dnw.Upload(nw), cudaSuccess);
  std::vector<float> y_runs[2];
  std::vector<__nv_bfloat16> normed;
  for (int pdl = 0; pdl < 2; ++pdl) {
    ASSERT_EQ(dy.Upload(y0), cudaSuccess);
    ASSERT_EQ(cudaMemset(dnormed.get(), 0xFF, k * sizeof(__nv_bfloat16)), cudaSuccess);  // NaN: unwritten shows
    RmsNormedRow in;
    in.x = dx.get();
    in.weight = dnw.get();
    in.eps = eps;
    in.normed = dnormed.get();
    {
      const ScopedProgrammaticLaunch scope(pdl == 1);
      const Status s = QuantLinearRmsNormed(in, dw.w, dy.get(), mode, nullptr);
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(dy.Download(&y_runs[pdl]), cudaSuccess);
    std::vector<__nv_bfloat16> got;
    ASSERT_EQ(dnormed.Download(&got), cudaSuccess);
    if (pdl == 0) normed = got;
    else ASSERT_EQ(std::memcmp(got.data(), normed.data(), k * sizeof(__nv_bfloat16)), 0);
  }
  ASSERT_EQ(std::memcmp(y_runs[0].data(), y_runs[1].data(), n * sizeof(float)), 0) << "programmatic launch";
  double ss = 0;
  for (float v : x) ss += double(v) * v;
  const double rstd = 1.0 / std::sqrt(ss / double(k) + eps);
  for (int64_t j = 0; j < k; ++j) {
    const double want = double(x[j]) * rstd * nw[j];
    const double got = __bfloat162float(normed[j]);
    ASSERT_LE(std::fabs(got - want), Bf16Ulp(want)) << "normed column " << j;
  }
  // The unfused GEMV on the fused kernel's own normed row.
  ASSERT_EQ(dwant.Upload(y0), cudaSuccess);
  ASSERT_TRUE(detail::QuantLinearOnPath(QuantLinearPath::kCudaCore, dnormed.get(), k, 1, dw.w, dwant.get(), n, mode,
                                        nullptr)
                  .ok());
  std::vector<float> want;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(dwant.Download(&want), cudaSuccess);
  ASSERT_EQ(std::memcmp(want.data(), y_runs[0].data(), n * sizeof(float)), 0);
}

TEST(QuantLinearGpu, RmsNormedEqualsNormThenGemv) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4}) {
    CheckRmsNormed(rng, f, 8, 128, Accumulate::kOverwrite);
    CheckRmsNormed(rng, f, 40, 640, Accumulate::kAdd);
    CheckRmsNormed(rng, f, 1536, 1024, Accumulate::kOverwrite);  // gpu-ref qkv
    CheckRmsNormed(rng, f, 64, 1024, Accumulate::kOverwrite);    // router
    CheckRmsNormed(rng, f, 5632, 1024, Accumulate::kAdd);        // dense w1|w3
    CheckRmsNormed(rng, f, 4096, 1024, Accumulate::kOverwrite);  // a lm_head slice
  }
}

// The router tail (RouterTail): QuantLinearRmsNormed that also routes equals
// QuantLinearRmsNormed then RouterTopK bit for bit -- logits, scores, ids,
// gates and the ids copy -- three calls in a row on one counter (each must
// leave it 0 for the next), sigmoid with bias and norm_topk as the gpu-ref
// model routes, and softmax; E = 64 (gpu-ref), 256 (the most) and 8.
void CheckRouted(std::mt19937_64& rng, int experts, int top_k, bool sigmoid) {
  SCOPED_TRACE("experts " + std::to_string(experts) + " top_k " + std::to_string(top_k) +
               (sigmoid ? " sigmoid" : " softmax"));
  const int64_t k = 1024;
  DeviceWeight dw(QuantFormat::kBF16, experts, k);
  QuantizeOnGpu(RandomWeights(rng, experts, k), &dw);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(k), nw(k, 1.f), bias(experts);
  for (auto& v : x) v = nd(rng);
  for (auto& v : bias) v = 0.1f * nd(rng);
  DeviceBuffer<float> dx(k), dnw(k), dbias(experts);
  ASSERT_EQ(dx.Upload(x), cudaSuccess);
  ASSERT_EQ(dnw.Upload(nw), cudaSuccess);
  ASSERT_EQ(dbias.Upload(bias), cudaSuccess);
  DeviceBuffer<unsigned> counter(1);
  ASSERT_EQ(cudaMemset(counter.get(), 0, sizeof(unsigned)), cudaSuccess);
  const int stride = top_k + 1, copy_stride = 2 * top_k;  // wider rows, as the engine uses them
  struct Out {
    std::vector<float> logits, scores, gates;
    std::vector<uint16_t> ids, copy;
  };
  auto run = [&](bool fused, Out* out) {
    DeviceBuffer<float> logits(experts), scores(experts), gates(stride);
    DeviceBuffer<uint16_t> ids(stride), copy(copy_stride);
    ASSERT_EQ(cudaMemset(gates.get(), 0, stride * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMemset(ids.get(), 0, stride * sizeof(uint16_t)), cudaSuccess);
    ASSERT_EQ(cudaMemset(copy.get(), 0, copy_stride * sizeof(uint16_t)), cudaSuccess);
    RmsNormedRow in;
    in.x = dx.get();
    in.weight = dnw.get();
    in.eps = 1e-6f;
    RouterArgs ra;
    ra.logits = logits.get();
    ra.bias = sigmoid ? dbias.get() : nullptr;
    ra.scores = scores.get();
    ra.ids = ids.get();
    ra.gates = gates.get();
    ra.tokens = 1;
    ra.experts = experts;
    ra.top_k = top_k;
    ra.sigmoid = sigmoid;
    ra.norm_topk = sigmoid;
    ra.route_scale = 2.5f;
    ra.out_stride = stride;
    ra.ids_copy = copy.get();
    ra.ids_copy_stride = copy_stride;
    if (fused) {
      const RouterTail tail{ra, counter.get()};
      const Status s = QuantLinearRmsNormed(in, dw.w, logits.get(), Accumulate::kOverwrite, nullptr, &tail);
      ASSERT_TRUE(s.ok()) << s.ToString();
    } else {
      ASSERT_TRUE(QuantLinearRmsNormed(in, dw.w, logits.get(), Accumulate::kOverwrite, nullptr).ok());
      ASSERT_TRUE(RouterTopK(ra, nullptr).ok());
    }
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(logits.Download(&out->logits), cudaSuccess);
    ASSERT_EQ(scores.Download(&out->scores), cudaSuccess);
    ASSERT_EQ(gates.Download(&out->gates), cudaSuccess);
    ASSERT_EQ(ids.Download(&out->ids), cudaSuccess);
    ASSERT_EQ(copy.Download(&out->copy), cudaSuccess);
  };
  Out want;
  run(false, &want);
  float gate_sum = 0;
  for (int j = 0; j < top_k; ++j) gate_sum += want.gates[j];
  ASSERT_GT(gate_sum, 0.f) << "the reference routed nothing";
  for (int rep = 0; rep < 3; ++rep) {
    Out got;
    run(true, &got);
    ASSERT_EQ(std::memcmp(got.logits.data(), want.logits.data(), experts * 4), 0) << "call " << rep;
    ASSERT_EQ(std::memcmp(got.scores.data(), want.scores.data(), experts * 4), 0) << "call " << rep;
    ASSERT_EQ(std::memcmp(got.gates.data(), want.gates.data(), stride * 4), 0) << "call " << rep;
    ASSERT_EQ(got.ids, want.ids) << "call " << rep;
    ASSERT_EQ(got.copy, want.copy) << "call " << rep;
    unsigned left = 1;
    ASSERT_EQ(cudaMemcpy(&left, counter.get(), sizeof(unsigned), cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(left, 0u) << "the fused router must leave its counter at 0";
  }
}

TEST(QuantLinearGpu, RmsNormedRouterTailEqualsRouterTopK) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  CheckRouted(rng, 64, 6, true);
  CheckRouted(rng, 64, 6, false);
  CheckRouted(rng, 256, 16, true);
  CheckRouted(rng, 8, 2, true);
}

TEST(QuantLinearArgs, RmsNormedRejectsBadArguments) {
  // Each case fails its checks before any CUDA call (host pointers are fine).
  QuantWeight w;
  w.format = QuantFormat::kBF16;
  w.n = 8;
  w.k = 128;
  alignas(16) static float buf[256];
  w.data = buf;
  RmsNormedRow in;
  in.x = buf;
  in.weight = buf;
  RmsNormedRow no_x = in;
  no_x.x = nullptr;
  EXPECT_EQ(QuantLinearRmsNormed(no_x, w, buf, Accumulate::kOverwrite, nullptr).code(), StatusCode::kInvalidArgument);
  RmsNormedRow odd = in;
  odd.normed = reinterpret_cast<__nv_bfloat16*>(reinterpret_cast<char*>(buf) + 2);
  EXPECT_EQ(QuantLinearRmsNormed(odd, w, buf, Accumulate::kOverwrite, nullptr).code(), StatusCode::kInvalidArgument);
  RmsNormedRow neg = in;
  neg.eps = -1.f;
  EXPECT_EQ(QuantLinearRmsNormed(neg, w, buf, Accumulate::kOverwrite, nullptr).code(), StatusCode::kInvalidArgument);
  QuantWeight bad = w;
  bad.k = 100;
  EXPECT_EQ(QuantLinearRmsNormed(in, bad, buf, Accumulate::kOverwrite, nullptr).code(), StatusCode::kInvalidArgument);
  // A route whose logits are not y, or with more than one token, or no counter.
  static unsigned counter = 0;
  RouterTail tail;
  tail.args.logits = buf + 64;
  tail.args.scores = buf;
  tail.args.ids = reinterpret_cast<uint16_t*>(buf);
  tail.args.gates = buf;
  tail.args.tokens = 1;
  tail.args.experts = 8;
  tail.args.top_k = 2;
  tail.counter = &counter;
  EXPECT_EQ(QuantLinearRmsNormed(in, w, buf, Accumulate::kOverwrite, nullptr, &tail).code(),
            StatusCode::kInvalidArgument);
  tail.args.logits = buf;
  tail.args.tokens = 2;
  EXPECT_EQ(QuantLinearRmsNormed(in, w, buf, Accumulate::kOverwrite, nullptr, &tail).code(),
            StatusCode::kInvalidArgument);
  tail.args.tokens = 1;
  tail.counter = nullptr;
  EXPECT_EQ(QuantLinearRmsNormed(in, w, buf, Accumulate::kOverwrite, nullptr, &tail).code(),
            StatusCode::kInvalidArgument);
  tail.counter = &counter;
  tail.args.top_k = 9;  // > experts
  EXPECT_EQ(QuantLinearRmsNormed(in, w, buf, Accumulate::kOverwrite, nullptr, &tail).code(),
            StatusCode::kInvalidArgument);
}

TEST(QuantLinearGpu, RowsAreIndependentOfTheBatch) {
  // On each path a token's output is the same bits whatever else shares the
  // call (a prompt's prefill and its decode agree): 37 rows at once (passes
  // of 16, 16, 5) against the same rows one at a time (CUDA-core path) or
  // two at a time (tensor-core path).
  GROVE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(testing::FreshSeed());
  for (QuantLinearPath path : {QuantLinearPath::kCudaCore, QuantLinearPath::kTensorCore})
    for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4}) {
      const int64_t n = 264, k = 1152;
      const int m = 37, step = path == QuantLinearPath::kCudaCore ? 1 : 2;
      DeviceWeight dw(f, n, k);
      QuantizeOnGpu(RandomWeights(rng, n, k), &dw);
      std::vector<__nv_bfloat16> xb;
      std::vector<double> xd;
      testing::RandomBf16(rng, static_cast<size_t>(m) * k, &xb, &xd);
      DeviceBuffer<__nv_bfloat16> dx(xb.size());
      DeviceBuffer<float> batch(static_cast<size_t>(m) * n), split(static_cast<size_t>(m) * n);
      ASSERT_EQ(dx.Upload(xb), cudaSuccess);
      ASSERT_TRUE(
          detail::QuantLinearOnPath(path, dx.get(), k, m, dw.w, batch.get(), n, Accumulate::kOverwrite, nullptr).ok());
      for (int i = 0; i < m; i += step)
        ASSERT_TRUE(detail::QuantLinearOnPath(path, dx.get() + i * k, k, std::min(step, m - i), dw.w,
                                              split.get() + i * n, n, Accumulate::kOverwrite, nullptr)
                        .ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<float> a, b;
      ASSERT_EQ(batch.Download(&a), cudaSuccess);
      ASSERT_EQ(split.Download(&b), cudaSuccess);
      ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << Name(f) << " " << PathName(path);
    }
}

// ---- MoE ----

struct MoeCase {
  int m, hidden, expert_hidden, experts, top_k;
  std::vector<uint16_t> ids;  // [m, top_k]
  std::vector<QuantFormat> formats;  // per expert
  Accumulate mode;
};

void CheckMoe(std::mt19937_64& rng, const MoeCase& c) {
  SCOPED_TRACE("m " + std::to_string(c.m) + " experts " + std::to_string(c.experts) + " top_k " +
               std::to_string(c.top_k));
  const int H = c.hidden, E = c.expert_hidden;
  std::vector<std::unique_ptr<DeviceWeight>> w1, w3, w2;
  std::vector<QuantWeight> q1, q3, q2;
  for (int e = 0; e < c.experts; ++e) {
    const QuantFormat f = c.formats[e];
    w1.push_back(std::make_unique<DeviceWeight>(f, E, H));
    w3.push_back(std::make_unique<DeviceWeight>(f, E, H));
    w2.push_back(std::make_unique<DeviceWeight>(f, H, E));
    QuantizeOnGpu(RandomWeights(rng, E, H), w1.back().get());
    QuantizeOnGpu(RandomWeights(rng, E, H), w3.back().get());
    QuantizeOnGpu(RandomWeights(rng, H, E), w2.back().get());
    q1.push_back(w1.back()->w);
    q3.push_back(w3.back()->w);
    q2.push_back(w2.back()->w);
  }
  std::vector<__nv_bfloat16> xb;
  std::vector<double> xd;
  testing::RandomBf16(rng, static_cast<size_t>(c.m) * H, &xb, &xd);
  std::vector<float> gates(static_cast<size_t>(c.m) * c.top_k), out0(static_cast<size_t>(c.m) * H);
  std::uniform_real_distribution<float> u01(0.05f, 1.f), u11(-1.f, 1.f);
  for (auto& g : gates) g = u01(rng);
  for (auto& v : out0) v = u11(rng);

  DeviceBuffer<__nv_bfloat16> dx(xb.size());
  DeviceBuffer<uint16_t> dids(c.ids.size());
  DeviceBuffer<float> dgates(gates.size()), dout(out0.size());
  DeviceBuffer<QuantWeight> dq1(c.experts), dq3(c.experts), dq2(c.experts);
  ASSERT_EQ(dx.Upload(xb), cudaSuccess);
  ASSERT_EQ(dids.Upload(c.ids), cudaSuccess);
  ASSERT_EQ(dgates.Upload(gates), cudaSuccess);
  ASSERT_EQ(dout.Upload(out0), cudaSuccess);
  ASSERT_EQ(dq1.Upload(q1), cudaSuccess);
  ASSERT_EQ(dq3.Upload(q3), cudaSuccess);
  ASSERT_EQ(dq2.Upload(q2), cudaSuccess);
  const size_t ws_bytes = MoeDecodeWorkspaceBytes(c.m, H, E, c.experts, c.top_k);
  DeviceBuffer<uint8_t> ws(ws_bytes);
  MoeDecodeArgs a;
  a.x = dx.get();
  a.ids = dids.get();
  a.gates = dgates.get();
  a.w1 = dq1.get();
  a.w3 = dq3.get();
  a.w2 = dq2.get();
  a.out = dout.get();
  a.mode = c.mode;
  a.m = c.m;
  a.hidden = H;
  a.expert_hidden = E;
  a.experts = c.experts;
  a.top_k = c.top_k;
  a.workspace = ws.get();
  a.workspace_bytes = ws_bytes;
  // One forward from the same starting out on `path`, its out downloaded.
  auto run_on = [&](const MoeDecodeArgs& args, detail::MoeDecodePath path, std::vector<float>* got,
                    int max_chunk_blocks = detail::kMoeMaxChunkBlocks) {
    ASSERT_EQ(dout.Upload(out0), cudaSuccess);
    const Status s = detail::MoeDecodeForwardOnPath(args, path, nullptr, max_chunk_blocks);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(dout.Download(got), cudaSuccess);
  };
  // Both kernel pairs, each from the same starting out, against one reference.
  std::vector<float> outs[2];
  const detail::MoeDecodePath paths[2] = {detail::MoeDecodePath::kCudaCore, detail::MoeDecodePath::kTensorCore};
  for (int p = 0; p < 2; ++p) ASSERT_NO_FATAL_FAILURE(run_on(a, paths[p], &outs[p]));
  // The tensor-core pair with 2 and 4 tiles a block (another slice order):
  // checked against the same reference below.
  std::vector<float> tiled[2];
  for (int i = 0; i < 2; ++i) {
    MoeDecodeArgs wide = a;
    wide.mma_tiles_per_block = 2 << i;
    ASSERT_NO_FATAL_FAILURE(run_on(wide, detail::MoeDecodePath::kTensorCore, &tiled[i]));
  }
  // The up stage's W1 and W3 in one loop: the same bits, at each tile count.
  for (int tiles : {1, 2, 4}) {
    MoeDecodeArgs base = a, paired = a;
    base.mma_tiles_per_block = paired.mma_tiles_per_block = tiles;
    base.mma_paired_up_max_tokens = 0;
    paired.mma_paired_up_max_tokens = a.m;
    std::vector<float> got[2];
    ASSERT_NO_FATAL_FAILURE(run_on(base, detail::MoeDecodePath::kTensorCore, &got[0]));
    ASSERT_NO_FATAL_FAILURE(run_on(paired, detail::MoeDecodePath::kTensorCore, &got[1]));
    ASSERT_EQ(std::memcmp(got[0].data(), got[1].data(), got[0].size() * 4), 0) << "paired up, " << tiles << " tiles";
  }
  // Tensor-core blocks walking all of an expert's chunks (what a launch
  // past the grid's y extent does) give the same bits as a block a chunk.
  std::vector<float> walked;
  ASSERT_NO_FATAL_FAILURE(run_on(a, detail::MoeDecodePath::kTensorCore, &walked, /*max_chunk_blocks=*/0));
  ASSERT_EQ(std::memcmp(walked.data(), outs[1].data(), walked.size() * 4), 0) << "walking blocks";
  // The L2 prefetch of int8 / int4 blocks' weight rows is a hint: the same bits.
  {
    MoeDecodeArgs prefetching = a;
    prefetching.mma_prefetch_rows = true;
    std::vector<float> got;
    ASSERT_NO_FATAL_FAILURE(run_on(prefetching, detail::MoeDecodePath::kTensorCore, &got));
    ASSERT_EQ(std::memcmp(got.data(), outs[1].data(), got.size() * 4), 0) << "prefetching rows";
  }
  // The next RMSNorm folded into the combine: out is the same bits, and
  // normed is RMSNorm(out row) * weight rounded to bf16 (checked against a
  // double reference: within bf16's half ulp plus fp32 rounding of the
  // sum and of rsqrtf, 2^-8 of the value and 1e-6 absolute).
  {
    std::vector<float> norm_w(H);
    for (auto& v : norm_w) v = u01(rng);
    DeviceBuffer<float> dnorm(H);
    DeviceBuffer<__nv_bfloat16> dnormed(static_cast<size_t>(c.m) * H);
    ASSERT_EQ(dnorm.Upload(norm_w), cudaSuccess);
    MoeDecodeArgs norming = a;
    norming.norm_weight = dnorm.get();
    norming.normed = dnormed.get();
    norming.norm_eps = 1e-6f;
    std::vector<float> got;
    ASSERT_NO_FATAL_FAILURE(run_on(norming, detail::MoeDecodePath::kTensorCore, &got));
    ASSERT_EQ(std::memcmp(got.data(), outs[1].data(), got.size() * 4), 0) << "combine + norm: out";
    std::vector<__nv_bfloat16> normed;
    ASSERT_EQ(dnormed.Download(&normed), cudaSuccess);
    for (int t = 0; t < c.m; ++t) {
      double ss = 0;
      for (int j = 0; j < H; ++j) ss += double(got[t * H + j]) * got[t * H + j];
      const double rstd = 1.0 / std::sqrt(ss / H + 1e-6);
      for (int j = 0; j < H; ++j) {
        const double want = got[t * H + j] * rstd * norm_w[j];
        ASSERT_NEAR(__bfloat162float(normed[t * H + j]), want, std::fabs(want) / 256 + 1e-6)
            << "normed, token " << t << " column " << j;
      }
    }
    MoeDecodeArgs half = a;
    half.normed = dnormed.get();  // without its weight
    EXPECT_EQ(MoeDecodeForward(half, nullptr).code(), StatusCode::kInvalidArgument);
  }
  // And the public entry point (kAuto picks one of the two) runs.
  ASSERT_EQ(dout.Upload(out0), cudaSuccess);
  ASSERT_TRUE(MoeDecodeForward(a, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> out_auto;
  ASSERT_EQ(dout.Download(&out_auto), cudaSuccess);
  ASSERT_TRUE(std::memcmp(out_auto.data(), outs[0].data(), out_auto.size() * 4) == 0 ||
              std::memcmp(out_auto.data(), outs[1].data(), out_auto.size() * 4) == 0);
  // The one-launch index (small m; ignored above its slot limit) builds the
  // same index: the same bits on both kernel pairs.
  a.one_launch_index = true;
  for (int p = 0; p < 2; ++p) {
    std::vector<float> one;
    ASSERT_NO_FATAL_FAILURE(run_on(a, paths[p], &one));
    ASSERT_EQ(std::memcmp(one.data(), outs[p].data(), one.size() * 4), 0) << "one-launch index, path " << p;
  }
  a.one_launch_index = false;
  // The occupancy hint (a narrow widest format: 4 blocks an SM instead of
  // 3 on the indexed CUDA-core path) changes no bits, whatever the experts'
  // formats really are.
  for (QuantFormat hint : {QuantFormat::kInt8, QuantFormat::kInt4}) {
    MoeDecodeArgs hinted = a;
    hinted.widest_format = hint;
    std::vector<float> got;
    ASSERT_NO_FATAL_FAILURE(run_on(hinted, detail::MoeDecodePath::kCudaCore, &got));
    ASSERT_EQ(std::memcmp(got.data(), outs[0].data(), got.size() * 4), 0) << "widest_format " << Name(hint);
  }
  // Each token alone (m = 1: no route index, block y is slot y) gives its
  // row of the batch's result on the same pair, bit for bit (dropped ids
  // included).
  for (int p = 0; p < 2 && c.m > 1; ++p) {
    SCOPED_TRACE(p == 0 ? "CUDA-core pair" : "tensor-core pair");
    for (int t = 0; t < c.m; ++t) {
      ASSERT_EQ(dout.Upload(out0), cudaSuccess);
      MoeDecodeArgs one = a;
      one.m = 1;
      one.x = dx.get() + static_cast<size_t>(t) * H;
      one.ids = dids.get() + static_cast<size_t>(t) * c.top_k;
      one.gates = dgates.get() + static_cast<size_t>(t) * c.top_k;
      one.out = dout.get() + static_cast<size_t>(t) * H;
      ASSERT_TRUE(detail::MoeDecodeForwardOnPath(one, paths[p], nullptr).ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<float> alone;
      ASSERT_EQ(dout.Download(&alone), cudaSuccess);
      ASSERT_EQ(std::memcmp(alone.data() + static_cast<size_t>(t) * H, outs[p].data() + static_cast<size_t>(t) * H,
                            sizeof(float) * H),
                0)
          << "token " << t << " alone";
    }
  }

  for (int t = 0; t < c.m; ++t) {
    std::vector<double> ref(H, 0.0), bound(H, 0.0);
    for (int j = 0; j < c.top_k; ++j) {
      const int e = c.ids[t * c.top_k + j];
      if (e >= c.experts) continue;  // dropped slot
      const double gate = gates[t * c.top_k + j];
      // h = bf16(silu(g) * u) and the bound on |h_gpu - h| per element.
      std::vector<double> h(E), hb(E);
      for (int i = 0; i < E; ++i) {
        double g = 0, u = 0, mg = 0, mu = 0;
        for (int cc = 0; cc < H; ++cc) {
          const double x = xd[t * H + cc];
          g += x * w1[e]->dequant[i * H + cc];
          u += x * w3[e]->dequant[i * H + cc];
          mg += std::fabs(x * w1[e]->dequant[i * H + cc]);
          mu += std::fabs(x * w3[e]->dequant[i * H + cc]);
        }
        const double silu = g / (1 + std::exp(-g));
        const double pre = silu * u;
        h[i] = rollout::RoundToBf16(static_cast<float>(pre));
        const double eg = 2.0 * H * kU * mg, eu = 2.0 * H * kU * mu;
        // Both sides round to nearest: one flip, up to 1.5 ulp across a binade edge.
        hb[i] = 2 * Bf16Ulp(pre) + 1.1 * eg * (std::fabs(u) + eu) + (std::fabs(silu) + 1.1 * eg) * eu + 8 * kU * std::fabs(pre);
      }
      for (int r = 0; r < H; ++r) {
        double p = 0, mag = 0, hbound = 0;
        for (int i = 0; i < E; ++i) {
          const double w = w2[e]->dequant[r * E + i];
          p += w * h[i];
          mag += std::fabs(w * h[i]);
          hbound += std::fabs(w) * hb[i];
        }
        ref[r] += gate * p;
        bound[r] += gate * (hbound + 2.0 * E * kU * (mag + hbound)) + 2 * kU * c.top_k * gate * mag;
      }
    }
    for (int r = 0; r < H; ++r) {
      double want = ref[r], b = bound[r] + 1e-30;
      if (c.mode == Accumulate::kAdd) {
        want += out0[t * H + r];
        b += 2 * kU * (std::fabs(want) + std::fabs(ref[r]));
      }
      ASSERT_NEAR(outs[0][t * H + r], want, b) << "CUDA-core path, token " << t << " column " << r;
      ASSERT_NEAR(outs[1][t * H + r], want, b) << "tensor-core path, token " << t << " column " << r;
      ASSERT_NEAR(tiled[0][t * H + r], want, b) << "tensor-core path, 2 tiles, token " << t << " column " << r;
      ASSERT_NEAR(tiled[1][t * H + r], want, b) << "tensor-core path, 4 tiles, token " << t << " column " << r;
    }
  }
}

std::vector<uint16_t> DistinctIds(std::mt19937_64& rng, int m, int experts, int top_k) {
  std::vector<uint16_t> ids;
  std::vector<uint16_t> perm(experts);
  for (int t = 0; t < m; ++t) {
    for (int e = 0; e < experts; ++e) perm[e] = static_cast<uint16_t>(e);
    std::shuffle(perm.begin(), perm.end(), rng);
    ids.insert(ids.end(), perm.begin(), perm.begin() + top_k);
  }
  return ids;
}

TEST(MoeDecodeGpu, GpuRefShapeMixedFormats) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int m : {1, 5, 40}) {
    MoeCase c{m, 1024, 512, 64, 6, DistinctIds(rng, m, 64, 6), {}, m == 1 ? Accumulate::kAdd : Accumulate::kOverwrite};
    if (m == 40) {
      // Experts 40 and 41 (past the first 32 the chunk search scans) take
      // slot 0 of 20 tokens each: two 16-row chunks apiece.
      for (int t = 0; t < m; ++t) {
        const uint16_t busy = static_cast<uint16_t>(40 + t % 2);
        auto row = c.ids.begin() + t * 6;
        auto dup = std::find(row, row + 6, busy);
        if (dup != row + 6) *dup = row[0];
        row[0] = busy;
      }
    }
    for (int e = 0; e < 64; ++e) c.formats.push_back(static_cast<QuantFormat>(e % 3));
    CheckMoe(rng, c);
  }
}

TEST(MoeDecodeGpu, RaggedLoadsAndEmptyExperts) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  // 16 experts, 4 never used, expert 0 in almost every token (more than 16
  // rows: several token passes), the rest by a skewed draw.
  const int m = 40, experts = 16, top_k = 4;
  std::vector<uint16_t> ids;
  std::discrete_distribution<int> pick({0, 9, 7, 5, 4, 3, 3, 2, 2, 1, 1, 1, 0, 0, 0, 0});
  for (int t = 0; t < m; ++t) {
    std::vector<uint16_t> row = {0};
    while (static_cast<int>(row.size()) < top_k) {
      const uint16_t e = static_cast<uint16_t>(pick(rng));
      if (std::find(row.begin(), row.end(), e) == row.end()) row.push_back(e);
    }
    std::shuffle(row.begin(), row.end(), rng);
    ids.insert(ids.end(), row.begin(), row.end());
  }
  std::vector<QuantFormat> formats;
  for (int e = 0; e < experts; ++e) formats.push_back(static_cast<QuantFormat>((e * 7) % 3));
  CheckMoe(rng, {m, 256, 128, experts, top_k, ids, formats, Accumulate::kAdd});
  CheckMoe(rng, {m, 256, 128, experts, top_k, ids, formats, Accumulate::kOverwrite});
}

TEST(MoeDecodeGpu, AllTokensOnOneExpertAndDroppedIds) {
  GROVE_SKIP_WITHOUT_GPU();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (QuantFormat f : {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4}) {
    const int m = 37, experts = 8;
    // top_k 1: every token on expert 5 (37 rows: passes of 16, 16, 5).
    CheckMoe(rng, {m, 384, 256, experts, 1, std::vector<uint16_t>(m, 5), std::vector<QuantFormat>(experts, f),
                   Accumulate::kOverwrite});
    // top_k 2: slot 0 on expert 2, slot 1 out of range (dropped: adds nothing).
    std::vector<uint16_t> ids;
    for (int t = 0; t < m; ++t) ids.insert(ids.end(), {2, static_cast<uint16_t>(experts + t % 3)});
    CheckMoe(rng, {m, 384, 256, experts, 2, ids, std::vector<QuantFormat>(experts, f), Accumulate::kAdd});
  }
}

}  // namespace
}  // namespace grove::kernels
