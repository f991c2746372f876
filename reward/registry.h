// VerifierRegistry: verifiers by name, from all three plug-in kinds.
//
//  * compiled in: the built-ins (builtin_verifiers.h) and any class named with
//    GROVE_REGISTER_VERIFIER in a source file linked into the program, or
//    added with Register();
//  * shared library: LoadPlugin("path/libmine.so") dlopens a library built
//    with GROVE_VERIFIER_PLUGIN (verifier.h) and registers it by its name;
//  * external program: RegisterExternal("name", {"python3 my.py"}) runs a
//    program speaking one JSON line per request (external_verifier.h).
//
// A registry is not thread-safe while being filled; Create() may be called
// concurrently once it is.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/config.h"
#include "base/result.h"
#include "reward/external_verifier.h"
#include "reward/verifier.h"

namespace grove::reward {

using VerifierFactory = std::function<std::unique_ptr<Verifier>()>;

class VerifierRegistry {
 public:
  // Starts with every compiled-in verifier.
  VerifierRegistry();

  // AlreadyExists when the name is taken; InvalidArgument for a bad name
  // (names are [a-z0-9_.-]+, so that "name:weight" specs stay unambiguous).
  Status Register(std::string name, VerifierFactory factory);
  // Returns the name the plug-in registered under.
  Result<std::string> LoadPlugin(const std::string& path);
  Status RegisterExternal(std::string name, ExternalVerifierOptions options);

  Result<std::unique_ptr<Verifier>> Create(std::string_view name) const;
  bool Has(std::string_view name) const;
  std::vector<std::string> Names() const;

 private:
  std::map<std::string, VerifierFactory, std::less<>> factories_;
};

// Adds the plug-ins a config section names to `registry`:
//   [reward]
//   plugins = ["build/lib/libcase_insensitive.so"]
//   [reward.external.answer_in_set]
//   command = "python3 examples/verifiers/external/answer_in_set.py"
//   timeout_ms = 2000        # optional, 2000 when absent
// Other keys of the section (e.g. the [reward.verifiers] weights) are left alone.
Status ConfigureRegistry(const Config& section, VerifierRegistry* registry);

// Adds a verifier to the compiled-in set that every registry starts with.
// Call before constructing registries (static initialisers are fine).
void RegisterCompiledInVerifier(std::string name, VerifierFactory factory);

}  // namespace grove::reward

// In a .cc linked into the program (not into a static library that the linker
// may drop): GROVE_REGISTER_VERIFIER(MyVerifier, "my_name");
#define GROVE_REGISTER_VERIFIER(ClassName, name_literal)                                  \
  static const bool grove_registered_##ClassName = [] {                                   \
    ::grove::reward::RegisterCompiledInVerifier(                                          \
        name_literal, [] { return std::unique_ptr<::grove::reward::Verifier>(new ClassName()); }); \
    return true;                                                                          \
  }()
