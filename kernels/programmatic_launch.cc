#include "kernels/programmatic_launch.h"

namespace grove::kernels {
namespace {
thread_local bool programmatic_launch = false;
}  // namespace

bool ProgrammaticLaunchEnabled() { return programmatic_launch; }

ScopedProgrammaticLaunch::ScopedProgrammaticLaunch(bool enabled) : previous_(programmatic_launch) {
  programmatic_launch = enabled;
}
ScopedProgrammaticLaunch::~ScopedProgrammaticLaunch() { programmatic_launch = previous_; }

}  // namespace grove::kernels
