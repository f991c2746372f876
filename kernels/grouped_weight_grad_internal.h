// Internal to GroupedWeightGrad: the sm_90a launchers that grouped_weight_grad.cu
// dispatches to after checking the arguments and the device.
#pragma once

#include <cuda_runtime.h>

#include "base/status.h"
#include "kernels/grouped_weight_grad.h"

namespace grove::kernels::detail {

// tile_cols: 128 (WeightGradImpl::kWgmma) or 256 (kWgmmaN256).
Status LaunchWeightGradWgmma(const GroupedWeightGradArgs& args, int tile_cols,
                             cudaStream_t stream);

// impl: kTma or kTmaN128. total_rows > 0.
Status LaunchWeightGradTma(const GroupedWeightGradArgs& args, WeightGradImpl impl,
                           cudaStream_t stream);

}  // namespace grove::kernels::detail
