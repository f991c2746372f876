// Programmatic dependent launch (sm_90): the two griddepcontrol
// instructions. A grid launched with cudaLaunchAttributeProgrammatic-
// StreamSerialization may start before the grid ahead of it in the stream
// has finished; it must call griddepcontrol_wait() before it touches memory
// that grid writes (or reads what it overwrites). Both are no-ops in a grid
// launched without the attribute, so a kernel that calls them is correct
// either way. Below sm_90 they compile to nothing (no such launches exist).
#pragma once

namespace grove::ptx {

// griddepcontrol.wait: blocks until every prerequisite grid has completed
// and its memory operations are visible to this grid.
__device__ __forceinline__ void griddepcontrol_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// griddepcontrol.launch_dependents: this CTA no longer holds back the launch
// of the dependent grid (which starts once every CTA of this grid has said so
// or exited). Scheduling only: the dependent still waits for this grid's
// completion in its own griddepcontrol_wait().
__device__ __forceinline__ void griddepcontrol_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace grove::ptx
