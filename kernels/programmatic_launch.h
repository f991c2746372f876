// Whether this thread's kernel launches of the decode chain use programmatic
// dependent launch (PDL, sm_90): cudaLaunchAttributeProgrammaticStream-
// Serialization on each launch, so a kernel's CTAs may be scheduled while its
// predecessor in the stream still runs and do their independent prologue
// (addresses, weight prefetch) before griddepcontrol.wait.
//
// An ambient, thread-local setting rather than a parameter of every launcher
// (QuantLinear, PagedKvAppend, RouterTopK, MoeDecodeForward, ...): the caller
// that owns a whole chain of launches (GpuGenerator's decode step) turns it on
// around the chain, as stream capture is turned on around it. Every kernel
// launched through kernels/launch.cuh's LaunchKernel calls griddepcontrol.wait
// before touching memory a predecessor writes, so a launch with the attribute
// is correct after any predecessor; kernels launched otherwise never carry it.
//
// Host header, no CUDA.
#pragma once

namespace grove::kernels {

// True inside a ScopedProgrammaticLaunch(true) on this thread.
bool ProgrammaticLaunchEnabled();

// Sets the thread's setting for its lifetime, restoring the previous one.
class ScopedProgrammaticLaunch {
 public:
  explicit ScopedProgrammaticLaunch(bool enabled);
  ~ScopedProgrammaticLaunch();
  ScopedProgrammaticLaunch(const ScopedProgrammaticLaunch&) = delete;
  ScopedProgrammaticLaunch& operator=(const ScopedProgrammaticLaunch&) = delete;

 private:
  bool previous_;
};

}  // namespace grove::kernels
