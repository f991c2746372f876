// Verifier: the one interface a reward plug-in implements.
//
// A verifier reads one sample -- the prompt, the completion the policy wrote,
// and the task's reference data as JSON text -- and returns a reward with a
// short reason and optional named sub-scores. This header needs nothing from
// grove but the C++ standard library, so a plug-in can be built against it
// alone (as a class compiled into grove, or as a shared library loaded by
// path; see docs/verifiers.md).
//
// Contract for implementers:
//  * Verify() is const and may be called from several threads at once; keep
//    any mutable state behind your own lock.
//  * Verify() must not throw and must return a finite reward. grove scores in
//    worker processes, so a verifier that throws, crashes, hangs, runs out of
//    memory or returns NaN costs that one sample a reward of 0 with a reason;
//    it never takes down the caller. Do not rely on that: it is slow.
//  * The completion is untrusted model output: any bytes (not always valid
//    UTF-8), any length. Bound your own work on it.
//  * `reason` is for people reading logs: a short phrase ("ok", "no <answer>
//    block"), not an echo of the input.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace grove::reward {

// Bumped whenever a type below changes layout or meaning. A shared-library
// plug-in reports the version it was built with; the loader refuses others.
inline constexpr int kVerifierAbiVersion = 1;

struct VerifyInput {
  std::string_view prompt;
  std::string_view completion;
  std::string_view reference;  // JSON text from the task ("" when none)
  long long token_count = -1;  // completion length in tokens; -1 when unknown
};

struct SubScore {
  std::string name;
  double value = 0.0;
};

struct VerifyOutput {
  double reward = 0.0;
  std::string reason;
  std::vector<SubScore> scores;  // optional detail, e.g. one per component

  static VerifyOutput Make(double reward, std::string reason) {
    VerifyOutput out;
    out.reward = reward;
    out.reason = std::move(reason);
    return out;
  }
};

class Verifier {
 public:
  virtual ~Verifier() = default;
  virtual VerifyOutput Verify(const VerifyInput& input) const = 0;
};

}  // namespace grove::reward

// Shared-library plug-ins: put GROVE_VERIFIER_PLUGIN(MyVerifier, "my_name") in
// exactly one source file of the library. It exports the C symbols the loader
// looks for: the ABI version (with the C++ library ABI folded in, since the
// types above hold std::string), the name to register under, and a factory
// and deleter so that the object is created and destroyed by the same library.
#if defined(_GLIBCXX_USE_CXX11_ABI) && _GLIBCXX_USE_CXX11_ABI == 0
#define GROVE_VERIFIER_STDLIB_ABI 0
#else
#define GROVE_VERIFIER_STDLIB_ABI 1
#endif
#define GROVE_VERIFIER_ABI_TAG (::grove::reward::kVerifierAbiVersion * 10 + GROVE_VERIFIER_STDLIB_ABI)

#define GROVE_VERIFIER_PLUGIN(ClassName, name_literal)                                        \
  extern "C" __attribute__((visibility("default"))) int grove_verifier_abi_version() {        \
    return GROVE_VERIFIER_ABI_TAG;                                                            \
  }                                                                                           \
  extern "C" __attribute__((visibility("default"))) const char* grove_verifier_name() {       \
    return name_literal;                                                                      \
  }                                                                                           \
  extern "C" __attribute__((visibility("default"))) ::grove::reward::Verifier*                \
  grove_verifier_create() {                                                                   \
    try {                                                                                     \
      return new ClassName();                                                                 \
    } catch (...) {                                                                           \
      return nullptr;                                                                         \
    }                                                                                         \
  }                                                                                           \
  extern "C" __attribute__((visibility("default"))) void grove_verifier_destroy(              \
      ::grove::reward::Verifier* v) {                                                         \
    delete v;                                                                                 \
  }
