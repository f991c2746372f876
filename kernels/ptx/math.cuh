// Special-function-unit math instructions.
#pragma once

namespace grove::ptx {

// ex2.approx.ftz.f32: 2^x to ~2^-22 relative error in one MUFU op; subnormal
// inputs and results flush to zero, 2^-inf = +0. exp2f() adds instructions
// around it for subnormals unless the unit is built with -ftz=true.
__device__ __forceinline__ float ex2_approx_ftz_f32(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace grove::ptx
