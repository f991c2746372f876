// Internal to the grouped GEMM: the per-implementation launchers that
// grouped_gemm.cu dispatches to after checking the arguments.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "base/status.h"
#include "kernels/grouped_gemm.h"

namespace grove::kernels::detail {

struct DeviceInfo {
  int sm_count = 0;
  int cc_major = 0;
  int cc_minor = 0;
  int max_smem_optin = 0;
};

inline Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

enum class WgmmaVariant {
  kCooperativeBn128,
  kCooperativeBn256,
  kCooperativeBn256Bk32,
  kPingpongBn128,
  kClusterBn256,
  kStagedBn256,
};
Status LaunchGroupedGemmWgmma(const GroupedGemmArgs& args, const DeviceInfo& dev,
                              WgmmaVariant variant, cudaStream_t stream);
Status LaunchGroupedGemmMmaSync(const GroupedGemmArgs& args, const DeviceInfo& dev,
                                cudaStream_t stream);
Status LaunchGroupedGemmWmma(const GroupedGemmArgs& args, const DeviceInfo& dev,
                             cudaStream_t stream);

}  // namespace grove::kernels::detail
