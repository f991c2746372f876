// A plug-in that misbehaves on request, to prove the scoring pool contains it:
// the completion "segfault" crashes, "hang" sleeps forever, "throw" throws,
// "nan" returns NaN; anything else scores 1.
#include <unistd.h>

#include <csignal>
#include <limits>
#include <stdexcept>

#include "reward/verifier.h"

namespace {

class MisbehavingVerifier final : public grove::reward::Verifier {
 public:
  grove::reward::VerifyOutput Verify(const grove::reward::VerifyInput& in) const override {
    if (in.completion == "segfault") std::raise(SIGSEGV);
    if (in.completion == "hang") {
      while (true) pause();
    }
    if (in.completion == "throw") throw std::runtime_error("plug-in gave up");
    if (in.completion == "nan") {
      return grove::reward::VerifyOutput::Make(std::numeric_limits<double>::quiet_NaN(), "nan");
    }
    return grove::reward::VerifyOutput::Make(1.0, "fine");
  }
};

}  // namespace

GROVE_VERIFIER_PLUGIN(MisbehavingVerifier, "misbehaving")
