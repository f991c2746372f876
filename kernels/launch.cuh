// LaunchKernel: a kernel launch that carries the programmatic-dependent-
// launch attribute when kernels/programmatic_launch.h's setting is on for
// this thread. Only for kernels that call ptx::griddepcontrol_wait() before
// their first access to memory an earlier kernel of the stream writes (and
// before their first write to memory an earlier kernel reads): that wait is
// what makes the early start safe.
#pragma once

#include <cuda_runtime.h>

#include "kernels/programmatic_launch.h"

namespace grove::kernels {

template <typename... Params, typename... Args>
cudaError_t LaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                         Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = ProgrammaticLaunchEnabled() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace grove::kernels
