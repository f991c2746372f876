// A CUDA runtime error as a grove Status (for the .cc files of grove_nccl;
// needs the CUDA headers, so public headers never include it).
#pragma once

#include <string>

#include <cuda_runtime_api.h>

#include "base/status.h"

namespace grove::actors {

// OK for cudaSuccess; otherwise `code`'s status naming `what` and the CUDA
// error, which is cleared so that the next call does not report it again.
inline Status CudaStatus(cudaError_t e, const char* what, StatusCode code = StatusCode::kInternal) {
  if (e == cudaSuccess) return Status::OK();
  cudaGetLastError();
  return Status(code, std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace grove::actors
