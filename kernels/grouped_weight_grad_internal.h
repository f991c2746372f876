// Internal to GroupedWeightGrad: the sm_90a launcher that grouped_weight_grad.cu
// dispatches to after checking the arguments and the device.
#pragma once

#include <cuda_runtime.h>

#include "base/status.h"
#include "kernels/grouped_weight_grad.h"

namespace grove::kernels::detail {

// tile_cols: 128 (WeightGradImpl::kWgmma) or 256 (kWgmmaN256).
Status LaunchWeightGradWgmma(const GroupedWeightGradArgs& args, int tile_cols,
                             cudaStream_t stream);

}  // namespace grove::kernels::detail
