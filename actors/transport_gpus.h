// How many GPUs this process can move weights with (NCCL or CUDA IPC): the
// visible CUDA devices in a build with NCCL, 0 in one without. The one place
// the learner's and the workers' transport choice asks it (inline: the
// answer depends on how the including target was built, GROVE_WITH_NCCL).
#pragma once

#ifdef GROVE_WITH_NCCL
#include "actors/nccl_group.h"
#endif

namespace grove::actors {

inline int TransportGpuCount() {
#ifdef GROVE_WITH_NCCL
  return CudaDeviceCount();
#else
  return 0;
#endif
}

}  // namespace grove::actors
