// Random weights for benchmarks of big models: model::Model::Create's init
// distribution (N(0, init_std), output projections wo/w2 scaled by
// 1/sqrt(2*layers), norms 1, router bias 0), filled per tensor on all cores
// with per-tensor seeded generators. Same distribution as Create, different
// values; minutes faster for the GPU reference model.
#pragma once

#include <cstdint>

#include "model/transformer.h"

namespace grove::bench {

void FastInit(model::Model& m, uint64_t seed);

}  // namespace grove::bench
