#include "kernels/grouped_gemm.h"

#include <cstdint>
#include <string>

#include "kernels/grouped_gemm_internal.h"

namespace grove::kernels {
namespace {

Status CheckArgs(const GroupedGemmArgs& a) {
  if (a.num_experts <= 0 || a.num_experts > kGroupedGemmMaxExperts)
    return Status::InvalidArgument("grouped GEMM: num_experts must be in 1.." +
                                   std::to_string(kGroupedGemmMaxExperts) + ", got " +
                                   std::to_string(a.num_experts));
  if (a.total_rows < 0) return Status::InvalidArgument("grouped GEMM: total_rows < 0");
  if (a.n <= 0 || a.k <= 0 || a.n % 8 != 0 || a.k % 8 != 0)
    return Status::InvalidArgument("grouped GEMM: n and k must be positive multiples of 8, got n=" +
                                   std::to_string(a.n) + " k=" + std::to_string(a.k));
  // The stored matrix's rows per expert: n of k elements, or k of n.
  const bool mn = a.w_layout == GemmWeightLayout::kMnMajor;
  const int own_rows = mn ? a.k : a.n;
  if (a.w_expert_rows != 0 && a.w_expert_rows < own_rows)
    return Status::InvalidArgument(
        "grouped GEMM: w_expert_rows " + std::to_string(a.w_expert_rows) + " < " +
        (mn ? "k = " : "n = ") + std::to_string(own_rows) +
        ": experts' weights would overlap");
  const int64_t expert_rows = a.w_expert_rows != 0 ? a.w_expert_rows : own_rows;
  if ((static_cast<int64_t>(a.num_experts) - 1) * expert_rows + own_rows > INT32_MAX)
    return Status::InvalidArgument("grouped GEMM: the weights' rows overflow int32");
  if (a.expert_offsets == nullptr || a.w == nullptr)
    return Status::InvalidArgument("grouped GEMM: null weights or offsets");
  if (a.total_rows > 0 && (a.a == nullptr || a.c == nullptr))
    return Status::InvalidArgument("grouped GEMM: null activations or output");
  auto misaligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; };
  if (misaligned(a.a) || misaligned(a.w) || misaligned(a.c))
    return Status::InvalidArgument("grouped GEMM: A, W and C must be 16-byte aligned");
  if (a.swiglu_bwd_ab != nullptr) {
    if (a.out_type != GemmOutType::kBF16)
      return Status::InvalidArgument("grouped GEMM: the SwiGLU backward epilogue writes bf16 only");
    if (misaligned(a.swiglu_bwd_ab))
      return Status::InvalidArgument("grouped GEMM: swiglu_bwd_ab must be 16-byte aligned");
  }
  const int gated = (a.swiglu_bwd_slot_of_row != nullptr) + (a.swiglu_bwd_slot_gates != nullptr) +
                    (a.swiglu_bwd_h_gated != nullptr) + (a.swiglu_bwd_dgate_partial != nullptr);
  if (gated != 0 && (gated != 4 || a.swiglu_bwd_ab == nullptr))
    return Status::InvalidArgument(
        "grouped GEMM: the gated SwiGLU backward needs swiglu_bwd_ab and all four of its slot_of_row, "
        "slot_gates, h_gated and dgate_partial");
  if (gated != 0 && misaligned(a.swiglu_bwd_h_gated))
    return Status::InvalidArgument("grouped GEMM: swiglu_bwd_h_gated must be 16-byte aligned");
  if (a.swiglu_out != nullptr) {
    if (a.out_type != GemmOutType::kBF16 || a.w_layout != GemmWeightLayout::kKMajor ||
        a.n % 16 != 0 || a.swiglu_bwd_ab != nullptr)
      return Status::InvalidArgument(
          "grouped GEMM: the SwiGLU forward epilogue needs bf16 output, K-major weights, n a "
          "multiple of 16 and no SwiGLU backward epilogue");
    if (misaligned(a.swiglu_out))
      return Status::InvalidArgument("grouped GEMM: swiglu_out must be 16-byte aligned");
  }
  if ((a.logit_targets == nullptr) != (a.logit_target == nullptr))
    return Status::InvalidArgument("grouped GEMM: logit_targets and logit_target go together");
  if (a.logit_block_stats == nullptr && a.logit_targets != nullptr)
    return Status::InvalidArgument("grouped GEMM: logit_targets without logit_block_stats");
  if (a.logit_block_stats != nullptr &&
      (a.out_type != GemmOutType::kBF16 || mn || a.swiglu_bwd_ab != nullptr || a.swiglu_out != nullptr))
    return Status::InvalidArgument(
        "grouped GEMM: the log-prob head epilogue needs bf16 output, K-major weights and no SwiGLU epilogue");
  if (a.rope_table != nullptr) {
    if (a.rope_positions == nullptr || a.rope_columns < 0 || a.rope_columns % 128 != 0 || a.rope_columns > a.n ||
        a.n % 128 != 0 || a.out_type != GemmOutType::kBF16 || a.swiglu_bwd_ab != nullptr ||
        a.swiglu_out != nullptr || a.logit_block_stats != nullptr)
      return Status::InvalidArgument(
          "grouped GEMM: the rotary epilogue needs positions, rope_columns a multiple of 128 up to n, n a multiple "
          "of 128, bf16 output and no other epilogue");
  }
  return Status::OK();
}

Status QueryDevice(detail::DeviceInfo* info) {
  int dev = 0;
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(cudaGetDevice(&dev), "grouped GEMM: cudaGetDevice"));
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(
      cudaDeviceGetAttribute(&info->sm_count, cudaDevAttrMultiProcessorCount, dev), "SM count"));
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(
      cudaDeviceGetAttribute(&info->cc_major, cudaDevAttrComputeCapabilityMajor, dev), "cc"));
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(
      cudaDeviceGetAttribute(&info->cc_minor, cudaDevAttrComputeCapabilityMinor, dev), "cc"));
  GROVE_RETURN_IF_ERROR(detail::CudaStatus(
      cudaDeviceGetAttribute(&info->max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
      "shared memory limit"));
  return Status::OK();
}

// Whether `impl` (kAuto resolved) reads kMnMajor weights.
bool ReadsMnMajor(GroupedGemmImpl impl) {
  switch (impl) {
    case GroupedGemmImpl::kWgmmaBn128:
    case GroupedGemmImpl::kWgmmaBn256:
    case GroupedGemmImpl::kWgmmaPingpong:
    case GroupedGemmImpl::kWgmmaStaged:
    case GroupedGemmImpl::kMmaSync:
      return true;
    default:
      return false;
  }
}

// Whether `impl` (kAuto resolved) has the SwiGLU backward epilogue.
bool FusesSwiGluBackward(GroupedGemmImpl impl) {
  return impl == GroupedGemmImpl::kWgmmaStaged || impl == GroupedGemmImpl::kMmaSync;
}

}  // namespace

const char* GroupedGemmImplName(GroupedGemmImpl impl) {
  switch (impl) {
    case GroupedGemmImpl::kAuto: return "auto";
    case GroupedGemmImpl::kWgmmaBn128: return "wgmma_bn128";
    case GroupedGemmImpl::kWgmmaBn256: return "wgmma_bn256";
    case GroupedGemmImpl::kWgmmaBn256Bk32: return "wgmma_bn256_bk32";
    case GroupedGemmImpl::kWgmmaPingpong: return "wgmma_pingpong";
    case GroupedGemmImpl::kWgmmaCluster: return "wgmma_cluster";
    case GroupedGemmImpl::kWgmmaStaged: return "wgmma_staged";
    case GroupedGemmImpl::kMmaSync: return "mma_sync";
    case GroupedGemmImpl::kWmma: return "wmma";
  }
  return "unknown";
}

Status GroupedGemm(const GroupedGemmArgs& given, GroupedGemmImpl impl, cudaStream_t stream) {
  GROVE_RETURN_IF_ERROR(CheckArgs(given));
  const bool mn = given.w_layout == GemmWeightLayout::kMnMajor;
  if (mn && impl != GroupedGemmImpl::kAuto && !ReadsMnMajor(impl))
    return Status::InvalidArgument(std::string("grouped GEMM: ") + GroupedGemmImplName(impl) +
                                   " does not read MN-major weights");
  const bool swiglu = given.swiglu_bwd_ab != nullptr;
  if (swiglu && impl != GroupedGemmImpl::kAuto && !FusesSwiGluBackward(impl))
    return Status::InvalidArgument(std::string("grouped GEMM: ") + GroupedGemmImplName(impl) +
                                   " has no SwiGLU backward epilogue");
  const bool swiglu_fwd = given.swiglu_out != nullptr;
  // The epilogues only kWgmmaStaged has (sm_90).
  const char* staged_only = swiglu_fwd                                      ? "SwiGLU forward"
                            : given.swiglu_bwd_slot_of_row != nullptr ? "gated SwiGLU backward"
                            : given.rope_table != nullptr             ? "rotary embedding"
                                                                      : nullptr;
  if (staged_only && impl != GroupedGemmImpl::kAuto && impl != GroupedGemmImpl::kWgmmaStaged)
    return Status::InvalidArgument(std::string("grouped GEMM: ") + GroupedGemmImplName(impl) + " has no " +
                                   staged_only + " epilogue");
  // The epilogue only the register-epilogue wgmma kernels have (sm_90).
  const bool logit_stats = given.logit_block_stats != nullptr;
  if (logit_stats && impl != GroupedGemmImpl::kAuto && impl != GroupedGemmImpl::kWgmmaPingpong &&
      impl != GroupedGemmImpl::kWgmmaBn128 && impl != GroupedGemmImpl::kWgmmaBn256)
    return Status::InvalidArgument(std::string("grouped GEMM: ") + GroupedGemmImplName(impl) +
                                   " has no log-prob head epilogue");
  GroupedGemmArgs args = given;  // the launchers read w_expert_rows as set
  if (args.w_expert_rows == 0) args.w_expert_rows = mn ? args.k : args.n;
  if (args.total_rows == 0) return Status::OK();  // nothing routed anywhere
  detail::DeviceInfo dev;
  GROVE_RETURN_IF_ERROR(QueryDevice(&dev));
  // sm_90a machine code runs on compute capability 9.0 only.
  const bool hopper = dev.cc_major == 9 && dev.cc_minor == 0;
  if (staged_only && !hopper)
    return Status::FailedPrecondition(std::string("grouped GEMM: the ") + staged_only +
                                      " epilogue needs an sm_90 GPU (kWgmmaStaged)");
  if (logit_stats && !hopper)
    return Status::FailedPrecondition(
        "grouped GEMM: the log-prob head epilogue needs an sm_90 GPU (wgmma)");
  if (impl == GroupedGemmImpl::kAuto) {
    // Measured on an H100 (docs/kernels.md): at k >= 1024 the ping-pong
    // kernel is the fastest (its epilogue hides behind the other
    // warpgroup's main loop); at smaller k, where the epilogue weighs more,
    // the 128 x 256 tile with the staged epilogue (fp32: plain 128 x 256).
    // MN-major weights: the staged kernel at every k (kernel_bench --dx:
    // at the backward's dX shapes, k = 1024, 599 and 677 TFLOP/s where
    // ping-pong reads MN-major W tiles at 549 and 555). And at n >= 1024
    // with bf16 out (the model's forward of w1|w3 stacked: 196608 rows, n =
    // k = 1024, weights in place) staged again: 700 / 688 TFLOP/s (even /
    // skewed routing) against ping-pong's 614 / 611, gpu-ref step 187 vs
    // 188-191 ms (H100, kernel_bench --dx, GROVE_GROUPED_GEMM). All of these
    // read either weight layout. The SwiGLU epilogue: staged, which has it.
    // The SwiGLU forward epilogue: staged, the only one with it.
    const bool pingpong = !mn && !swiglu && !swiglu_fwd && !staged_only && args.k >= 1024 &&
                          (args.n < 1024 || args.out_type == GemmOutType::kF32);
    impl = !hopper       ? GroupedGemmImpl::kMmaSync
           : logit_stats ? GroupedGemmImpl::kWgmmaBn256
           : pingpong    ? GroupedGemmImpl::kWgmmaPingpong
                         : GroupedGemmImpl::kWgmmaStaged;
  }
  switch (impl) {
    case GroupedGemmImpl::kWgmmaBn128:
    case GroupedGemmImpl::kWgmmaBn256:
    case GroupedGemmImpl::kWgmmaBn256Bk32:
    case GroupedGemmImpl::kWgmmaPingpong:
    case GroupedGemmImpl::kWgmmaCluster:
    case GroupedGemmImpl::kWgmmaStaged: {
      if (!hopper)
        return Status::FailedPrecondition("grouped GEMM: the wgmma path needs an sm_90 GPU");
      using detail::WgmmaVariant;
      const WgmmaVariant variant =
          impl == GroupedGemmImpl::kWgmmaBn128       ? WgmmaVariant::kCooperativeBn128
          : impl == GroupedGemmImpl::kWgmmaBn256     ? WgmmaVariant::kCooperativeBn256
          : impl == GroupedGemmImpl::kWgmmaBn256Bk32 ? WgmmaVariant::kCooperativeBn256Bk32
          : impl == GroupedGemmImpl::kWgmmaPingpong  ? WgmmaVariant::kPingpongBn128
          : impl == GroupedGemmImpl::kWgmmaCluster   ? WgmmaVariant::kClusterBn256
                                                     : WgmmaVariant::kStagedBn256;
      return detail::LaunchGroupedGemmWgmma(args, dev, variant, stream);
    }
    case GroupedGemmImpl::kMmaSync:
    case GroupedGemmImpl::kWmma:
      if (dev.cc_major < 8)
        return Status::FailedPrecondition("grouped GEMM: needs an sm_80 or newer GPU");
      return impl == GroupedGemmImpl::kMmaSync
                 ? detail::LaunchGroupedGemmMmaSync(args, dev, stream)
                 : detail::LaunchGroupedGemmWmma(args, dev, stream);
    case GroupedGemmImpl::kAuto: break;
  }
  return Status::Internal("grouped GEMM: unknown implementation");
}

}  // namespace grove::kernels
