// grove's kernels on the GPU. First the memory-bound ones (RMSNorm, SwiGLU,
// AdamW) in GB/s against the device copy rate; then the grouped expert GEMM:
// TFLOP/s of grove's implementations against cuBLAS on
// a dense GEMM of the same total work, a loop of per-expert cuBLAS calls and
// cuBLAS's grouped-batched GEMM, at the GPU reference model's training
// shapes (64 experts, top-6, hidden 1024, expert hidden 512). Also measures
// the two ceilings (device copy bandwidth, a large cuBLAS bf16 GEMM) and
// prints each implementation's agreement with the cuBLAS loop.
//
// Then causal flash attention forward (the mma.sync and, on sm_90 at head
// dim 128, the wgmma kernel, same run) and backward in TFLOP/s at 16k tokens
// per batch and at gpu-ref's step shape (FLOPs counted as in
// FlashAttention's benchmarks: 4 * B * L^2 * H * D for the forward, halved
// for the causal mask; the backward 2.5x).
//
// The training step's other kernels (embedding, RoPE, MoE permutation and
// combine, router backward, log-prob head, GRPO loss) at the GPU reference
// model's training shape (16384 tokens) in GB/s of the bytes each must move
// once, against the device copy rate.
//
// Usage: kernel_bench [--quick]   (prints a table; no assertions)
//        kernel_bench --attention (only the attention table)
//        kernel_bench --paged     (paged decode attention, split vs unsplit)
//        kernel_bench --step      (copy ceiling and the step-kernel table)
//        kernel_bench --memory    (the memory-bound kernels: casts, norms, AdamW fp32 / bf16 moments)
//        kernel_bench --norm      (the backward's RMSNorm + residual work:
//                                  the old five-launch path against the fused kernel)
//        kernel_bench --dw        (the experts' weight gradients: GroupedWeightGrad
//                                  against cuBLAS, gpu-ref's per-layer shapes)
//        kernel_bench --dx        (the backward's expert dX GEMMs at gpu-ref's step
//                                  shape: the weights' transposed packed copy read
//                                  K-major against the parameter layout read
//                                  MN-major in place; then the w2 one with the
//                                  SwiGLU backward after it or fused into its
//                                  epilogue)
//        kernel_bench --dx-swiglu (only that last table)
//        kernel_bench --lm-head   (the LM head's chunk: cuBLAS fp32 logits and the
//                                  log-prob kernels against the GEMM with the
//                                  block-statistics epilogue)
//        kernel_bench --grouped-step (the step's four grouped expert GEMMs at
//                                  gpu-ref's 32768-token shape, kAuto against
//                                  cuBLAS dense of the same work)
//        kernel_bench --profile   (one launch of each wgmma variant and cuBLAS
//                                  dense at T=16384, bf16 out: for ncu)
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <numeric>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/attention_internal.h"
#include "kernels/embedding.h"
#include "kernels/grpo_loss.h"
#include "kernels/logprob_head.h"
#include "kernels/moe_permute.h"
#include "kernels/paged_kv.h"
#include "kernels/paged_kv_internal.h"
#include "kernels/rope.h"
#include "kernels/grouped_gemm.h"
#include "kernels/grouped_weight_grad.h"
#include "kernels/rmsnorm.h"
#include "kernels/router.h"
#include "kernels/swiglu.h"
#include "model/gpu_transformer_kernels.h"
#include "bench/support/bench_util.h"

namespace {

using grove::kernels::GemmOutType;
using grove::kernels::GroupedGemm;
using grove::kernels::GroupedGemmArgs;
using grove::kernels::GemmWeightLayout;
using grove::kernels::GroupedGemmImpl;

#define CUBLAS_CHECK(x)                                                            \
  do {                                                                             \
    cublasStatus_t s_ = (x);                                                       \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                             \
      std::fprintf(stderr, "%s:%d %s: cublas status %d\n", __FILE__, __LINE__, #x, \
                   static_cast<int>(s_));                                          \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

// Median time of `reps` runs of fn (each bracketed by events), after warm-up.
double MedianMs(const std::function<void()>& fn, int reps, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<cudaEvent_t> ev(reps + 1);
  for (auto& e : ev) GROVE_BENCH_CUDA_CHECK(cudaEventCreate(&e));
  GROVE_BENCH_CUDA_CHECK(cudaEventRecord(ev[0]));
  for (int i = 0; i < reps; ++i) {
    fn();
    GROVE_BENCH_CUDA_CHECK(cudaEventRecord(ev[i + 1]));
  }
  GROVE_BENCH_CUDA_CHECK(cudaEventSynchronize(ev[reps]));
  GROVE_BENCH_CUDA_CHECK(cudaGetLastError());
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) GROVE_BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms[i], ev[i], ev[i + 1]));
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2];
}

__nv_bfloat16* RandomDeviceBf16(size_t count, std::mt19937_64& rng) {
  std::vector<__nv_bfloat16> h(count);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  for (auto& x : h) x = __float2bfloat16(dist(rng));
  __nv_bfloat16* d = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d, count * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d, h.data(), count * 2, cudaMemcpyHostToDevice));
  return d;
}

// Row-major C[m, n] = A[m, k] * W[n, k]^T through column-major cuBLAS:
// C^T (n x m) = W (as k x n, transposed) * A^T (k x m).
void CublasLinear(cublasHandle_t h, const __nv_bfloat16* a, const __nv_bfloat16* w, void* c,
                  int m, int n, int k, GemmOutType out) {
  const float alpha = 1.f, beta = 0.f;
  CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, a,
                            CUDA_R_16BF, k, &beta, c,
                            out == GemmOutType::kF32 ? CUDA_R_32F : CUDA_R_16BF, n,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

std::vector<int> Routing(int rows, int experts, bool skewed, std::mt19937_64& rng) {
  std::vector<int> counts(experts, rows / experts);
  for (int e = 0; e < rows % experts; ++e) ++counts[e];
  if (!skewed) return counts;
  // Log-normal expert popularity (sigma 0.5: the busiest experts get ~2-3x
  // the mean, as in a router mid-training), rows assigned by largest remainder.
  std::lognormal_distribution<double> pop(0.0, 0.5);
  std::vector<double> p(experts);
  double sum = 0;
  for (auto& x : p) sum += (x = pop(rng));
  int given = 0;
  for (int e = 0; e < experts; ++e) given += (counts[e] = static_cast<int>(rows * p[e] / sum));
  for (int e = 0; given < rows; e = (e + 1) % experts, ++given) ++counts[e];
  return counts;
}

// A routing's per-expert row counts, their prefix offsets, and the offsets
// on the device (the caller frees d_offsets).
struct ExpertRouting {
  std::vector<int> counts;
  std::vector<int32_t> offsets;
  int32_t* d_offsets = nullptr;
};
ExpertRouting RouteToDevice(int rows, int experts, bool skewed, std::mt19937_64& rng) {
  ExpertRouting r;
  r.counts = Routing(rows, experts, skewed, rng);
  r.offsets.assign(experts + 1, 0);
  for (int e = 0; e < experts; ++e) r.offsets[e + 1] = r.offsets[e] + r.counts[e];
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&r.d_offsets, r.offsets.size() * 4));
  GROVE_BENCH_CUDA_CHECK(
      cudaMemcpy(r.d_offsets, r.offsets.data(), r.offsets.size() * 4, cudaMemcpyHostToDevice));
  return r;
}

double MaxRelDiff(const void* x, const void* y, size_t count, GemmOutType out) {
  std::vector<float> hx(count), hy(count);
  if (out == GemmOutType::kF32) {
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(hx.data(), x, count * 4, cudaMemcpyDeviceToHost));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(hy.data(), y, count * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<__nv_bfloat16> bx(count), by(count);
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(bx.data(), x, count * 2, cudaMemcpyDeviceToHost));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(by.data(), y, count * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < count; ++i) hx[i] = __bfloat162float(bx[i]), hy[i] = __bfloat162float(by[i]);
  }
  double num = 0, den = 0;
  for (size_t i = 0; i < count; ++i) {
    if (!std::isfinite(hx[i])) return INFINITY;
    num += (hx[i] - hy[i]) * double(hx[i] - hy[i]);
    den += double(hy[i]) * hy[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Device-to-device copy rate of 2 GiB (read + write), printed.
double CopyCeilingGbs() {
  const size_t bytes = size_t{1} << 31;
  void *src, *dst;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&src, bytes));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dst, bytes));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(src, 1, bytes));
  const double ms =
      MedianMs([&] { GROVE_BENCH_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }, 10);
  const double copy_gbs = 2.0 * bytes / ms / 1e6;
  std::printf("ceiling: device copy %.0f GB/s (read + write)\n", copy_gbs);
  cudaFree(src);
  cudaFree(dst);
  return copy_gbs;
}

double Ceilings(cublasHandle_t h, std::mt19937_64& rng) {
  const double copy_gbs = CopyCeilingGbs();
  double ms;
  const int s = 8192;
  __nv_bfloat16* a = RandomDeviceBf16(size_t(s) * s, rng);
  __nv_bfloat16* b = RandomDeviceBf16(size_t(s) * s, rng);
  __nv_bfloat16* c;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&c, size_t(s) * s * 2));
  ms = MedianMs([&] { CublasLinear(h, a, b, c, s, s, s, GemmOutType::kBF16); }, 10);
  std::printf("ceiling: cuBLAS bf16 GEMM 8192^3 %.0f TFLOP/s\n", 2.0 * s * s * double(s) / ms / 1e9);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return copy_gbs;
}

// The training backward's per-RMSNorm work at the learner's step shape
// (R=32768 tokens, H=1024), issue 8. Old path, as GpuTransformer::Backward
// ran it: dy fp32 -> bf16 (6 bytes/element), RmsNormBackward (6), saxpy of
// dweight into the gradient (~0), dx added into the fp32 residual gradient
// (10), the residual cast to bf16 for the next block (6): 28 bytes/element.
// Fused: RmsNormBackwardResidual reads dy fp32, x bf16, dres fp32 and
// writes dres fp32 and bf16: 16. GB/s on each path's own bytes.
void NormBackwardResidual(std::mt19937_64& rng, int reps, double copy_gbs) {
  const int tokens = 32768, hidden = 1024;
  const size_t n = size_t(tokens) * hidden;
  auto report = [&](const char* name, double ms, double bytes) {
    std::printf("%-44s %9.1f %9.0f %8.1f\n", name, ms * 1e3, bytes / ms / 1e6,
                100.0 * bytes / ms / 1e6 / copy_gbs);
  };
  std::printf("\n%-44s %9s %9s %8s\n", "RMSNorm bwd + residual [32768,1024]", "us", "GB/s", "%copy");
  __nv_bfloat16* x = RandomDeviceBf16(n, rng);
  std::vector<float> h(n);
  std::uniform_real_distribution<float> unit(-1.f, 1.f);
  for (float& v : h) v = unit(rng);
  float *dy, *dres, *w, *rstd, *dnorm_w, *grad_w;
  __nv_bfloat16 *dy_b, *dres_b;
  void* ws;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dy, n * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dres, n * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dy_b, n * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dres_b, n * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&w, hidden * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dnorm_w, hidden * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&grad_w, hidden * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&rstd, tokens * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ws, grove::kernels::RmsNormBackwardWorkspaceBytes(tokens, hidden)));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(dy, h.data(), n * 4, cudaMemcpyHostToDevice));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(dres, h.data(), n * 4, cudaMemcpyHostToDevice));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(grad_w, 0, hidden * 4));
  std::vector<float> hw(hidden, 1.f);
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(w, hw.data(), hidden * 4, cudaMemcpyHostToDevice));
  // rstd from the forward, so the values are a real norm's.
  GROVE_BENCH_CHECK_OK(grove::kernels::RmsNormForward(x, w, dres_b, rstd, tokens, hidden, 1e-6f, nullptr));
  cublasHandle_t cb;
  CUBLAS_CHECK(cublasCreate(&cb));
  const float one = 1.f;
  const double old_ms = MedianMs([&] {
    grove::model::gpu::CastToBf16(dy, dy_b, int64_t(n), nullptr);
    (void)grove::kernels::RmsNormBackward(dy_b, x, w, rstd, dres_b, dnorm_w, ws, tokens, hidden, nullptr);
    CUBLAS_CHECK(cublasSaxpy(cb, hidden, &one, dnorm_w, 1, grad_w, 1));
    grove::model::gpu::AddBf16Into(dres_b, dres, int64_t(n), nullptr);
    grove::model::gpu::CastToBf16(dres, dres_b, int64_t(n), nullptr);
  }, reps);
  report("old: cast, RmsNormBackward, saxpy, add, cast", old_ms, n * 28.0);
  grove::kernels::RmsNormBackwardResidualArgs a;
  a.dy = dy; a.x = x; a.weight = w; a.rstd = rstd; a.dres = dres; a.dres_bf16 = dres_b;
  a.grad_w = grad_w; a.workspace = ws; a.tokens = tokens; a.hidden = hidden;
  const double fused_ms = MedianMs([&] { (void)grove::kernels::RmsNormBackwardResidual(a, nullptr); }, reps);
  report("fused: RmsNormBackwardResidual", fused_ms, n * 16.0);
  std::printf("fused / old time: %.3f (%.1f us saved per norm)\n", fused_ms / old_ms,
              (old_ms - fused_ms) * 1e3);
  cublasDestroy(cb);
  for (void* p : {static_cast<void*>(x), static_cast<void*>(dy), static_cast<void*>(dres),
                  static_cast<void*>(dy_b), static_cast<void*>(dres_b), static_cast<void*>(w),
                  static_cast<void*>(dnorm_w), static_cast<void*>(grad_w), static_cast<void*>(rstd), ws})
    GROVE_BENCH_CUDA_CHECK(cudaFree(p));
}

// The memory-bound kernels: achieved bandwidth (bytes each must move once)
// against the device copy ceiling.
void MemoryBoundKernels(std::mt19937_64& rng, int reps, double copy_gbs) {
  std::printf("\n%-44s %9s %9s %8s\n", "memory-bound kernel", "ms", "GB/s", "%copy");
  auto report = [&](const char* name, double ms, double bytes) {
    std::printf("%-44s %9.4f %9.0f %8.1f\n", name, ms, bytes / ms / 1e6,
                100.0 * bytes / ms / 1e6 / copy_gbs);
  };
  {
    const int tokens = 16384, hidden = 1024;
    const size_t n = size_t(tokens) * hidden;
    __nv_bfloat16* x = RandomDeviceBf16(n, rng);
    __nv_bfloat16* dy = RandomDeviceBf16(n, rng);
    __nv_bfloat16 *y, *dx;
    float *w, *rstd, *dw;
    void* ws;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&y, n * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dx, n * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&w, hidden * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&rstd, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dw, hidden * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ws, grove::kernels::RmsNormBackwardWorkspaceBytes(tokens, hidden)));
    std::vector<float> hw(hidden, 1.f);
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(w, hw.data(), hidden * 4, cudaMemcpyHostToDevice));
    double ms = MedianMs([&] { (void)grove::kernels::RmsNormForward(x, w, y, rstd, tokens, hidden, 1e-6f, nullptr); }, reps);
    report("RMSNorm fwd [16384,1024] bf16", ms, n * 4.0);
    ms = MedianMs([&] { (void)grove::kernels::RmsNormBackward(dy, x, w, rstd, dx, dw, ws, tokens, hidden, nullptr); }, reps);
    report("RMSNorm bwd [16384,1024] bf16", ms, n * 6.0);
    cudaFree(x); cudaFree(dy); cudaFree(y); cudaFree(dx); cudaFree(w); cudaFree(rstd);
    cudaFree(dw); cudaFree(ws);
    NormBackwardResidual(rng, reps, copy_gbs);
    std::printf("\n");
  }
  {
    const size_t n = size_t(16384) * 6 * 512;
    __nv_bfloat16* g = RandomDeviceBf16(n, rng);
    __nv_bfloat16* u = RandomDeviceBf16(n, rng);
    __nv_bfloat16 *h, *dg, *du;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&h, n * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dg, n * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&du, n * 2));
    double ms = MedianMs([&] { (void)grove::kernels::SwiGluForward(g, u, h, n, nullptr); }, reps);
    report("SwiGLU fwd [98304,512] bf16", ms, n * 6.0);
    ms = MedianMs([&] { (void)grove::kernels::SwiGluBackward(h, g, u, dg, du, n, nullptr); }, reps);
    report("SwiGLU bwd [98304,512] bf16", ms, n * 10.0);
    cudaFree(g); cudaFree(u); cudaFree(h); cudaFree(dg); cudaFree(du);
  }
  {
    const int tokens = 16384, experts = 64, top_k = 6;
    std::vector<float> h(size_t(tokens) * experts);
    std::normal_distribution<float> nd(0.f, 2.f);
    for (float& x : h) x = nd(rng);
    float *logits, *scores, *gates;
    uint16_t* ids;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&logits, h.size() * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&scores, h.size() * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&gates, size_t(tokens) * top_k * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ids, size_t(tokens) * top_k * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(logits, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    grove::kernels::RouterArgs ra;
    ra.logits = logits; ra.scores = scores; ra.gates = gates; ra.ids = ids;
    ra.tokens = tokens; ra.experts = experts; ra.top_k = top_k; ra.sigmoid = true;
    ra.norm_topk = true;
    double ms = MedianMs([&] { (void)grove::kernels::RouterTopK(ra, nullptr); }, reps);
    report("router sigmoid top-6 of 64, 16384 tokens", ms,
           h.size() * 8.0 + tokens * top_k * 6.0);
    cudaFree(logits); cudaFree(scores); cudaFree(gates); cudaFree(ids);
  }
  {
    const size_t n = size_t{128} << 20;
    float *p, *g, *m, *v;
    __nv_bfloat16* pb;
    for (float** b : {&p, &g, &m, &v}) {
      GROVE_BENCH_CUDA_CHECK(cudaMalloc(b, n * 4));
      GROVE_BENCH_CUDA_CHECK(cudaMemset(*b, 0, n * 4));
    }
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&pb, n * 2));
    grove::kernels::AdamWHyper hyper;
    double ms = MedianMs([&] { (void)grove::kernels::AdamWStep(p, g, m, v, pb, n, hyper, nullptr); }, reps);
    report("AdamW 128M params (+bf16 copy)", ms, n * 30.0);
    // bf16 moments (the first n * 2 bytes of m and v reinterpreted; zeros either way).
    auto* mb = reinterpret_cast<__nv_bfloat16*>(m);
    auto* vb = reinterpret_cast<__nv_bfloat16*>(v);
    ms = MedianMs([&] { (void)grove::kernels::AdamWStep(p, g, mb, vb, pb, n, 0, hyper, nullptr); }, reps);
    report("AdamW 128M params, bf16 moments (+bf16 copy)", ms, n * 22.0);
    for (float* b : {p, g, m, v}) cudaFree(b);
    cudaFree(pb);
  }
}

// The step kernels of issue 8 at 16384 tokens of the GPU reference model
// (hidden 1024, 8 + 2 heads x 128, 64 experts top-6, vocab 32768). Bytes are
// the minimum each kernel must move (every input read once, every output
// written once); index work (sorts, scans) is not counted as bytes.
void StepKernels(std::mt19937_64& rng, int reps, double copy_gbs) {
  namespace gk = grove::kernels;
  std::printf("\n%-52s %9s %9s %8s\n", "step kernel (16384 tokens)", "ms", "GB/s", "%copy");
  auto report = [&](const char* name, double ms, double bytes) {
    std::printf("%-52s %9.4f %9.0f %8.1f\n", name, ms, bytes / ms / 1e6, 100.0 * bytes / ms / 1e6 / copy_gbs);
    std::fflush(stdout);
  };
  auto check = [](const grove::Status& s) {
    if (!s.ok()) {
      std::fprintf(stderr, "step kernel failed: %s\n", s.ToString().c_str());
      std::exit(1);
    }
  };
  const int tokens = 16384, hidden = 1024, vocab = 32768, experts = 64, top_k = 6;
  const int rows = tokens * top_k;
  const size_t th = size_t(tokens) * hidden, rh = size_t(rows) * hidden;
  // Embedding.
  {
    std::vector<int32_t> ids(tokens);
    std::uniform_int_distribution<int> pick(0, vocab - 1);
    std::vector<char> seen(vocab, 0);
    int unique = 0;
    for (int32_t& id : ids) {
      id = pick(rng);
      unique += !seen[id];
      seen[id] = 1;
    }
    int32_t* d_ids;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_ids, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_ids, ids.data(), tokens * 4, cudaMemcpyHostToDevice));
    __nv_bfloat16* table = RandomDeviceBf16(size_t(vocab) * hidden, rng);
    __nv_bfloat16* dout = RandomDeviceBf16(th, rng);
    __nv_bfloat16* out;
    float* dtable;
    void* ws;
    const size_t ws_bytes = gk::EmbeddingBackwardWorkspaceBytes(tokens, vocab);
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&out, th * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dtable, size_t(vocab) * hidden * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemset(dtable, 0, size_t(vocab) * hidden * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
    double ms = MedianMs([&] { check(gk::EmbeddingForward(d_ids, table, out, tokens, vocab, hidden, nullptr)); }, reps);
    report("embedding fwd [16384 of 32768, 1024] bf16", ms, th * 4.0);
    ms = MedianMs([&] {
      check(gk::EmbeddingBackward(d_ids, dout, dtable, ws, ws_bytes, tokens, vocab, hidden, nullptr));
    }, reps);
    report("embedding bwd (sort + fp32 += rows)", ms, th * 2.0 + double(unique) * hidden * 8.0);
    cudaFree(d_ids); cudaFree(table); cudaFree(dout); cudaFree(out); cudaFree(dtable); cudaFree(ws);
  }
  // RoPE on q and k.
  {
    std::vector<int32_t> pos(tokens);
    for (int t = 0; t < tokens; ++t) pos[t] = t % 2048;  // 8 sequences of 2048
    int32_t* d_pos;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_pos, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_pos, pos.data(), tokens * 4, cudaMemcpyHostToDevice));
    __nv_bfloat16* q = RandomDeviceBf16(size_t(tokens) * 8 * 128, rng);
    __nv_bfloat16* k = RandomDeviceBf16(size_t(tokens) * 2 * 128, rng);
    double ms = MedianMs([&] { check(gk::RopeForward(q, d_pos, tokens, 8, 128, 10000.0, nullptr)); }, reps);
    report("rope fwd q [16384, 8, 128] in place", ms, tokens * 8 * 128 * 4.0);
    ms = MedianMs([&] { check(gk::RopeForward(k, d_pos, tokens, 2, 128, 10000.0, nullptr)); }, reps);
    report("rope fwd k [16384, 2, 128] in place", ms, tokens * 2 * 128 * 4.0);
    ms = MedianMs([&] { check(gk::RopeBackward(q, d_pos, tokens, 8, 128, 10000.0, nullptr)); }, reps);
    report("rope bwd dq [16384, 8, 128] in place", ms, tokens * 8 * 128 * 4.0);
    cudaFree(d_pos); cudaFree(q); cudaFree(k);
  }
  // MoE: route index, permute, combine and their backwards; router backward.
  {
    std::vector<uint16_t> ids(rows);
    std::vector<int> perm(experts);
    for (int e = 0; e < experts; ++e) perm[e] = e;
    for (int t = 0; t < tokens; ++t) {
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < top_k; ++j) ids[size_t(t) * top_k + j] = uint16_t(perm[j]);
    }
    uint16_t* d_ids;
    int32_t *offsets, *row_of_slot, *slot_of_row, *load;
    void* ws;
    const size_t ws_bytes = gk::MoeRouteIndexWorkspaceBytes(tokens, top_k, experts);
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_ids, rows * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_ids, ids.data(), rows * 2, cudaMemcpyHostToDevice));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&offsets, (experts + 1) * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&row_of_slot, rows * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&slot_of_row, rows * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&load, experts * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
    double ms = MedianMs([&] {
      check(gk::MoeRouteIndex(d_ids, tokens, top_k, experts, ws, ws_bytes, offsets, row_of_slot, slot_of_row, load,
                              nullptr));
    }, reps);
    report("MoE route index (98304 slots, 64 experts)", ms, rows * 10.0);
    __nv_bfloat16* x = RandomDeviceBf16(th, rng);
    __nv_bfloat16* c = RandomDeviceBf16(rh, rng);
    __nv_bfloat16* dy = RandomDeviceBf16(th, rng);
    __nv_bfloat16 *a, *y, *dc;
    float *gates, *dgates;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&a, rh * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&y, th * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dc, rh * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&gates, rows * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dgates, rows * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemset(gates, 0, rows * 4));
    ms = MedianMs([&] { check(gk::MoePermute(x, row_of_slot, slot_of_row, a, rows, top_k, hidden, nullptr)); }, reps);
    report("MoE permute x -> a [98304, 1024] bf16", ms, rh * 4.0);
    ms = MedianMs([&] { check(gk::MoeCombine(c, gates, row_of_slot, y, false, tokens, top_k, hidden, nullptr)); },
                  reps);
    report("MoE combine c -> y (gated sum of 6)", ms, rh * 2.0 + th * 2.0);
    ms = MedianMs([&] { check(gk::MoeCombine(c, gates, row_of_slot, y, true, tokens, top_k, hidden, nullptr)); },
                  reps);
    report("MoE combine, accumulate into y", ms, rh * 2.0 + th * 4.0);
    ms = MedianMs([&] {
      check(gk::MoeCombineBackward(dy, c, gates, row_of_slot, dc, dgates, tokens, top_k, hidden, nullptr));
    }, reps);
    report("MoE combine bwd (dc, dgates)", ms, th * 2.0 + rh * 4.0);
    ms = MedianMs([&] { check(gk::MoePermuteBackward(c, row_of_slot, y, false, tokens, top_k, hidden, nullptr)); },
                  reps);
    report("MoE permute bwd da -> dx", ms, rh * 2.0 + th * 2.0);
    cudaFree(x); cudaFree(c); cudaFree(dy); cudaFree(a); cudaFree(y); cudaFree(dc); cudaFree(gates);

    std::vector<float> hs(size_t(tokens) * experts);
    std::uniform_real_distribution<float> u(0.05f, 0.95f);
    for (float& v : hs) v = u(rng);
    float *scores, *dlogits;
    int32_t* seq;
    std::vector<int32_t> hseq;
    for (int t = 0; t <= tokens; t += 2048) hseq.push_back(t);
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&scores, hs.size() * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dlogits, hs.size() * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&seq, hseq.size() * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(scores, hs.data(), hs.size() * 4, cudaMemcpyHostToDevice));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(seq, hseq.data(), hseq.size() * 4, cudaMemcpyHostToDevice));
    void* rws;
    const int seqs = int(hseq.size()) - 1;
    const size_t rws_bytes = gk::RouterBackwardWorkspaceBytes(seqs, tokens, experts);
    float* balance_loss;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&balance_loss, 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&rws, rws_bytes));
    gk::RouterBackwardArgs rb;
    rb.scores = scores; rb.ids = d_ids; rb.dgates = dgates; rb.dlogits = dlogits;
    rb.tokens = tokens; rb.experts = experts; rb.top_k = top_k; rb.sigmoid = true; rb.norm_topk = true;
    rb.balance_alpha = 1e-4f; rb.seq_offsets = seq; rb.sequences = seqs; rb.workspace = rws;
    rb.workspace_bytes = rws_bytes;
    rb.balance_loss = balance_loss;
    ms = MedianMs([&] { check(gk::RouterBackward(rb, nullptr)); }, reps);
    report("router bwd sigmoid top-6/64 + balance loss", ms, hs.size() * 8.0 + rows * 6.0);
    cudaFree(scores); cudaFree(dlogits); cudaFree(seq); cudaFree(rws); cudaFree(dgates); cudaFree(balance_loss);
    cudaFree(d_ids); cudaFree(offsets); cudaFree(row_of_slot); cudaFree(slot_of_row); cudaFree(load); cudaFree(ws);
  }
  // Log-prob head over [16384, 32768] logits, fp32 and bf16.
  {
    const size_t n = size_t(tokens) * vocab;
    std::vector<int32_t> targets(tokens);
    std::uniform_int_distribution<int> pick(0, vocab - 1);
    for (int32_t& t : targets) t = pick(rng);
    int32_t* d_targets;
    float *logp, *lse, *dlogp, *logits32;
    __nv_bfloat16* dlogits;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_targets, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_targets, targets.data(), tokens * 4, cudaMemcpyHostToDevice));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&logp, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&lse, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dlogp, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemset(dlogp, 0, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dlogits, n * 2));
    __nv_bfloat16* logits16 = RandomDeviceBf16(n, rng);
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&logits32, n * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemset(logits32, 0, n * 4));
    double ms = MedianMs([&] { check(gk::TokenLogProbForward(logits32, d_targets, logp, lse, tokens, vocab, nullptr)); },
                         reps);
    report("log-prob fwd fp32 logits [16384, 32768]", ms, n * 4.0);
    ms = MedianMs([&] {
      check(gk::TokenLogProbBackward(logits32, d_targets, lse, dlogp, dlogits, tokens, vocab, nullptr));
    }, reps);
    report("log-prob bwd fp32 logits -> bf16 dlogits", ms, n * 6.0);
    ms = MedianMs([&] { check(gk::TokenLogProbForward(logits16, d_targets, logp, lse, tokens, vocab, nullptr)); },
                  reps);
    report("log-prob fwd bf16 logits [16384, 32768]", ms, n * 2.0);
    ms = MedianMs([&] {
      check(gk::TokenLogProbBackward(logits16, d_targets, lse, dlogp, dlogits, tokens, vocab, nullptr));
    }, reps);
    report("log-prob bwd bf16 logits -> bf16 dlogits", ms, n * 4.0);
    cudaFree(d_targets); cudaFree(logp); cudaFree(lse); cudaFree(dlogp); cudaFree(dlogits); cudaFree(logits16);
    cudaFree(logits32);
  }
  // GRPO loss over 16384 completion tokens in 64 sequences.
  {
    const int seqs = 64;
    std::vector<int32_t> off(seqs + 1);
    for (int i = 0; i <= seqs; ++i) off[i] = i * (tokens / seqs);
    std::vector<float> lp(tokens), adv(seqs);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (float& v : lp) v = -std::fabs(nd(rng));
    for (float& v : adv) v = nd(rng);
    int32_t* d_off;
    float *d_lp, *d_adv, *d_dlogp;
    gk::GrpoLossStats* stats;
    void* ws;
    const size_t ws_bytes = gk::GrpoLossWorkspaceBytes(seqs);
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_off, off.size() * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_lp, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_adv, seqs * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_dlogp, tokens * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&stats, sizeof(gk::GrpoLossStats)));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_off, off.data(), off.size() * 4, cudaMemcpyHostToDevice));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_lp, lp.data(), tokens * 4, cudaMemcpyHostToDevice));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_adv, adv.data(), seqs * 4, cudaMemcpyHostToDevice));
    gk::GrpoLossConfig cfg;
    cfg.beta = 0.0;
    gk::GrpoLossArgs ga;
    ga.seq_offsets = d_off; ga.logp = d_lp; ga.old_logp = d_lp; ga.rollout_logp = d_lp; ga.advantages = d_adv;
    ga.tokens = tokens; ga.sequences = seqs; ga.dlogp = d_dlogp; ga.stats = stats;
    cfg.tis_cap = 2.0;
    double ms = MedianMs([&] { check(gk::GrpoLoss(cfg, ga, ws, ws_bytes, nullptr)); }, reps);
    report("GRPO loss 16384 tokens / 64 seqs (TIS, 4 launches)", ms, tokens * 16.0);
    cudaFree(d_off); cudaFree(d_lp); cudaFree(d_adv); cudaFree(d_dlogp); cudaFree(stats); cudaFree(ws);
  }
}

// Causal attention at batch * seqlen = 16384 tokens, and at gpu-ref's
// training step (32 x 1024 tokens, q / k / v column slices of one
// [tokens, 1536] projection output). The forward is timed with both
// kernels (mma.sync, and wgmma where the GPU is sm_90 and head_dim 128), in
// the same run; "wg/mma" is the relative L2 difference of their outputs.
// The backward reads the mma.sync forward's O and lse; it too is timed with
// both main kernels (mma.sync, and wgmma on sm_90 at head_dim 128), "wg/mma"
// after it being the relative L2 difference of dq, dk, dv together. The FlashAttention-2
// H100 figures are those of the FlashAttention-3 paper (Shah et al. 2024,
// arXiv 2407.08608, Fig. 5 forward causal head dim 128; Fig. 6 backward head
// dim 128 is the non-causal one, no causal FA2 backward figure was found).
// Relative L2 difference of two bf16 device arrays of n elements (b against a).
double RelativeL2Bf16(const __nv_bfloat16* a_dev, const __nv_bfloat16* b_dev, size_t n) {
  std::vector<__nv_bfloat16> a(n), b(n);
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(a.data(), a_dev, n * 2, cudaMemcpyDeviceToHost));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(b.data(), b_dev, n * 2, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = __bfloat162float(a[i]), y = __bfloat162float(b[i]);
    num += (x - y) * (x - y);
    den += x * x;
  }
  return std::sqrt(num / den);
}

void AttentionRow(std::mt19937_64& rng, int reps, const char* what, int heads, int kv_heads,
                  int dim, int seqlen, int batch, bool fused) {
  namespace gk = grove::kernels;
  const int tokens = batch * seqlen;
  const int64_t qw = int64_t(heads) * dim, kw = int64_t(kv_heads) * dim;
  const size_t nq = size_t(tokens) * qw, nk = size_t(tokens) * kw;
  // fused: one buffer of rows [q | k | v]; otherwise three packed tensors.
  __nv_bfloat16* qkv = RandomDeviceBf16(fused ? size_t(tokens) * (qw + 2 * kw) : nq + 2 * nk, rng);
  const __nv_bfloat16* q = qkv;
  const __nv_bfloat16* k = fused ? qkv + qw : qkv + nq;
  const __nv_bfloat16* v = fused ? qkv + qw + kw : qkv + nq + nk;
  __nv_bfloat16* d_o = RandomDeviceBf16(nq, rng);
  __nv_bfloat16 *o, *o_wg, *dqkv, *dqkv_wg;
  float *lse, *lse_wg;
  int32_t* cu;
  const size_t n_grad = fused ? size_t(tokens) * (qw + 2 * kw) : nq + 2 * nk;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&o, nq * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&o_wg, nq * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dqkv, n_grad * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dqkv_wg, n_grad * 2));
  // Both backwards' gradient buffers start equal (padding columns of the
  // fused rows are never written), so their difference covers dq, dk, dv.
  GROVE_BENCH_CUDA_CHECK(cudaMemset(dqkv, 0, n_grad * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(dqkv_wg, 0, n_grad * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&lse, size_t(tokens) * heads * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&lse_wg, size_t(tokens) * heads * 4));
  __nv_bfloat16* dq = dqkv;
  __nv_bfloat16* dk = fused ? dqkv + qw : dqkv + nq;
  __nv_bfloat16* dv = fused ? dqkv + qw + kw : dqkv + nq + nk;
  __nv_bfloat16* dq_wg = dqkv_wg + (dq - dqkv);
  __nv_bfloat16* dk_wg = dqkv_wg + (dk - dqkv);
  __nv_bfloat16* dv_wg = dqkv_wg + (dv - dqkv);
  std::vector<int32_t> hcu(batch + 1);
  for (int b = 0; b <= batch; ++b) hcu[b] = b * seqlen;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&cu, hcu.size() * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(cu, hcu.data(), hcu.size() * 4, cudaMemcpyHostToDevice));
  gk::AttentionShape shape;
  shape.cu_seqlens = cu;
  shape.batch = batch;
  shape.max_seqlen = seqlen;
  shape.total_tokens = tokens;
  shape.num_heads = heads;
  shape.num_kv_heads = kv_heads;
  shape.head_dim = dim;
  if (fused) shape.q_row_stride = shape.kv_row_stride = qw + 2 * kw;
  void* ws;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ws, gk::AttentionBackwardWorkspaceBytes(shape)));
  const bool wgmma = gk::AttentionForwardWgmmaSupported(dim);
  auto fail = [&](const grove::Status& st) {
    if (st.ok()) return;
    std::printf("%s: %s\n", what, st.ToString().c_str());
    std::exit(1);
  };
  fail(gk::AttentionForwardWith(gk::AttentionForwardImpl::kMmaSync, shape, q, k, v, o, lse, nullptr));
  if (wgmma)
    fail(gk::AttentionForwardWith(gk::AttentionForwardImpl::kWgmma, shape, q, k, v, o_wg, lse_wg, nullptr));
  fail(gk::AttentionBackwardWith(gk::AttentionBackwardImpl::kMmaSync, shape, q, k, v, o, d_o, lse,
                                 dq, dk, dv, ws, nullptr));
  if (wgmma)
    fail(gk::AttentionBackwardWith(gk::AttentionBackwardImpl::kWgmma, shape, q, k, v, o, d_o, lse,
                                   dq_wg, dk_wg, dv_wg, ws, nullptr));
  GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
  const double mma_ms = MedianMs(
      [&] {
        (void)gk::AttentionForwardWith(gk::AttentionForwardImpl::kMmaSync, shape, q, k, v, o, lse,
                                       nullptr);
      },
      reps);
  double wg_ms = 0, diff = 0;
  if (wgmma) {
    wg_ms = MedianMs(
        [&] {
          (void)gk::AttentionForwardWith(gk::AttentionForwardImpl::kWgmma, shape, q, k, v, o_wg,
                                         lse_wg, nullptr);
        },
        reps);
    diff = RelativeL2Bf16(o, o_wg, nq);
  }
  const double bwd_ms = MedianMs(
      [&] {
        (void)gk::AttentionBackwardWith(gk::AttentionBackwardImpl::kMmaSync, shape, q, k, v, o, d_o,
                                        lse, dq, dk, dv, ws, nullptr);
      },
      reps);
  double wg_bwd_ms = 0, bwd_diff = 0;
  if (wgmma) {
    wg_bwd_ms = MedianMs(
        [&] {
          (void)gk::AttentionBackwardWith(gk::AttentionBackwardImpl::kWgmma, shape, q, k, v, o,
                                          d_o, lse, dq_wg, dk_wg, dv_wg, ws, nullptr);
        },
        reps);
    bwd_diff = RelativeL2Bf16(dqkv, dqkv_wg, n_grad);
  }
  const double fwd_flop = 4.0 * batch * double(seqlen) * seqlen * heads * dim / 2;
  const int fa2_fwd = dim == 128 ? (seqlen == 512 ? 191 : seqlen == 1024 ? 260 : 298) : 0;
  const int fa2_bwd = dim == 128 ? (seqlen == 512 ? 214 : seqlen == 1024 ? 260 : 291) : 0;
  char fa2[32] = "n/a", wg[48] = "       -        -        -", wg_bwd[48] = "       -        -        -";
  if (fa2_fwd) std::snprintf(fa2, sizeof fa2, "%d|%d*", fa2_fwd, fa2_bwd);
  if (wgmma) {
    std::snprintf(wg, sizeof wg, "%8.4f %8.1f %8.1e", wg_ms, fwd_flop / wg_ms / 1e9, diff);
    std::snprintf(wg_bwd, sizeof wg_bwd, "%9.4f %8.1f %8.1e", wg_bwd_ms,
                  2.5 * fwd_flop / wg_bwd_ms / 1e9, bwd_diff);
  }
  std::printf("%-32s %6d %5d %9.4f %8.1f %s %9.4f %8.1f %s %12s\n", what, seqlen, batch, mma_ms,
              fwd_flop / mma_ms / 1e9, wg, bwd_ms, 2.5 * fwd_flop / bwd_ms / 1e9, wg_bwd, fa2);
  for (void* p : {(void*)qkv, (void*)d_o, (void*)o, (void*)o_wg, (void*)dqkv, (void*)dqkv_wg,
                  (void*)lse, (void*)lse_wg, (void*)cu, ws})
    cudaFree(p);
}

void AttentionBench(std::mt19937_64& rng, int reps) {
  struct Config { int heads, kv_heads, dim; const char* what; };
  const Config configs[] = {{16, 16, 128, "MHA 16x128 (FA paper shape)"},
                            {8, 2, 128, "GQA 8/2x128 (grove model)"},
                            {32, 32, 64, "MHA 32x64 (FA paper shape)"},
                            {4, 2, 32, "GQA 4/2x32 (CPU default model)"}};
  std::printf("\n%-32s %6s %5s %9s %8s %8s %8s %8s %9s %8s %9s %8s %8s %12s\n",
              "causal attention", "seqlen", "batch", "mma ms", "TF/s", "wgmma ms", "TF/s", "wg/mma",
              "bwd ms", "bwd TF/s", "wg bwd ms", "TF/s", "wg/mma", "FA2 H100 f|b");
  for (const Config& c : configs)
    for (int seqlen : {512, 1024, 2048})
      AttentionRow(rng, reps, c.what, c.heads, c.kv_heads, c.dim, seqlen, 16384 / seqlen, false);
  AttentionRow(rng, reps, "gpu-ref step 8/2x128, qkv rows", 8, 2, 128, 1024, 32, true);
  std::printf("(16k tokens a row but the last: gpu-ref's training step, 32 x 1024 tokens, q/k/v\n"
              "   column slices of one [tokens, 1536] buffer. * FA2 H100 SXM5 figures from the\n"
              "   FlashAttention-3 paper, Figs. 5-6: forward causal hdim 128; the backward one is\n"
              "   non-causal, the only one published there)\n");
}

struct Row {
  std::string shape, method;
  double ms, tflops, pct_dense, vs_loop, diff;
};

// The experts' weight gradients of one gpu-ref MoE layer in the backward
// (32768 tokens x top-6 over 64 experts, skewed routing; H = 1024, F = 512):
//   w2:    G_e[H, F] += dey_e^T eh_e               (one output)
//   w1/w3: G_e[F, H] += dea_e^T xe_e, deb_e^T xe_e (two outputs, shared X)
// into fp32 gradients laid out as the model's (w1, w2, w3 of an expert
// adjacent: stride 3 F H between experts). Methods: GroupedWeightGrad (one
// launch per weight kind), cuBLAS per expert as the step does it (GemmEx
// for w2, a strided batch of 2 for w1/w3, beta = 1), and cuBLAS on one
// dense GEMM of the same total work (all rows as one expert). "rel diff":
// GroupedWeightGrad (overwrite) against the cuBLAS loop (beta = 0), over
// the whole gradient buffer.
void WeightGradBench(cublasHandle_t h, std::mt19937_64& rng, int reps) {
  const int experts = 64, top_k = 6, tokens = 32768, H = 1024, F = 512;
  const int rows = tokens * top_k;
  const ExpertRouting routing = RouteToDevice(rows, experts, /*skewed=*/true, rng);
  const std::vector<int>& counts = routing.counts;
  const std::vector<int32_t>& offsets = routing.offsets;
  int32_t* d_off = routing.d_offsets;
  const int64_t stride = 3LL * F * H;
  const size_t g_elems = size_t(stride) * experts;
  float *g, *g_ref;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&g, g_elems * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&g_ref, g_elems * 4));
  const int min_count = *std::min_element(counts.begin(), counts.end());
  const int max_count = *std::max_element(counts.begin(), counts.end());
  std::printf("\nexperts' weight gradients, one layer: %d rows over %d experts (%d..%d per expert)\n",
              rows, experts, min_count, max_count);
  const char* kHeader = "%-26s %-36s %9s %8s %8s %8s %9s\n";
  const char* kRowFmt = "%-26s %-36s %9.4f %8.1f %8.1f %8.2f %9.2e\n";
  std::printf(kHeader, "shape", "method", "ms", "TFLOP/s", "%dense", "x loop", "rel diff");

  // Row-major C[M, N] (+)= A^T B, A [t, M], B [t, N], batch of `batch` with
  // A, C strides (B shared): column-major C^T = B^T A.
  auto gemm_tn = [&](const __nv_bfloat16* a, int m, const __nv_bfloat16* b, int n, int t, float* c,
                     int ldc, float beta, int batch, int64_t stride_a, int64_t stride_c) {
    const float alpha = 1.f;
    if (batch == 1) {
      CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, n, m, t, &alpha, b, CUDA_R_16BF, n, a,
                                CUDA_R_16BF, m, &beta, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
    } else {
      CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_T, n, m, t, &alpha, b,
                                              CUDA_R_16BF, n, 0, a, CUDA_R_16BF, m, stride_a,
                                              &beta, c, CUDA_R_32F, ldc, stride_c, batch,
                                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  };

  struct Kind { const char* name; int n, k, outputs; int64_t g_off, g2_off; };
  // Expert e's w1 at e * stride, w2 at + F H, w3 at + 2 F H.
  for (Kind kind : {Kind{"w2 dW [H,F]", H, F, 1, int64_t(F) * H, 0},
                    Kind{"w1+w3 dW [F,H] x2", F, H, 2, 0, 2LL * F * H}}) {
    __nv_bfloat16* dy = RandomDeviceBf16(size_t(rows) * kind.n * kind.outputs, rng);  // dY, then dY2
    __nv_bfloat16* x = RandomDeviceBf16(size_t(rows) * kind.k, rng);
    const int64_t dy2_stride = int64_t(rows) * kind.n;
    const double flops = 2.0 * rows * double(kind.n) * kind.k * kind.outputs;
    char shape[96];
    std::snprintf(shape, sizeof shape, "%s T=%d", kind.name, rows);

    auto loop = [&](float beta) {
      for (int e = 0; e < experts; ++e) {
        if (counts[e] == 0) continue;
        float* ge = g_ref + e * stride + kind.g_off;
        gemm_tn(dy + size_t(offsets[e]) * kind.n, kind.n, x + size_t(offsets[e]) * kind.k, kind.k,
                counts[e], ge, kind.k, beta, kind.outputs, dy2_stride, kind.g2_off - kind.g_off);
      }
    };
    grove::kernels::GroupedWeightGradArgs args;
    args.dy = dy;
    args.x = x;
    args.expert_offsets = d_off;
    args.total_rows = rows;
    args.num_experts = experts;
    args.n = kind.n;
    args.k = kind.k;
    args.g = g + kind.g_off;
    args.g_expert_stride = stride;
    if (kind.outputs == 2) {
      args.dy2 = dy + dy2_stride;
      args.g2 = g + kind.g2_off;
    }
    using grove::kernels::WeightGradImpl;
    auto grove_run = [&](bool accumulate, WeightGradImpl impl) {
      args.accumulate = accumulate;
      return grove::kernels::GroupedWeightGrad(args, nullptr, impl);
    };

    const double loop_ms = MedianMs([&] { loop(1.f); }, reps);
    const double dense_ms = MedianMs(
        [&] {
          gemm_tn(dy, kind.n, x, kind.k, rows, g + kind.g_off, kind.k, 1.f, kind.outputs,
                  dy2_stride, kind.g2_off - kind.g_off);
        },
        reps);
    GROVE_BENCH_CUDA_CHECK(cudaMemset(g_ref, 0, g_elems * 4));
    loop(0.f);  // the reference for the diff column (beta = 0 from zero)
    GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    std::printf(kRowFmt, shape, "cuBLAS dense same work", dense_ms, flops / dense_ms / 1e9, 100.0,
                loop_ms / dense_ms, 0.0);
    std::printf(kRowFmt, shape, "cuBLAS per-expert loop", loop_ms, flops / loop_ms / 1e9,
                100.0 * dense_ms / loop_ms, 1.0, 0.0);
    for (WeightGradImpl impl :
         {WeightGradImpl::kMmaSync, WeightGradImpl::kWgmma, WeightGradImpl::kWgmmaN256,
          WeightGradImpl::kTma, WeightGradImpl::kTmaN128,
          WeightGradImpl::kTmaPersistentRed, WeightGradImpl::kTmaPersistentN256}) {
      const std::string method =
          std::string("grove GroupedWeightGrad ") + grove::kernels::WeightGradImplName(impl);
      // Agreement first (overwrite from a poisoned buffer), then timing.
      GROVE_BENCH_CUDA_CHECK(cudaMemset(g, 0xFF, g_elems * 4));
      grove::Status s = grove_run(false, impl);
      if (!s.ok()) {
        std::printf("%s %s: %s\n", shape, method.c_str(), s.ToString().c_str());
        continue;
      }
      GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
      // Only the gradients this kind writes: zero the others in g as in g_ref.
      for (int e = 0; e < experts; ++e) {
        float* ge = g + e * stride;
        const int64_t nk = int64_t(kind.n) * kind.k;
        for (int64_t off = 0; off < stride; off += nk)
          if (off != kind.g_off && !(kind.outputs == 2 && off == kind.g2_off))
            GROVE_BENCH_CUDA_CHECK(cudaMemset(ge + off, 0, nk * 4));
      }
      const double diff = MaxRelDiff(g, g_ref, g_elems, GemmOutType::kF32);
      const double ms = MedianMs([&] { (void)grove_run(true, impl); }, reps);
      std::printf(kRowFmt, shape, method.c_str(), ms, flops / ms / 1e9, 100.0 * dense_ms / ms,
                  loop_ms / ms, diff);
    }
    std::fflush(stdout);
    cudaFree(dy);
    cudaFree(x);
  }
  cudaFree(g);
  cudaFree(g_ref);
  cudaFree(d_off);
}

// The backward's two expert dX GEMMs at the GPU reference model's step
// shape (196608 rows = 32768 tokens x top-6 over 64 experts, H = 1024,
// F = 512, bf16 out), each read two ways: K-major from a packed transposed
// copy of the weights ([E, F, H] for w2, [E, H, 2F] for w1|w3: what the
// model kept and repacked after every optimizer step), and MN-major from
// the parameter layout in place (each expert's w1, w3, w2 adjacent, 3 F H
// elements apart). Both copies hold the same values: "rel diff" is the
// MN-major kAuto result against the K-major kAuto one.
void DxBench(std::mt19937_64& rng, int reps) {
  const int E = 64, H = 1024, F = 512, rows = 32768 * 6;
  const size_t stride = size_t(3) * F * H;
  // Values in [-1, 1) from a cheap hash: 100M of them, the host's time matters.
  std::vector<__nv_bfloat16> layout(E * stride);
  const uint64_t salt = rng();
  for (size_t i = 0; i < layout.size(); ++i) {
    const uint64_t h = (i + salt) * 0x9E3779B97F4A7C15ull;
    layout[i] = __float2bfloat16(float(h >> 40) / float(1 << 23) - 1.f);
  }
  // Expert e: w1|w3 [2F, H] at e * stride, w2 [H, F] at e * stride + 2 F H.
  std::vector<__nv_bfloat16> w13t(size_t(E) * H * 2 * F), w2t(size_t(E) * F * H);
  for (int e = 0; e < E; ++e) {
    const __nv_bfloat16* w13 = layout.data() + e * stride;
    const __nv_bfloat16* w2 = w13 + size_t(2) * F * H;
    for (int i = 0; i < 2 * F; ++i)
      for (int j = 0; j < H; ++j) w13t[(size_t(e) * H + j) * 2 * F + i] = w13[size_t(i) * H + j];
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < F; ++j) w2t[(size_t(e) * F + j) * H + i] = w2[size_t(i) * F + j];
  }
  auto upload = [](const std::vector<__nv_bfloat16>& h) {
    __nv_bfloat16* d = nullptr;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d, h.size() * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    return d;
  };
  __nv_bfloat16* d_layout = upload(layout);
  __nv_bfloat16* d_w13t = upload(w13t);
  __nv_bfloat16* d_w2t = upload(w2t);
  // Both shapes have k = 1024 (H for w2, 2F for w1|w3): one A serves both.
  __nv_bfloat16* a = RandomDeviceBf16(size_t(rows) * 1024, rng);
  void *c_ref, *c;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&c_ref, size_t(rows) * 1024 * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&c, size_t(rows) * 1024 * 2));
  std::printf("%-48s %-34s %9s %8s %9s\n", "shape", "method", "ms", "TFLOP/s", "rel diff");
  for (bool skewed : {false, true}) {
    std::vector<int> counts = Routing(rows, E, skewed, rng);
    std::vector<int32_t> offsets(E + 1, 0);
    for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    int32_t* d_off;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_off, offsets.size() * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_off, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
    // One implementation on one shape: run once (into c_ref when it is the
    // reference), time, and print; `compare`: the max relative difference
    // of its output against c_ref's.
    auto time_one = [&](const char* shape, const std::string& method, GroupedGemmArgs args, GroupedGemmImpl impl,
                        bool is_ref, bool compare) {
      args.a = a;
      args.c = is_ref ? c_ref : c;
      args.expert_offsets = d_off;
      args.total_rows = rows;
      args.num_experts = E;
      args.out_type = GemmOutType::kBF16;
      const grove::Status st = GroupedGemm(args, impl, nullptr);
      if (!st.ok()) {
        std::printf("%-48s %-34s %s\n", shape, method.c_str(), st.ToString().c_str());
        return;
      }
      const double ms = MedianMs([&] { (void)GroupedGemm(args, impl, nullptr); }, reps);
      const double diff = compare ? MaxRelDiff(c, c_ref, size_t(rows) * args.n, GemmOutType::kBF16) : 0.0;
      std::printf("%-48s %-34s %9.4f %8.1f %9.2e\n", shape, method.c_str(), ms,
                  2.0 * rows * double(args.n) * args.k / ms / 1e9, diff);
      std::fflush(stdout);
    };
    const GroupedGemmImpl kImpls[] = {GroupedGemmImpl::kAuto, GroupedGemmImpl::kWgmmaPingpong,
                                      GroupedGemmImpl::kWgmmaBn256, GroupedGemmImpl::kWgmmaStaged};
    struct Shape {
      const char* name;
      int n, k;
      const __nv_bfloat16* packed;  // K-major [E, n, k]
      size_t layout_offset;         // MN-major [k, n] per expert in the layout
    };
    for (Shape sh : {Shape{"deh = dey W2", F, H, d_w2t, size_t(2) * F * H},
                     Shape{"dxe = deab [W1; W3]", H, 2 * F, d_w13t, 0}}) {
      char shape[128];
      std::snprintf(shape, sizeof shape, "%s %s [%d,%d]x[%d,%d]", skewed ? "skew" : "even",
                    sh.name, rows, sh.k, sh.k, sh.n);
      for (GemmWeightLayout layout_kind : {GemmWeightLayout::kKMajor, GemmWeightLayout::kMnMajor}) {
        const bool mn = layout_kind == GemmWeightLayout::kMnMajor;
        for (GroupedGemmImpl impl : kImpls) {
          GroupedGemmArgs args;
          args.n = sh.n;
          args.k = sh.k;
          args.w_layout = layout_kind;
          args.w = mn ? d_layout + sh.layout_offset : sh.packed;
          args.w_expert_rows = mn ? int(stride / sh.n) : 0;
          const bool auto_impl = impl == GroupedGemmImpl::kAuto;
          time_one(shape, std::string(mn ? "MN-major in place " : "K-major packed ") + GroupedGemmImplName(impl),
                   args, impl, auto_impl && !mn, auto_impl && mn);
        }
      }
    }
    // The forward's two expert GEMMs as the model runs them: K-major, the
    // weights read in place in the layout (w1|w3 [2F, H] 3F rows apart, w2
    // [H, F] 3H rows apart), per implementation against kAuto's result.
    struct Forward {
      const char* name;
      int n, k;
      size_t layout_offset;
    };
    for (Forward fw : {Forward{"eab = xe [W1; W3]^T", 2 * F, H, 0}, Forward{"ey = eh W2^T", H, F, size_t(2) * F * H}}) {
      char shape[128];
      std::snprintf(shape, sizeof shape, "%s fwd %s [%d,%d]x[%d,%d]", skewed ? "skew" : "even", fw.name, rows,
                    fw.k, fw.k, fw.n);
      for (GroupedGemmImpl impl : kImpls) {
        GroupedGemmArgs args;
        args.n = fw.n;
        args.k = fw.k;
        args.w = d_layout + fw.layout_offset;
        args.w_expert_rows = int(stride / fw.k);
        const bool auto_impl = impl == GroupedGemmImpl::kAuto;
        time_one(shape, std::string("K-major in place ") + GroupedGemmImplName(impl), args, impl, auto_impl,
                 !auto_impl);
      }
    }
    cudaFree(d_off);
  }
  cudaFree(a);
  cudaFree(c);
  cudaFree(c_ref);
  cudaFree(d_layout);
  cudaFree(d_w13t);
  cudaFree(d_w2t);
}

// The w2 dX GEMM with the SwiGLU backward after it, at the same step shape
// (the w2 weights 3 F H elements apart as in the parameter layout): the
// The learner's LM head on one chunk of scored rows (4096 x vocab 32768,
// hidden 1024: gpu-ref's chunk), forward and the gradient up to dz:
// cuBLAS fp32 logits + TokenLogProbForward / TokenLogProbBackward (the
// unfused path, logits kept in fp32) against the ping-pong GEMM with the
// block-statistics epilogue + TokenLogProbFromBlockStats /
// TokenLogProbBackwardFromShifted (in place over the kept bf16 u). Also the
// plain GEMMs alone (the epilogue's cost). "max |dlogp|": the fused log-probs
// against the unfused ones.
void LmHeadBench(cublasHandle_t h, std::mt19937_64& rng, int reps) {
  namespace gk = grove::kernels;
  const int rows = 4096, V = 32768, H = 1024;
  __nv_bfloat16* a = RandomDeviceBf16(size_t(rows) * H, rng);
  __nv_bfloat16* w = RandomDeviceBf16(size_t(V) * H, rng);
  std::vector<int32_t> targets(rows);
  std::uniform_int_distribution<int> pick(0, V - 1);
  for (int32_t& t : targets) t = pick(rng);
  const int blocks = gk::LogitBlocks(V);
  int32_t *d_targets, *d_off;
  float *logits32, *logp, *lse, *logp_fused, *lse_fused, *dlogp, *target_logit;
  float2* stats;
  __nv_bfloat16 *u, *dz, *plain16;
  const int32_t off[2] = {0, rows};
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_targets, rows * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_targets, targets.data(), rows * 4, cudaMemcpyHostToDevice));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_off, 8));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_off, off, 8, cudaMemcpyHostToDevice));
  for (float** p : {&logp, &lse, &logp_fused, &lse_fused, &dlogp, &target_logit})
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(p, rows * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMemset(dlogp, 0, rows * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&logits32, size_t(rows) * V * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&stats, size_t(rows) * blocks * 8));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&u, size_t(rows) * V * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dz, size_t(rows) * V * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&plain16, size_t(rows) * V * 2));
  auto check = [](const grove::Status& st) {
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      std::exit(1);
    }
  };
  GroupedGemmArgs args;
  args.a = a;
  args.w = w;
  args.expert_offsets = d_off;
  args.total_rows = rows;
  args.num_experts = 1;
  args.n = V;
  args.k = H;
  args.out_type = GemmOutType::kBF16;
  GroupedGemmArgs fused = args;
  fused.c = u;
  fused.logit_block_stats = stats;
  fused.logit_targets = d_targets;
  fused.logit_target = target_logit;
  args.c = plain16;
  const double flops = 2.0 * rows * V * H;
  std::printf("%-58s %9s %8s\n", "LM head chunk [4096 x 1024] x [1024 x 32768]", "ms", "TFLOP/s");
  auto row = [&](const char* what, double ms, bool gemm) {
    if (gemm) {
      std::printf("%-58s %9.4f %8.1f\n", what, ms, flops / ms / 1e9);
    } else {
      std::printf("%-58s %9.4f %8s\n", what, ms, "");
    }
  };
  row("cuBLAS GEMM, fp32 logits", MedianMs([&] { CublasLinear(h, a, w, logits32, rows, V, H, GemmOutType::kF32); },
                                           reps), true);
  row("cuBLAS GEMM, bf16 logits", MedianMs([&] { CublasLinear(h, a, w, plain16, rows, V, H, GemmOutType::kBF16); },
                                           reps), true);
  row("grove ping-pong GEMM, bf16 out, no epilogue",
      MedianMs([&] { check(gk::GroupedGemm(args, gk::GroupedGemmImpl::kWgmmaPingpong, nullptr)); }, reps), true);
  row("grove cooperative 128x256 GEMM, bf16 out, no epilogue",
      MedianMs([&] { check(gk::GroupedGemm(args, gk::GroupedGemmImpl::kWgmmaBn256, nullptr)); }, reps), true);
  for (gk::GroupedGemmImpl impl : {gk::GroupedGemmImpl::kWgmmaPingpong, gk::GroupedGemmImpl::kWgmmaBn128,
                                   gk::GroupedGemmImpl::kWgmmaBn256, gk::GroupedGemmImpl::kAuto}) {
    const std::string what = std::string("grove ") + gk::GroupedGemmImplName(impl) + ", block-statistics epilogue";
    row(what.c_str(), MedianMs([&] { check(gk::GroupedGemm(fused, impl, nullptr)); }, reps), true);
  }
  const double unfused_fwd = MedianMs([&] {
    CublasLinear(h, a, w, logits32, rows, V, H, GemmOutType::kF32);
    check(gk::TokenLogProbForward(logits32, d_targets, logp, lse, rows, V, nullptr));
  }, reps);
  const double fused_fwd = MedianMs([&] {
    check(gk::GroupedGemm(fused, gk::GroupedGemmImpl::kAuto, nullptr));
    check(gk::TokenLogProbFromBlockStats(stats, target_logit, d_targets, logp_fused, lse_fused, rows, V, nullptr));
  }, reps);
  row("forward, unfused (cuBLAS fp32 + TokenLogProbForward)", unfused_fwd, true);
  row("forward, fused (epilogue + TokenLogProbFromBlockStats)", fused_fwd, true);
  row("backward to dz, unfused (TokenLogProbBackward, fp32 kept)",
      MedianMs([&] { check(gk::TokenLogProbBackward(logits32, d_targets, lse, dlogp, dz, rows, V, nullptr)); }, reps),
      false);
  // In place over a copy of u each time would time the copy too; dz apart
  // reads and writes the same bytes.
  row("backward to dz, fused (TokenLogProbBackwardFromShifted)",
      MedianMs([&] {
        check(gk::TokenLogProbBackwardFromShifted(u, stats, d_targets, lse_fused, dlogp, dz, rows, V, nullptr));
      }, reps), false);
  std::vector<float> l0(rows), l1(rows);
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(l0.data(), logp, rows * 4, cudaMemcpyDeviceToHost));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(l1.data(), logp_fused, rows * 4, cudaMemcpyDeviceToHost));
  double worst = 0;
  for (int r = 0; r < rows; ++r) worst = std::max(worst, double(std::fabs(l0[r] - l1[r])));
  std::printf("max |logp fused - logp unfused| over the chunk: %.3g\n", worst);
  for (void* p : std::initializer_list<void*>{a, w, d_targets, d_off, logits32, logp, lse, logp_fused, lse_fused,
                                              dlogp, target_logit, stats, u, dz, plain16})
    cudaFree(p);
}

// GEMM to bf16 dh, then SwiGluBackwardPacked (dh and the forward's [a | b]
// into [da | db]: the model's path without the fused epilogue), against
// the SwiGLU epilogue (GroupedGemmArgs::swiglu_bwd_ab). TFLOP/s: the
// GEMM's FLOPs; "rel diff": the fused [da | db] against the unfused one.
void SwiGluEpilogueBench(std::mt19937_64& rng, int reps) {
  const int E = 64, H = 1024, F = 512, rows = 32768 * 6;
  const size_t stride = size_t(3) * F * H;
  __nv_bfloat16* w = RandomDeviceBf16(E * stride, rng);
  __nv_bfloat16* a = RandomDeviceBf16(size_t(rows) * H, rng);
  __nv_bfloat16* ab = RandomDeviceBf16(size_t(rows) * 2 * F, rng);
  __nv_bfloat16 *dh, *unfused, *fused;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&dh, size_t(rows) * F * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&unfused, size_t(rows) * 2 * F * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&fused, size_t(rows) * 2 * F * 2));
  std::printf("%-48s %-34s %9s %8s %9s\n", "shape", "method", "ms", "TFLOP/s", "rel diff");
  for (bool skewed : {false, true}) {
    std::vector<int> counts = Routing(rows, E, skewed, rng);
    std::vector<int32_t> offsets(E + 1, 0);
    for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    int32_t* d_off;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_off, offsets.size() * 4));
    GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_off, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
    char shape[128];
    std::snprintf(shape, sizeof shape, "%s deab = swiglu'(dey W2) [%d,%d]x[%d,%d]", skewed ? "skew" : "even", rows,
                  H, H, F);
    GroupedGemmArgs args;
    args.a = a;
    args.w = w + size_t(2) * F * H;  // w2 [H, F] after w1|w3, read MN-major
    args.expert_offsets = d_off;
    args.total_rows = rows;
    args.num_experts = E;
    args.n = F;
    args.k = H;
    args.out_type = GemmOutType::kBF16;
    args.w_layout = GemmWeightLayout::kMnMajor;
    args.w_expert_rows = int(stride / F);
    args.c = dh;
    auto report = [&](const char* method, const std::function<grove::Status()>& fn, bool compare) {
      const grove::Status st = fn();
      if (!st.ok()) {
        std::printf("%-48s %-34s %s\n", shape, method, st.ToString().c_str());
        return;
      }
      const double ms = MedianMs([&] { (void)fn(); }, reps);
      const double diff = compare ? MaxRelDiff(fused, unfused, size_t(rows) * 2 * F, GemmOutType::kBF16) : 0.0;
      std::printf("%-48s %-34s %9.4f %8.1f %9.2e\n", shape, method, ms, 2.0 * rows * double(F) * H / ms / 1e9,
                  diff);
      std::fflush(stdout);
    };
    report("GEMM auto alone", [&] { return GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr); }, false);
    report("SwiGluBackwardPacked alone",
           [&] { return grove::kernels::SwiGluBackwardPacked(dh, ab, unfused, rows, F, nullptr); }, false);
    report("GEMM auto + SwiGluBackwardPacked",
           [&] {
             const grove::Status st = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
             return st.ok() ? grove::kernels::SwiGluBackwardPacked(dh, ab, unfused, rows, F, nullptr) : st;
           },
           false);
    GroupedGemmArgs fused_args = args;
    fused_args.c = fused;
    fused_args.swiglu_bwd_ab = ab;
    for (GroupedGemmImpl impl : {GroupedGemmImpl::kAuto, GroupedGemmImpl::kMmaSync}) {
      const std::string method = std::string("fused epilogue ") + GroupedGemmImplName(impl);
      report(method.c_str(), [&] { return GroupedGemm(fused_args, impl, nullptr); }, true);
    }
    // The model's path since session 10: the router gate applied in the
    // SwiGLU backward (SwiGluBackwardGated: also gate * h and the gate's
    // gradient), against the same in the epilogue (+ the partials' sum).
    {
      std::vector<int32_t> slots(rows);
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(slots.begin(), slots.end(), rng);
      std::vector<float> gates(rows, 0.5f);
      const int parts = grove::kernels::SwiGluGatePartials(F);
      int32_t* d_slots;
      float *d_gates, *d_dgate, *d_partial;
      __nv_bfloat16* hg;
      GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_slots, size_t(rows) * 4));
      GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_gates, size_t(rows) * 4));
      GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_dgate, size_t(rows) * 4));
      GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_partial, size_t(rows) * parts * 4));
      GROVE_BENCH_CUDA_CHECK(cudaMalloc(&hg, size_t(rows) * F * 2));
      GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_slots, slots.data(), size_t(rows) * 4, cudaMemcpyHostToDevice));
      GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_gates, gates.data(), size_t(rows) * 4, cudaMemcpyHostToDevice));
      report("GEMM auto + SwiGluBackwardGated",
             [&] {
               const grove::Status st = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
               return st.ok() ? grove::kernels::SwiGluBackwardGated(dh, ab, d_slots, d_gates, unfused, hg, d_dgate,
                                                                    rows, F, nullptr)
                              : st;
             },
             false);
      GroupedGemmArgs gated = fused_args;
      gated.swiglu_bwd_slot_of_row = d_slots;
      gated.swiglu_bwd_slot_gates = d_gates;
      gated.swiglu_bwd_h_gated = hg;
      gated.swiglu_bwd_dgate_partial = d_partial;
      report("fused gated epilogue + partials",
             [&] {
               const grove::Status st = GroupedGemm(gated, GroupedGemmImpl::kAuto, nullptr);
               return st.ok() ? grove::kernels::SwiGluGateGradFromPartials(d_partial, parts, d_slots, d_dgate, rows,
                                                                           nullptr)
                              : st;
             },
             true);
      cudaFree(d_slots);
      cudaFree(d_gates);
      cudaFree(d_dgate);
      cudaFree(d_partial);
      cudaFree(hg);
    }
    cudaFree(d_off);
  }
  cudaFree(w);
  cudaFree(a);
  cudaFree(ab);
  cudaFree(dh);
  cudaFree(unfused);
  cudaFree(fused);
}

}  // namespace

// One launch per method on the w1/w3 and w2 shapes, nothing else on the GPU
// in between (so ncu's kernel list is just these).
int Profile(cublasHandle_t h, std::mt19937_64& rng) {
  const int experts = 64, rows = 16384 * 6;
  std::vector<int32_t> offsets(experts + 1);
  for (int e = 0; e <= experts; ++e) offsets[e] = e * (rows / experts);
  int32_t* d_off;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_off, offsets.size() * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_off, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
  for (auto [n, k] : {std::pair{512, 1024}, std::pair{1024, 512}}) {
    __nv_bfloat16* a = RandomDeviceBf16(size_t(rows) * k, rng);
    __nv_bfloat16* w = RandomDeviceBf16(size_t(experts) * n * k, rng);
    void* c;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&c, size_t(rows) * n * 2));
    CublasLinear(h, a, w, c, rows, n, k, GemmOutType::kBF16);
    for (GroupedGemmImpl impl : {GroupedGemmImpl::kWgmmaBn256, GroupedGemmImpl::kWgmmaBn256Bk32,
                                 GroupedGemmImpl::kWgmmaPingpong, GroupedGemmImpl::kWgmmaCluster,
                                 GroupedGemmImpl::kWgmmaStaged}) {
      GroupedGemmArgs args;
      args.a = a; args.w = w; args.c = c; args.expert_offsets = d_off;
      args.total_rows = rows; args.num_experts = experts; args.n = n; args.k = k;
      args.out_type = GemmOutType::kBF16;
      grove::Status s = GroupedGemm(args, impl, nullptr);
      if (!s.ok()) std::printf("%s\n", s.ToString().c_str());
    }
    GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    cudaFree(a); cudaFree(w); cudaFree(c);
  }
  return 0;
}

// Decode attention over the paged KV cache at the GPU reference model's
// shape (8 heads, 2 kv heads of 128, 16-token pages, max_pos 4096): every
// row of the batch at the same context length, its pages contiguous per
// slot. PagedAttention (one block per (row, kv head)) against the split pass
// (PagedAttentionSplitAt) at each chunk kernel and length, and the length
// and kernel PagedAttentionSplit picks: median us per launch (a split's two
// kernels together) with the K/V bytes each must read once in GB/s, and the
// largest output difference of any split from the unsplit kernel.
void PagedAttentionBench(std::mt19937_64& rng, int reps) {
  using grove::kernels::PagedChunkKernel;
  using grove::kernels::PagedKvCache;
  using grove::kernels::PagedRows;
  const int heads = 8, kv_heads = 2, hd = 128, page_tokens = 16, max_pos = 4096, max_batch = 128;
  const int max_pages = max_pos / page_tokens;
  const size_t page_elems = size_t(page_tokens) * kv_heads * hd;
  __nv_bfloat16* k = RandomDeviceBf16(size_t(max_batch) * max_pages * page_elems, rng);
  __nv_bfloat16* v = RandomDeviceBf16(size_t(max_batch) * max_pages * page_elems, rng);
  __nv_bfloat16* q = RandomDeviceBf16(size_t(max_batch) * heads * hd, rng);
  std::vector<int32_t> table(size_t(max_batch) * max_pages), slots(max_batch);
  for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t(i);
  for (int b = 0; b < max_batch; ++b) slots[b] = b;
  int32_t *d_table = nullptr, *d_slot = nullptr, *d_pos = nullptr;
  __nv_bfloat16 *out = nullptr, *out_split = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_table, table.size() * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_slot, max_batch * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_pos, max_batch * 4));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&out, size_t(max_batch) * heads * hd * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&out_split, size_t(max_batch) * heads * hd * 2));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_slot, slots.data(), max_batch * 4, cudaMemcpyHostToDevice));
  const PagedKvCache cache{k, v, d_table, max_batch * max_pages, page_tokens, max_pages, kv_heads, hd};
  // Room for the shortest chunks (16 keys) at the largest batch.
  const size_t ws_bytes = grove::kernels::PagedAttentionSplitWorkspaceBytesAt(cache, max_batch, heads, max_pos, 16);
  void* ws = nullptr;
  GROVE_BENCH_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
  struct Variant {
    const char* name;
    int chunk_tokens;  // 0: PagedAttentionSplit's own choice
    PagedChunkKernel kernel;
  };
  const Variant variants[] = {{"walk 16", 16, PagedChunkKernel::kWarpWalk}, {"walk 64", 64, PagedChunkKernel::kWarpWalk},
                              {"tiled 32", 32, PagedChunkKernel::kTiled},   {"tiled 64", 64, PagedChunkKernel::kTiled},
                              {"tiled 128", 128, PagedChunkKernel::kTiled}, {"default", 0, PagedChunkKernel::kTiled}};
  std::printf(
      "\npaged decode attention (8 heads, 2 kv heads of 128; split bound max_pos %d, or %d for contexts up to it): us "
      "per launch (KV GB/s)\n",
      max_pos, grove::kernels::kPagedSplitShortContext);
  std::printf("| batch | context | unsplit |");
  for (const Variant& var : variants) std::printf(" %s |", var.name);
  std::printf(" max |diff| |\n| --- | --- | --- |");
  for (size_t i = 0; i < std::size(variants); ++i) std::printf(" --- |");
  std::printf(" --- |\n");
  for (int batch : {1, 8, 32, 128}) {
    for (int context : {96, 256, 512, 1024, 2048, 4096}) {
      // Contexts of at most kPagedSplitShortContext positions bounded by
      // it, as the engine bounds such decode steps (its short class).
      const int bound = context <= grove::kernels::kPagedSplitShortContext ? grove::kernels::kPagedSplitShortContext
                                                                            : max_pos;
      const std::vector<int32_t> pos(batch, context - 1);
      GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_pos, pos.data(), batch * 4, cudaMemcpyHostToDevice));
      const PagedRows rows{d_slot, d_pos, batch};
      const double gb = double(batch) * context * kv_heads * hd * 2 * 2 / 1e9;
      const double t0 = MedianMs(
          [&] {
            if (!grove::kernels::PagedAttention(cache, rows, heads, q, out, 0.f, nullptr).ok()) std::exit(1);
          },
          reps);
      std::printf("| %d | %d | %.1f (%.0f) |", batch, context, t0 * 1e3, gb / (t0 * 1e-3));
      const size_t n = size_t(batch) * heads * hd;
      std::vector<__nv_bfloat16> a(n), b(n);
      GROVE_BENCH_CUDA_CHECK(cudaMemcpy(a.data(), out, n * 2, cudaMemcpyDeviceToHost));
      double diff = 0;
      for (const Variant& var : variants) {
        const double t1 = MedianMs(
            [&] {
              const grove::Status st =
                  var.chunk_tokens == 0
                      ? grove::kernels::PagedAttentionSplit(cache, rows, heads, q, out_split, 0.f, bound, ws, ws_bytes,
                                                            nullptr)
                      : grove::kernels::PagedAttentionSplitAt(cache, rows, heads, q, out_split, 0.f, bound, ws,
                                                              ws_bytes, nullptr, nullptr, var.chunk_tokens,
                                                              var.kernel);
              if (!st.ok()) {
                std::fprintf(stderr, "%s\n", st.ToString().c_str());
                std::exit(1);
              }
            },
            reps);
        GROVE_BENCH_CUDA_CHECK(cudaMemcpy(b.data(), out_split, n * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < n; ++i)
          diff = std::max(diff, double(std::fabs(__bfloat162float(a[i]) - __bfloat162float(b[i]))));
        std::printf(" %.1f (%.0f) |", t1 * 1e3, gb / (t1 * 1e-3));
      }
      std::printf(" %.2g |\n", diff);
    }
  }
  for (void* p : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q), static_cast<void*>(d_table),
                  static_cast<void*>(d_slot), static_cast<void*>(d_pos), static_cast<void*>(out),
                  static_cast<void*>(out_split), ws})
    GROVE_BENCH_CUDA_CHECK(cudaFree(p));
}

// The step's four grouped expert GEMMs at the gpu-ref training shape (32
// sequences x 1024 tokens = 32768 tokens, top-6 of 64 experts: 196608
// routed rows, log-normal expert popularity), each against cuBLAS's dense
// GEMM of the same total work (one [rows, k] x [k, n], a single 1 or 2 MB
// weight): the "at least 90% of cuBLAS at training shapes", at the
// shape the step runs. Weights as the step reads them: in the mirror's
// layout, each expert's w1, w3, w2 together (3 F H elements apart), the
// forward K-major, the backward's dX MN-major (no transposed copy).
void GroupedStepShapes(cublasHandle_t h, std::mt19937_64& rng, int reps) {
  const int experts = 64, top_k = 6, hidden = 1024, expert_hidden = 512, tokens = 32768;
  const int rows = tokens * top_k;
  const ExpertRouting routing = RouteToDevice(rows, experts, /*skewed=*/true, rng);
  const std::vector<int>& counts = routing.counts;
  int32_t* d_off = routing.d_offsets;
  const size_t expert_elems = size_t(3) * expert_hidden * hidden;
  __nv_bfloat16* weights = RandomDeviceBf16(size_t(experts) * expert_elems, rng);
  const __nv_bfloat16* w1 = weights;  // [2F, H]: w1 then w3
  const __nv_bfloat16* w2 = weights + size_t(2) * expert_hidden * hidden;  // [H, F]
  struct Shape {
    const char* name;
    const __nv_bfloat16* w;
    int n, k, expert_rows;
    GemmWeightLayout layout;
  };
  const int F = expert_hidden, H = hidden;
  const Shape shapes[] = {
      {"fwd w1|w3 [Te,1024]x[1024,1024]", w1, 2 * F, H, int(expert_elems / H), GemmWeightLayout::kKMajor},
      {"fwd w2 [Te,512]x[512,1024]", w2, H, F, int(expert_elems / F), GemmWeightLayout::kKMajor},
      {"dX w2 [Te,1024]x[1024,512]", w2, F, H, int(expert_elems / F), GemmWeightLayout::kMnMajor},
      {"dX w1|w3 [Te,1024]x[1024,1024]", w1, H, 2 * F, int(expert_elems / H), GemmWeightLayout::kMnMajor},
  };
  std::printf("grouped GEMMs of the gpu-ref step: %d tokens, %d rows over %d experts (%d..%d), bf16 out\n",
              tokens, rows, experts, *std::min_element(counts.begin(), counts.end()),
              *std::max_element(counts.begin(), counts.end()));
  std::printf("%-34s %12s %12s %12s %12s %8s\n", "GEMM", "dense ms", "dense TF/s", "grove ms", "grove TF/s",
              "%dense");
  for (const Shape& sh : shapes) {
    __nv_bfloat16* a = RandomDeviceBf16(size_t(rows) * sh.k, rng);
    __nv_bfloat16* dense_w = RandomDeviceBf16(size_t(sh.n) * sh.k, rng);
    void* c;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&c, size_t(rows) * sh.n * 2));
    const double flops = 2.0 * rows * double(sh.n) * sh.k;
    const double dense_ms =
        MedianMs([&] { CublasLinear(h, a, dense_w, c, rows, sh.n, sh.k, GemmOutType::kBF16); }, reps);
    GroupedGemmArgs args;
    args.a = a; args.w = sh.w; args.c = c; args.expert_offsets = d_off;
    args.total_rows = rows; args.num_experts = experts; args.n = sh.n; args.k = sh.k;
    args.out_type = GemmOutType::kBF16; args.w_layout = sh.layout; args.w_expert_rows = sh.expert_rows;
    const grove::Status s = GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr);
    if (!s.ok()) {
      std::printf("%-34s %s\n", sh.name, s.ToString().c_str());
    } else {
      const double ms = MedianMs([&] { (void)GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr); }, reps);
      std::printf("%-34s %12.4f %12.1f %12.4f %12.1f %7.1f%%\n", sh.name, dense_ms, flops / dense_ms / 1e9, ms,
                  flops / ms / 1e9, 100.0 * dense_ms / ms);
    }
    std::fflush(stdout);
    cudaFree(a); cudaFree(dense_w); cudaFree(c);
  }
  // The forward's w1|w3 GEMM with the SwiGLU forward in its epilogue
  // (GroupedGemmArgs::swiglu_out) against the GEMM and SwiGluForwardPacked
  // apart (what it replaces), and each of those alone.
  {
    __nv_bfloat16* a = RandomDeviceBf16(size_t(rows) * H, rng);
    __nv_bfloat16 *c, *hbuf;
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&c, size_t(rows) * 2 * F * 2));
    GROVE_BENCH_CUDA_CHECK(cudaMalloc(&hbuf, size_t(rows) * F * 2));
    GroupedGemmArgs args;
    args.a = a; args.w = w1; args.c = c; args.expert_offsets = d_off;
    args.total_rows = rows; args.num_experts = experts; args.n = 2 * F; args.k = H;
    args.out_type = GemmOutType::kBF16; args.w_expert_rows = int(expert_elems / H);
    GroupedGemmArgs fused = args;
    fused.swiglu_out = hbuf;
    const grove::Status s = GroupedGemm(fused, GroupedGemmImpl::kAuto, nullptr);
    if (!s.ok()) {
      std::printf("fused SwiGLU fwd: %s\n", s.ToString().c_str());
    } else {
      const double gemm_ms = MedianMs([&] { (void)GroupedGemm(args, GroupedGemmImpl::kAuto, nullptr); }, reps);
      const double swiglu_ms =
          MedianMs([&] { (void)grove::kernels::SwiGluForwardPacked(c, hbuf, rows, F, nullptr); }, reps);
      const double fused_ms = MedianMs([&] { (void)GroupedGemm(fused, GroupedGemmImpl::kAuto, nullptr); }, reps);
      const double flops = 2.0 * rows * 2.0 * F * H;
      std::printf("fwd w1|w3 + SwiGLU: GEMM %.4f ms + SwiGluForwardPacked %.4f ms = %.4f ms; fused %.4f ms "
                  "(%.1f TF/s)\n",
                  gemm_ms, swiglu_ms, gemm_ms + swiglu_ms, fused_ms, flops / fused_ms / 1e9);
    }
    std::fflush(stdout);
    cudaFree(a); cudaFree(c); cudaFree(hbuf);
  }
  cudaFree(weights);
  cudaFree(d_off);
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (argc > 1 && std::strcmp(argv[1], "--attention") == 0) {
    std::mt19937_64 rng(7);
    AttentionBench(rng, 20);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--paged") == 0) {
    std::mt19937_64 rng(7);
    PagedAttentionBench(rng, 20);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--step") == 0) {
    std::mt19937_64 rng(7);
    StepKernels(rng, 30, CopyCeilingGbs());
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--memory") == 0) {  // the memory-bound rows alone (AdamW among them)
    std::mt19937_64 rng(7);
    MemoryBoundKernels(rng, 30, CopyCeilingGbs());
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--norm") == 0) {
    std::mt19937_64 rng(7);
    NormBackwardResidual(rng, 30, CopyCeilingGbs());
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--dw") == 0) {
    std::mt19937_64 rng(7);
    cublasHandle_t h;
    CUBLAS_CHECK(cublasCreate(&h));
    WeightGradBench(h, rng, 20);
    cublasDestroy(h);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--dx") == 0) {
    std::mt19937_64 rng(7);
    DxBench(rng, 20);
    SwiGluEpilogueBench(rng, 20);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--lm-head") == 0) {
    std::mt19937_64 rng(7);
    cublasHandle_t h;
    CUBLAS_CHECK(cublasCreate(&h));
    LmHeadBench(h, rng, 20);
    cublasDestroy(h);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--dx-swiglu") == 0) {
    std::mt19937_64 rng(7);
    SwiGluEpilogueBench(rng, 20);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--grouped-step") == 0) {
    std::mt19937_64 rng(7);
    cublasHandle_t h;
    CUBLAS_CHECK(cublasCreate(&h));
    GroupedStepShapes(h, rng, 20);
    cublasDestroy(h);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--profile") == 0) {
    std::mt19937_64 rng(7);
    cublasHandle_t h;
    CUBLAS_CHECK(cublasCreate(&h));
    return Profile(h, rng);
  }
  cudaDeviceProp prop;
  GROVE_BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major,
              prop.minor);
  std::mt19937_64 rng(12345);
  cublasHandle_t h;
  CUBLAS_CHECK(cublasCreate(&h));
  const double copy_gbs = Ceilings(h, rng);
  MemoryBoundKernels(rng, quick ? 10 : 30, copy_gbs);
  StepKernels(rng, quick ? 10 : 30, copy_gbs);
  AttentionBench(rng, quick ? 5 : 20);

  const int experts = 64, top_k = 6, hidden = 1024, expert_hidden = 512;
  const int reps = quick ? 5 : 20;
  std::vector<Row> table;
  const char* kHeader = "%-62s %-24s %9s %8s %8s %8s %9s\n";
  const char* kRowFmt = "%-62s %-24s %9.4f %8.1f %8.1f %8.2f %9.2e\n";
  std::printf(kHeader, "shape", "method", "ms", "TFLOP/s", "%dense", "x loop", "rel diff");
  auto add = [&](Row r) {
    std::printf(kRowFmt, r.shape.c_str(), r.method.c_str(), r.ms, r.tflops, r.pct_dense,
                r.vs_loop, r.diff);
    std::fflush(stdout);
    table.push_back(std::move(r));
  };
  for (int tokens : {8192, 16384}) {
    for (bool skewed : {false, true}) {
      const int rows = tokens * top_k;
      std::vector<int> counts = Routing(rows, experts, skewed, rng);
      std::vector<int32_t> offsets(experts + 1, 0);
      for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
      int32_t* d_off;
      GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_off, offsets.size() * 4));
      GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_off, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
      const int max_count = *std::max_element(counts.begin(), counts.end());
      const int min_count = *std::min_element(counts.begin(), counts.end());

      struct Proj { const char* name; int n, k; };
      for (Proj p : {Proj{"w1/w3", expert_hidden, hidden}, Proj{"w2", hidden, expert_hidden}}) {
        for (GemmOutType out : {GemmOutType::kBF16, GemmOutType::kF32}) {
          const size_t out_bytes = out == GemmOutType::kF32 ? 4 : 2;
          __nv_bfloat16* a = RandomDeviceBf16(size_t(rows) * p.k, rng);
          __nv_bfloat16* w = RandomDeviceBf16(size_t(experts) * p.n * p.k, rng);
          void *c_ref, *c;
          GROVE_BENCH_CUDA_CHECK(cudaMalloc(&c_ref, size_t(rows) * p.n * out_bytes));
          GROVE_BENCH_CUDA_CHECK(cudaMalloc(&c, size_t(rows) * p.n * out_bytes));
          const double flops = 2.0 * rows * double(p.n) * p.k;
          char shape[160];
          std::snprintf(shape, sizeof shape, "T=%d %s %s [Te,%d]x[%d,%d] Te %d..%d %s", tokens,
                        skewed ? "skew" : "even", p.name, p.k, p.k, p.n, min_count, max_count,
                        out == GemmOutType::kF32 ? "f32" : "bf16");

          auto loop = [&] {
            for (int e = 0; e < experts; ++e)
              if (counts[e] > 0)
                CublasLinear(h, a + size_t(offsets[e]) * p.k, w + size_t(e) * p.n * p.k,
                             static_cast<char*>(c_ref) + size_t(offsets[e]) * p.n * out_bytes,
                             counts[e], p.n, p.k, out);
          };
          const double loop_ms = MedianMs(loop, reps);
          const double dense_ms = MedianMs([&] { CublasLinear(h, a, w, c, rows, p.n, p.k, out); }, reps);
          loop();  // c_ref holds the per-expert result for the diff column
          GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
          // The dense GEMM multiplies every row by expert 0's weight: its diff
          // column shows what a wrong result looks like (order 1).
          add({shape, "cuBLAS dense same work", dense_ms, flops / dense_ms / 1e9, 100.0,
                           loop_ms / dense_ms, MaxRelDiff(c, c_ref, size_t(rows) * p.n, out)});
          add({shape, "cuBLAS per-expert loop", loop_ms, flops / loop_ms / 1e9,
                           100.0 * dense_ms / loop_ms, 1.0, 0});

          // cuBLAS grouped-batched: one group per non-empty expert.
          {
            std::vector<cublasOperation_t> ta, tb;
            std::vector<int> ms, ns, ks, ld_w, ld_a, ld_c, gs;
            std::vector<float> alpha, beta;
            std::vector<const void*> pw, pa;
            std::vector<void*> pc;
            for (int e = 0; e < experts; ++e) {
              if (counts[e] == 0) continue;
              ta.push_back(CUBLAS_OP_T); tb.push_back(CUBLAS_OP_N);
              ms.push_back(p.n); ns.push_back(counts[e]); ks.push_back(p.k);
              ld_w.push_back(p.k); ld_a.push_back(p.k); ld_c.push_back(p.n); gs.push_back(1);
              alpha.push_back(1.f); beta.push_back(0.f);
              pw.push_back(w + size_t(e) * p.n * p.k);
              pa.push_back(a + size_t(offsets[e]) * p.k);
              pc.push_back(static_cast<char*>(c) + size_t(offsets[e]) * p.n * out_bytes);
            }
            const void** d_pw; const void** d_pa; void** d_pc;
            GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_pw, pw.size() * 8));
            GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_pa, pa.size() * 8));
            GROVE_BENCH_CUDA_CHECK(cudaMalloc(&d_pc, pc.size() * 8));
            GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_pw, pw.data(), pw.size() * 8, cudaMemcpyHostToDevice));
            GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_pa, pa.data(), pa.size() * 8, cudaMemcpyHostToDevice));
            GROVE_BENCH_CUDA_CHECK(cudaMemcpy(d_pc, pc.data(), pc.size() * 8, cudaMemcpyHostToDevice));
            auto grouped = [&]() -> cublasStatus_t {
              return cublasGemmGroupedBatchedEx(
                  h, ta.data(), tb.data(), ms.data(), ns.data(), ks.data(), alpha.data(), d_pw,
                  CUDA_R_16BF, ld_w.data(), d_pa, CUDA_R_16BF, ld_a.data(), beta.data(), d_pc,
                  out == GemmOutType::kF32 ? CUDA_R_32F : CUDA_R_16BF, ld_c.data(),
                  static_cast<int>(gs.size()), gs.data(), CUBLAS_COMPUTE_32F);
            };
            if (grouped() == CUBLAS_STATUS_SUCCESS) {
              const double g_ms = MedianMs([&] { grouped(); }, reps);
              GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
              add({shape, "cuBLAS grouped-batched", g_ms, flops / g_ms / 1e9,
                               100.0 * dense_ms / g_ms, loop_ms / g_ms,
                               MaxRelDiff(c, c_ref, size_t(rows) * p.n, out)});
            } else {
              add({shape, "cuBLAS grouped-batched (unsupported)", 0, 0, 0, 0, 0});
            }
            cudaFree(d_pw); cudaFree(d_pa); cudaFree(d_pc);
          }

          for (GroupedGemmImpl impl : {GroupedGemmImpl::kWgmmaBn128, GroupedGemmImpl::kWgmmaBn256,
                                       GroupedGemmImpl::kWgmmaBn256Bk32,
                                       GroupedGemmImpl::kWgmmaPingpong, GroupedGemmImpl::kWgmmaCluster,
                                     GroupedGemmImpl::kWgmmaStaged,
                                       GroupedGemmImpl::kMmaSync, GroupedGemmImpl::kWmma}) {
            GroupedGemmArgs args;
            args.a = a; args.w = w; args.c = c; args.expert_offsets = d_off;
            args.total_rows = rows; args.num_experts = experts; args.n = p.n; args.k = p.k;
            args.out_type = out;
            GROVE_BENCH_CUDA_CHECK(cudaMemset(c, 0xFF, size_t(rows) * p.n * out_bytes));
            grove::Status s = GroupedGemm(args, impl, nullptr);
            if (!s.ok()) {
              std::printf("%s %s: %s\n", shape, GroupedGemmImplName(impl), s.ToString().c_str());
              continue;
            }
            GROVE_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
            const double diff = MaxRelDiff(c, c_ref, size_t(rows) * p.n, out);
            const double ms = MedianMs([&] { (void)GroupedGemm(args, impl, nullptr); }, reps);
            add({shape, std::string("grove ") + GroupedGemmImplName(impl), ms,
                             flops / ms / 1e9, 100.0 * dense_ms / ms, loop_ms / ms, diff});
          }
          cudaFree(a); cudaFree(w); cudaFree(c); cudaFree(c_ref);
        }
      }
      cudaFree(d_off);
    }
  }
  // Summary: per shape, cuBLAS dense and loop, and every grove method.
  std::printf("\nsummary (TFLOP/s; %%dense = cuBLAS dense time / method time)\n");
  std::printf(kHeader, "shape", "method", "ms", "TFLOP/s", "%dense", "x loop", "rel diff");
  for (const Row& r : table)
    if (r.method.rfind("grove", 0) == 0 || r.method == "cuBLAS dense same work")
      std::printf(kRowFmt, r.shape.c_str(), r.method.c_str(), r.ms, r.tflops, r.pct_dense,
                  r.vs_loop, r.diff);
  cublasDestroy(h);
  return 0;
}
