#include "reward/registry.h"

#include <dlfcn.h>

#include <chrono>
#include <stdexcept>
#include <utility>

#include "reward/builtin_verifiers.h"
#include "reward/python_tests_verifier.h"

namespace grove::reward {
namespace {

using CompiledIn = std::vector<std::pair<std::string, VerifierFactory>>;

// The sandboxed code verifier checks bubblewrap when made; when it cannot
// work here, Create() reports why (the registry turns the exception into a
// Status naming the cause).
VerifierFactory PythonTestsFactory(bool all_or_nothing) {
  return [all_or_nothing]() -> std::unique_ptr<Verifier> {
    PythonTestsOptions options;
    options.all_or_nothing = all_or_nothing;
    Result<std::unique_ptr<Verifier>> v = MakePythonTestsVerifier(std::move(options));
    if (!v.ok()) throw std::runtime_error(v.status().ToString());
    return std::move(*v);
  };
}

CompiledIn& CompiledInVerifiers() {
  static CompiledIn* list = new CompiledIn{
      {"format", MakeFormatVerifier},     {"exact", MakeExactVerifier},
      {"countdown", MakeCountdownVerifier}, {"symbolic", MakeSymbolicVerifier},
      {"overlong", MakeOverlongVerifier},
      {"python_tests", PythonTestsFactory(false)}, {"python_tests_all", PythonTestsFactory(true)},
  };
  return *list;
}

bool ValidName(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.')) return false;
  }
  return true;
}

// Owns an object made by a plug-in and hands it back to the plug-in's deleter,
// so that allocation and release happen in the same library.
class PluginVerifier final : public Verifier {
 public:
  using Destroy = void (*)(Verifier*);
  PluginVerifier(Verifier* inner, Destroy destroy) : inner_(inner), destroy_(destroy) {}
  ~PluginVerifier() override { destroy_(inner_); }
  VerifyOutput Verify(const VerifyInput& in) const override { return inner_->Verify(in); }

 private:
  Verifier* inner_;
  Destroy destroy_;
};

}  // namespace

void RegisterCompiledInVerifier(std::string name, VerifierFactory factory) {
  CompiledInVerifiers().emplace_back(std::move(name), std::move(factory));
}

VerifierRegistry::VerifierRegistry() {
  for (const auto& [name, factory] : CompiledInVerifiers()) factories_.emplace(name, factory);
}

Status VerifierRegistry::Register(std::string name, VerifierFactory factory) {
  if (!ValidName(name)) return Status::InvalidArgument("bad verifier name '" + name + "': use [a-z0-9_.-]+");
  if (!factory) return Status::InvalidArgument("verifier '" + name + "' has no factory");
  if (factories_.count(name)) return Status::AlreadyExists("verifier '" + name + "' is already registered");
  factories_.emplace(std::move(name), std::move(factory));
  return Status::OK();
}

Result<std::string> VerifierRegistry::LoadPlugin(const std::string& path) {
  // RTLD_LOCAL keeps two plug-ins' symbols apart; the handle is never closed
  // because verifiers made from it may live until exit.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    return Status::NotFound("cannot load verifier plug-in " + path + ": " + (why ? why : "unknown error"));
  }
  auto version = reinterpret_cast<int (*)()>(dlsym(handle, "grove_verifier_abi_version"));
  auto name_fn = reinterpret_cast<const char* (*)()>(dlsym(handle, "grove_verifier_name"));
  auto create = reinterpret_cast<Verifier* (*)()>(dlsym(handle, "grove_verifier_create"));
  auto destroy = reinterpret_cast<void (*)(Verifier*)>(dlsym(handle, "grove_verifier_destroy"));
  if (!version || !name_fn || !create || !destroy) {
    return Status::InvalidArgument(path + " is not a grove verifier plug-in (no GROVE_VERIFIER_PLUGIN symbols)");
  }
  if (version() != GROVE_VERIFIER_ABI_TAG) {
    return Status::FailedPrecondition(path + " was built for verifier ABI " + std::to_string(version()) +
                                      ", this grove uses " + std::to_string(GROVE_VERIFIER_ABI_TAG) +
                                      "; rebuild it against this reward/verifier.h");
  }
  const char* raw_name = name_fn();
  std::string name = raw_name ? raw_name : "";
  // Make one now, so that a plug-in whose constructor fails is refused at load.
  Verifier* probe = create();
  if (probe == nullptr) return Status::Internal(path + ": grove_verifier_create returned null");
  destroy(probe);
  GROVE_RETURN_IF_ERROR(Register(name, [create, destroy]() -> std::unique_ptr<Verifier> {
    Verifier* v = create();
    if (v == nullptr) return nullptr;
    return std::make_unique<PluginVerifier>(v, destroy);
  }));
  return name;
}

Status VerifierRegistry::RegisterExternal(std::string name, ExternalVerifierOptions options) {
  if (options.command.empty()) return Status::InvalidArgument("external verifier '" + name + "' has no command");
  if (options.timeout.count() <= 0) return Status::InvalidArgument("external verifier '" + name + "' needs a positive timeout");
  return Register(std::move(name), [options] { return MakeExternalVerifier(options); });
}

Result<std::unique_ptr<Verifier>> VerifierRegistry::Create(std::string_view name) const {
  auto it = factories_.find(name);
  if (it == factories_.end()) {
    std::string known;
    for (const auto& [n, f] : factories_) known += (known.empty() ? "" : ", ") + n;
    return Status::NotFound("no verifier named '" + std::string(name) + "' (known: " + known + ")");
  }
  std::unique_ptr<Verifier> v;
  try {
    v = it->second();
  } catch (const std::exception& e) {
    return Status::Internal("verifier '" + std::string(name) + "' failed to construct: " + e.what());
  } catch (...) {
    return Status::Internal("verifier '" + std::string(name) + "' failed to construct");
  }
  if (!v) return Status::Internal("factory of verifier '" + std::string(name) + "' returned null");
  return v;
}

bool VerifierRegistry::Has(std::string_view name) const { return factories_.find(name) != factories_.end(); }

std::vector<std::string> VerifierRegistry::Names() const {
  std::vector<std::string> names;
  for (const auto& [n, f] : factories_) names.push_back(n);
  return names;
}

Status ConfigureRegistry(const Config& section, VerifierRegistry* registry) {
  GROVE_ASSIGN_OR_RETURN(std::vector<std::string> plugins, section.StringList("plugins", std::vector<std::string>{}));
  for (const std::string& path : plugins) {
    Result<std::string> name = registry->LoadPlugin(path);
    if (!name.ok()) return name.status().WithContext(section.source());
  }
  Config external = section.Section("external");
  for (const std::string& name : external.Keys()) {
    Config one = external.Section(name);
    GROVE_RETURN_IF_ERROR(one.CheckKeys({"command", "timeout_ms"}));
    ExternalVerifierOptions options;
    GROVE_ASSIGN_OR_RETURN(options.command, one.String("command"));
    GROVE_ASSIGN_OR_RETURN(int64_t timeout_ms, one.Int("timeout_ms", 2000));
    options.timeout = std::chrono::milliseconds(timeout_ms);
    GROVE_RETURN_IF_ERROR(registry->RegisterExternal(name, options).WithContext(section.source()));
  }
  return Status::OK();
}

}  // namespace grove::reward
