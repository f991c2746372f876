// The rollout engine's quantized kernels on the GPU reference model
// (configs/model/gpu-ref.toml: hidden 1024, 8 heads / 2 kv heads of 128,
// 64 experts x 512, top-6, 2 shared experts, dense layer of 2816, vocab
// 32768). Prints three tables, no assertions:
//  (a) the ceilings: a streaming read kernel over 1 GiB, the same read by
//      bulk copies (the faster of the two is the read ceiling the tables
//      use), and cudaMemcpy D2D;
//  (b) QuantLinear at m = 1, 2, 4, 8, 16 for bf16 / int8 / int4 on the dense
//      shapes and on one layer's whole per-token "active set" (qkv, wo, the
//      2 shared and 6 routed experts' w1/w3/w2 as 26 QuantLinear calls in one
//      CUDA graph): microseconds, weight bytes read per second and their % of
//      the measured read ceiling, and int4 / bf16 speedup;
//  (c) MoeDecodeForward at m = 1, 8, 32, 128 (64 experts, top-6, uniform
//      random distinct routing) per format: microseconds and the bytes of the
//      experts it touched per second;
//  (d) QuantizeWeight over one MoE layer's fp32 weights per format, and the
//      whole model's time extrapolated from it (issue 9: "well under a second").
// L2 (50 MB on the H100) is flushed before every timed repetition by a
// 256 MB memset outside the timed region, so weights come from HBM as in
// decode, where a layer's weights are evicted by the other layers.
//
//  (e) with --gemv_variants (instead of b-d): the m <= 4 GEMV's variants
//      (detail::QuantLinearPath: CUDA cores with 1, 2 = default, 4 weight
//      rows per warp, and tensor cores) on the dense gpu-ref shapes at m = 1
//      and 4: us and % of the read ceiling, to pick the default from.
//
//  (f) with --launch_chain (instead of b-d): us per link of a chain of 150
//      dependent kernels in one CUDA graph (a decode step's length), with and
//      without programmatic dependent launch, empty or streaming 2 MiB of
//      weights each (before or after griddepcontrol.wait): the floor the
//      launches of the batch-1 step stand on.
//  (g) with --grid_barrier (instead of b-d): us per grid barrier of one
//      persistent kernel (a block an SM), for several ways of building it,
//      bare and with a stage head: the floor the persistent step stands on.
//  (h) with --dataflow_step (instead of b-d): a probe of a persistent,
//      dataflow batch-1 step at gpu-ref's shapes (bench/rollout/
//      dataflow_step.h): ms a step and its weight bytes' rate against (a).
//
// Usage: quant_linear_bench [--quick] [--gemv_variants] [--launch_chain] [--grid_barrier] [--dataflow_step]
//   (--quick: 5 repetitions instead of 20)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench/rollout/hbm_read.h"
#include "bench/rollout/dataflow_step.h"
#include "bench/rollout/grid_barrier.h"
#include "bench/rollout/launch_chain.h"
#include "kernels/moe_decode.h"
#include "kernels/moe_decode_internal.h"
#include "kernels/quant_linear.h"
#include "kernels/quant_linear_internal.h"
#include "bench/support/bench_util.h"

namespace {

using grove::kernels::Accumulate;
using grove::kernels::QuantFormat;
using grove::kernels::QuantWeight;

#define STATUS_CHECK(x)                                                                  \
  do {                                                                                   \
    const grove::Status s_ = (x);                                                        \
    if (!s_.ok()) {                                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, s_.ToString().c_str()); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

constexpr QuantFormat kFormats[] = {QuantFormat::kBF16, QuantFormat::kInt8, QuantFormat::kInt4};
const char* Name(QuantFormat f) { return f == QuantFormat::kBF16 ? "bf16" : f == QuantFormat::kInt8 ? "int8" : "int4"; }

int g_reps = 20;
void* g_flush = nullptr;
constexpr size_t kFlushBytes = size_t{256} << 20;

// Median GPU time in microseconds of fn over g_reps runs, each after an L2
// flush that is not timed.
double MedianUs(const std::function<void()>& fn) {
  fn();  // warm-up (and first-launch attribute calls)
  GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<cudaEvent_t> ev(2 * g_reps);
  for (auto& e : ev) GROVE_BENCH_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < g_reps; ++i) {
    GROVE_BENCH_CUDA_CHECK(cudaMemsetAsync(g_flush, i & 0xFF, kFlushBytes, nullptr));
    GROVE_BENCH_CUDA_CHECK(cudaEventRecord(ev[2 * i]));
    fn();
    GROVE_BENCH_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1]));
  }
  GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
  GROVE_BENCH_CUDA_CHECK(cudaGetLastError());
  std::vector<float> us(g_reps);
  for (int i = 0; i < g_reps; ++i) {
    float ms = 0;
    GROVE_BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    us[i] = ms * 1000.f;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(us.begin(), us.end());
  return us[g_reps / 2];
}

// Random fp32 weights (scale 1/sqrt(k)), generated once per shape: the
// timing does not depend on the values, and 600 MB of fresh normals per run
// would cost more than the measurements.
const std::vector<float>& RandomHost(int n, int k, std::mt19937_64& rng) {
  static std::map<std::pair<int, int>, std::vector<float>> cache;
  std::vector<float>& v = cache[{n, k}];
  if (v.empty()) {
    v.resize(static_cast<size_t>(n) * k);
    std::normal_distribution<float> dist(0.f, 1.f / std::sqrt(static_cast<float>(k)));
    for (auto& x : v) x = dist(rng);
  }
  return v;
}

// One quantized weight on the device, filled from random fp32 by QuantizeWeight.
struct Weight {
  QuantWeight w;
  size_t bytes = 0;  // data + scales
  void* data = nullptr;
  float* scales = nullptr;
  Weight(QuantFormat f, int n, int k, std::mt19937_64& rng, float* scratch) {
    w.format = f;
    w.n = n;
    w.k = k;
    const size_t data_bytes = grove::kernels::QuantDataBytes(f, n, k);
    const int64_t scale_count = grove::kernels::QuantScaleCount(f, n, k);
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&data, data_bytes));
    if (scale_count > 0) GROVE_BENCH_CUDA_CHECK(cudaMalloc(&scales, scale_count * sizeof(float)));
    bytes = data_bytes + scale_count * sizeof(float);
    const std::vector<float>& host = RandomHost(n, k, rng);
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(scratch, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
    STATUS_CHECK(grove::kernels::QuantizeWeight(scratch, n, k, f, data, scales, nullptr));
    GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    w.data = data;
    w.scales = scales;
  }
  ~Weight() {
    cudaFree(data);
    if (scales) cudaFree(scales);
  }
};

double Ceilings() {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  unsigned* sink = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&a, bytes));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&b, bytes));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&sink, 4));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(a, 1, bytes));
  const double read_us = MedianUs([&] { GROVE_BENCH_CUDA_CHECK(grove::bench::LaunchHbmRead(a, bytes, sink, nullptr)); });
  const double copy_us = MedianUs([&] { GROVE_BENCH_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  const double read_gbs = bytes / read_us / 1e3, copy_gbs = 2.0 * bytes / copy_us / 1e3;
  std::printf("(a) ceilings over 1 GiB: streaming read %.0f GB/s (%.0f us); cudaMemcpy D2D %.0f GB/s "
              "(read + write, %.0f us)\n",
              read_gbs, read_us, copy_gbs, copy_us);
  std::printf("    the same read by bulk copies (16 KB, one block an SM) with 1 / 2 / 4 / 8 in flight:");
  double bulk_gbs = 0.0;
  for (int in_flight : {1, 2, 4, 8}) {
    const double us = MedianUs([&] { GROVE_BENCH_CUDA_CHECK(grove::bench::LaunchHbmBulkRead(a, bytes, in_flight, nullptr)); });
    bulk_gbs = std::max(bulk_gbs, bytes / us / 1e3);
    std::printf(" %.0f", bytes / us / 1e3);
  }
  std::printf(" GB/s\n    read ceiling for the tables below: %.0f GB/s (the faster of the two reads)\n\n",
              std::max(read_gbs, bulk_gbs));
  cudaFree(a);
  cudaFree(b);
  cudaFree(sink);
  return std::max(read_gbs, bulk_gbs);
}

struct Shape {
  const char* name;
  std::vector<std::pair<int, int>> weights;  // (n, k) of each call, in order
};

void LinearTable(double read_gbs, std::mt19937_64& rng) {
  const int H = 1024, E = 512;
  std::vector<std::pair<int, int>> active = {{1536, H}, {H, 1024}};  // qkv, wo
  for (int e = 0; e < 8; ++e) {                                      // 2 shared + 6 routed experts
    active.push_back({E, H});
    active.push_back({E, H});
    active.push_back({H, E});
  }
  const std::vector<Shape> shapes = {
      {"qkv 1024->1536", {{1536, H}}},
      {"wo 1024->1024", {{H, 1024}}},
      {"dense w1|w3 1024->5632", {{5632, H}}},
      {"dense w2 2816->1024", {{H, 2816}}},
      {"lm head 1024->32768", {{32768, H}}},
      {"active set (26 calls, graph)", active},
  };
  float* scratch = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&scratch, size_t{32768} * H * 4));
  const int max_m = 16;
  __nv_bfloat16* x = nullptr;
  float* y = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&x, size_t{max_m} * 2816 * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(x, 0x3c, size_t{max_m} * 2816 * 2));  // bf16 ~0.0115, finite
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&y, size_t{max_m} * 32768 * 4));
  cudaStream_t stream;
  GROVE_BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  std::printf("(b) QuantLinear, y[m, n] = x[m, k] W^T, weights from HBM; us | weight GB/s (%% of read ceiling)\n");
  std::printf("(last column: int4 on the path QuantLinear does not take at that m: tc = tensor cores, cc = CUDA cores)\n");
  std::printf("%-30s %3s | %22s | %22s | %22s | %9s | %s\n", "shape", "m", "bf16", "int8", "int4", "int4/bf16",
              "int4 other path us");
  for (const Shape& shape : shapes) {
    std::vector<std::unique_ptr<Weight>> ws[3];
    size_t bytes[3] = {0, 0, 0};
    for (int fi = 0; fi < 3; ++fi)
      for (auto [n, k] : shape.weights) {
        ws[fi].push_back(std::make_unique<Weight>(kFormats[fi], n, k, rng, scratch));
        bytes[fi] += ws[fi].back()->bytes;
      }
    for (int m : {1, 2, 4, 8, 16}) {
      // Per format the default path (QuantLinear), and int4 on the other
      // path for comparison (CUDA cores at m >= 2, tensor cores at m = 1).
      auto time_calls = [&](int fi, grove::kernels::detail::QuantLinearPath path) {
        auto calls = [&](cudaStream_t s) {
          for (const auto& w : ws[fi])
            STATUS_CHECK(grove::kernels::detail::QuantLinearOnPath(path, x, w->w.k, m, w->w, y, w->w.n,
                                                                   Accumulate::kOverwrite, s));
        };
        if (shape.weights.size() == 1) return MedianUs([&] { calls(nullptr); });
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        GROVE_BENCH_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        calls(stream);
        GROVE_BENCH_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
        GROVE_BENCH_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        const double t = MedianUs([&] { GROVE_BENCH_CUDA_CHECK(cudaGraphLaunch(exec, nullptr)); });
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        return t;
      };
      using grove::kernels::detail::QuantLinearPath;
      double us[3];
      for (int fi = 0; fi < 3; ++fi) us[fi] = time_calls(fi, QuantLinearPath::kAuto);
      const double other = time_calls(2, m == 1 ? QuantLinearPath::kTensorCore : QuantLinearPath::kCudaCore);
      char cell[3][64];
      for (int fi = 0; fi < 3; ++fi) {
        const double gbs = bytes[fi] / us[fi] / 1e3;
        std::snprintf(cell[fi], sizeof(cell[fi]), "%7.1f | %5.0f (%3.0f%%)", us[fi], gbs, 100.0 * gbs / read_gbs);
      }
      std::printf("%-30s %3d | %22s | %22s | %22s | %8.2fx | %7.1f %s\n", shape.name, m, cell[0], cell[1], cell[2],
                  us[0] / us[2], other, m == 1 ? "tc" : "cc");
    }
  }
  std::printf("\n");
  cudaStreamDestroy(stream);
  cudaFree(scratch);
  cudaFree(x);
  cudaFree(y);
}

void GemvVariantsTable(double read_gbs, std::mt19937_64& rng) {
  using grove::kernels::detail::QuantLinearPath;
  const int H = 1024;
  const std::vector<Shape> shapes = {
      {"qkv 1024->1536", {{1536, H}}},           {"wo 1024->1024", {{H, 1024}}},
      {"dense w1|w3 1024->5632", {{5632, H}}},   {"dense w2 2816->1024", {{H, 2816}}},
      {"expert w1|w3 1024->1024", {{1024, H}}},  {"expert w2 512->1024", {{H, 512}}},
      {"lm head 1024->32768", {{32768, H}}},
  };
  const QuantLinearPath paths[4] = {QuantLinearPath::kCudaCoreRows1, QuantLinearPath::kCudaCore,
                                    QuantLinearPath::kCudaCoreRows4, QuantLinearPath::kTensorCore};
  float* scratch = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&scratch, size_t{32768} * H * 4));
  __nv_bfloat16* x = nullptr;
  float* y = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&x, size_t{4} * 2816 * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(x, 0x3c, size_t{4} * 2816 * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&y, size_t{4} * 32768 * 4));
  std::printf("(e) GEMV variants (detail::QuantLinearPath), us (%% of read ceiling); default at m = 1: cc2, at m >= 2: tc\n");
  std::printf("%-26s %-5s %2s | %16s | %16s | %16s | %16s\n", "shape", "fmt", "m", "cc1 (rows1)", "cc2 (default)",
              "cc4 (rows4)", "tc");
  for (const Shape& shape : shapes) {
    const auto [n, k] = shape.weights[0];
    for (int fi = 0; fi < 3; ++fi) {
      Weight w(kFormats[fi], n, k, rng, scratch);
      for (int m : {1, 4}) {
        char cell[4][40];
        for (int p = 0; p < 4; ++p) {
          const double us = MedianUs([&] {
            STATUS_CHECK(grove::kernels::detail::QuantLinearOnPath(paths[p], x, k, m, w.w, y, n,
                                                                   Accumulate::kOverwrite, nullptr));
          });
          std::snprintf(cell[p], sizeof(cell[p]), "%6.1f (%3.0f%%)", us, 100.0 * (w.bytes / us / 1e3) / read_gbs);
        }
        std::printf("%-26s %-5s %2d | %16s | %16s | %16s | %16s\n", shape.name, fi == 0 ? "bf16" : fi == 1 ? "int8" : "int4",
                    m, cell[0], cell[1], cell[2], cell[3]);
      }
    }
  }
  std::printf("\n");
  cudaFree(scratch);
  cudaFree(x);
  cudaFree(y);
}

void MoeTable(double read_gbs, std::mt19937_64& rng) {
  const int H = 1024, E = 512, experts = 64, top_k = 6;
  float* scratch = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&scratch, size_t{E} * H * 4));
  std::printf("(c) MoeDecodeForward, 64 experts x 512, top-6, hidden 1024; us | GB/s of the touched experts' "
              "weights (%% of read ceiling)\n");
  std::printf("(default = MoeDecodeForward's choice; then each kernel pair's time: cc = CUDA cores, tc = tensor cores)\n");
  std::printf("%-6s %4s %8s | %7s | %14s | %7s | %7s\n", "format", "m", "experts", "us", "GB/s (%)", "cc us",
              "tc us");
  const int max_m = 128;
  __nv_bfloat16* x = nullptr;
  float *out = nullptr, *gates = nullptr;
  uint16_t* ids = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&x, size_t{max_m} * H * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(x, 0x3c, size_t{max_m} * H * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&out, size_t{max_m} * H * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&gates, size_t{max_m} * top_k * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ids, size_t{max_m} * top_k * 2));
  const size_t ws_bytes = grove::kernels::MoeDecodeWorkspaceBytes(max_m, H, E, experts, top_k);
  void* ws = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
  QuantWeight* dw = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dw, sizeof(QuantWeight) * experts * 3));
  for (int mix = 0; mix < 4; ++mix) {  // bf16, int8, int4, mixed (expert e: e % 3)
    std::vector<std::unique_ptr<Weight>> w1, w3, w2;
    std::vector<QuantWeight> q(experts * 3);
    std::vector<size_t> expert_bytes(experts);
    for (int e = 0; e < experts; ++e) {
      const QuantFormat f = mix < 3 ? kFormats[mix] : kFormats[e % 3];
      w1.push_back(std::make_unique<Weight>(f, E, H, rng, scratch));
      w3.push_back(std::make_unique<Weight>(f, E, H, rng, scratch));
      w2.push_back(std::make_unique<Weight>(f, H, E, rng, scratch));
      q[e] = w1.back()->w;
      q[experts + e] = w3.back()->w;
      q[2 * experts + e] = w2.back()->w;
      expert_bytes[e] = w1.back()->bytes + w3.back()->bytes + w2.back()->bytes;
    }
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(dw, q.data(), sizeof(QuantWeight) * q.size(), cudaMemcpyHostToDevice));
    for (int m : {1, 8, 32, 128}) {
      std::vector<uint16_t> hid;
      std::vector<float> hg(static_cast<size_t>(m) * top_k, 1.f / top_k);
      std::vector<uint16_t> perm(experts);
      std::vector<bool> touched(experts, false);
      for (int t = 0; t < m; ++t) {
        for (int e = 0; e < experts; ++e) perm[e] = static_cast<uint16_t>(e);
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int j = 0; j < top_k; ++j) {
          hid.push_back(perm[j]);
          touched[perm[j]] = true;
        }
      }
      size_t bytes = 0;
      int active = 0;
      for (int e = 0; e < experts; ++e)
        if (touched[e]) bytes += expert_bytes[e], ++active;
      GROVE_BENCH_CUDA_CHECK(cudaMemcpy(ids, hid.data(), hid.size() * 2, cudaMemcpyHostToDevice));
      GROVE_BENCH_CUDA_CHECK(cudaMemcpy(gates, hg.data(), hg.size() * 4, cudaMemcpyHostToDevice));
      grove::kernels::MoeDecodeArgs a;
      a.x = x;
      a.ids = ids;
      a.gates = gates;
      a.w1 = dw;
      a.w3 = dw + experts;
      a.w2 = dw + 2 * experts;
      a.out = out;
      a.mode = Accumulate::kAdd;
      a.m = m;
      a.hidden = H;
      a.expert_hidden = E;
      a.experts = experts;
      a.top_k = top_k;
      a.workspace = ws;
      a.workspace_bytes = ws_bytes;
      using grove::kernels::detail::MoeDecodePath;
      auto time_path = [&](MoeDecodePath path) {
        return MedianUs([&] { STATUS_CHECK(grove::kernels::detail::MoeDecodeForwardOnPath(a, path, nullptr)); });
      };
      const double us = time_path(MoeDecodePath::kAuto);
      const double cc = time_path(MoeDecodePath::kCudaCore), tc = time_path(MoeDecodePath::kTensorCore);
      const double gbs = bytes / us / 1e3;
      std::printf("%-6s %4d %8d | %7.1f | %5.0f (%3.0f%%) | %7.1f | %7.1f\n", mix < 3 ? Name(kFormats[mix]) : "mixed", m,
                  active, us, gbs, 100.0 * gbs / read_gbs, cc, tc);
    }
  }
  cudaFree(scratch);
  cudaFree(x);
  cudaFree(out);
  cudaFree(gates);
  cudaFree(ids);
  cudaFree(ws);
  cudaFree(dw);
}

// (d) Re-quantizing the model on receipt: one gpu-ref MoE layer's weights
// (qkv, wo, 64 + 2 experts' w1/w3/w2) from fp32 on the device, per format,
// then scaled to the whole model (15 such layers + the dense layer and the
// lm head counted by their sizes).
void QuantizeTable(double read_gbs) {
  const int H = 1024, E = 512;
  std::vector<std::pair<int, int>> layer = {{1536, H}, {H, 1024}};
  for (int e = 0; e < 66; ++e) {
    layer.push_back({E, H});
    layer.push_back({E, H});
    layer.push_back({H, E});
  }
  size_t layer_params = 0;
  for (auto [n, k] : layer) layer_params += static_cast<size_t>(n) * k;
  const size_t model_params = 15 * layer_params + (1536 + 1024) * size_t{H} + 3 * size_t{2816} * H + size_t{32768} * H;
  // fp32 sources for the whole layer (one buffer per weight, as received),
  // and destinations sized for the largest format.
  std::vector<float*> src;
  for (auto [n, k] : layer) {
    float* p = nullptr;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(n) * k * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemset(p, 0x3c, static_cast<size_t>(n) * k * 4));
    src.push_back(p);
  }
  std::vector<void*> data;
  std::vector<float*> scales;
  for (auto [n, k] : layer) {
    void* d = nullptr;
    float* sc = nullptr;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d, grove::kernels::QuantDataBytes(QuantFormat::kBF16, n, k)));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&sc, grove::kernels::QuantScaleCount(QuantFormat::kInt4, n, k) * 4));
    data.push_back(d);
    scales.push_back(sc);
  }
  std::printf("\n(d) QuantizeWeight: one MoE layer (%.1f M params, %zu calls) from fp32; whole model %.0f M params\n",
              layer_params / 1e6, layer.size(), model_params / 1e6);
  for (QuantFormat f : kFormats) {
    const double us = MedianUs([&] {
      for (size_t i = 0; i < layer.size(); ++i)
        STATUS_CHECK(grove::kernels::QuantizeWeight(src[i], layer[i].first, layer[i].second, f, data[i], scales[i],
                                                    nullptr));
    });
    const double gbs = layer_params * 4.0 / us / 1e3;  // fp32 bytes read once
    std::printf("%-5s layer %8.1f us (fp32 read %5.0f GB/s, %3.0f%% of ceiling); whole model ~%6.1f ms\n", Name(f), us,
                gbs, 100.0 * gbs / read_gbs, us * model_params / layer_params / 1e3);
  }
  for (auto* p : src) cudaFree(p);
  for (auto* p : data) cudaFree(p);
  for (auto* p : scales) cudaFree(p);
}

}  // namespace

int main(int argc, char** argv) {
  bool gemv_variants = false, launch_chain = false, grid_barrier = false, dataflow_step = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      g_reps = 5;
    } else if (std::strcmp(argv[i], "--gemv_variants") == 0) {
      gemv_variants = true;
    } else if (std::strcmp(argv[i], "--launch_chain") == 0) {
      launch_chain = true;
    } else if (std::strcmp(argv[i], "--grid_barrier") == 0) {
      grid_barrier = true;
    } else if (std::strcmp(argv[i], "--dataflow_step") == 0) {
      dataflow_step = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--gemv_variants] [--launch_chain] [--grid_barrier] [--dataflow_step]\n", argv[0]);
      return 2;
    }
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "quant_linear_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  GROVE_BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB; %d repetitions, median, L2 flushed before each\n\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, g_reps);
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&g_flush, kFlushBytes));
  std::mt19937_64 rng(1);
  const double read_gbs = Ceilings();
  if (dataflow_step) {
    grove::bench::DataflowStepTable(read_gbs, g_reps);
  } else if (grid_barrier) {
    grove::bench::GridBarrierTable(2000, g_reps);
  } else if (launch_chain) {
    grove::bench::LaunchChainTable(150, g_reps);
  } else if (gemv_variants) {
    GemvVariantsTable(read_gbs, rng);
  } else {
    LinearTable(read_gbs, rng);
    MoeTable(read_gbs, rng);
    QuantizeTable(read_gbs);
  }
  cudaFree(g_flush);
  return 0;
}
