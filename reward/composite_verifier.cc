#include "reward/composite_verifier.h"

#include <charconv>
#include <cmath>
#include <sstream>

#include "reward/answer.h"

namespace grove::reward {
namespace {

class CompositeVerifier final : public Verifier {
 public:
  struct Part {
    std::string name;
    double weight;
    std::unique_ptr<Verifier> verifier;
  };
  explicit CompositeVerifier(std::vector<Part> parts) : parts_(std::move(parts)) {}

  VerifyOutput Verify(const VerifyInput& in) const override {
    VerifyOutput out;
    for (const Part& part : parts_) {
      VerifyOutput one;
      try {
        one = part.verifier->Verify(in);
        if (!std::isfinite(one.reward)) one = VerifyOutput::Make(0.0, "non-finite reward");
      } catch (const std::exception& e) {
        one = VerifyOutput::Make(0.0, "threw: " + Snippet(e.what(), 80));
      } catch (...) {
        one = VerifyOutput::Make(0.0, "threw a non-exception");
      }
      out.reward += part.weight * one.reward;
      out.scores.push_back({part.name, one.reward});
      for (const SubScore& sub : one.scores) {
        if (std::isfinite(sub.value)) out.scores.push_back({part.name + "." + sub.name, sub.value});
      }
      if (parts_.size() == 1) {
        out.reason = one.reason;
      } else {
        if (!out.reason.empty()) out.reason += "; ";
        out.reason += part.name + ": " + one.reason;
      }
    }
    return out;
  }

 private:
  std::vector<Part> parts_;
};

Status CheckSpec(const std::vector<WeightedVerifier>& spec) {
  if (spec.empty()) return Status::InvalidArgument("verifier spec names no verifier");
  for (size_t i = 0; i < spec.size(); ++i) {
    if (!std::isfinite(spec[i].weight)) return Status::InvalidArgument("weight of " + spec[i].name + " is not finite");
    for (size_t j = 0; j < i; ++j) {
      if (spec[j].name == spec[i].name) return Status::InvalidArgument("verifier " + spec[i].name + " named twice");
    }
  }
  return Status::OK();
}

}  // namespace

Result<std::vector<WeightedVerifier>> ParseVerifierSpec(std::string_view spec) {
  std::vector<WeightedVerifier> out;
  while (!spec.empty()) {
    size_t comma = spec.find(',');
    std::string_view item = TrimSpace(spec.substr(0, comma));
    spec = comma == std::string_view::npos ? std::string_view() : spec.substr(comma + 1);
    if (item.empty()) return Status::InvalidArgument("empty entry in verifier spec");
    WeightedVerifier w;
    size_t colon = item.rfind(':');
    if (colon == std::string_view::npos) {
      w.name = std::string(item);
    } else {
      w.name = std::string(TrimSpace(item.substr(0, colon)));
      std::string weight(TrimSpace(item.substr(colon + 1)));
      char* end = nullptr;
      w.weight = std::strtod(weight.c_str(), &end);
      if (weight.empty() || end != weight.c_str() + weight.size()) {
        return Status::InvalidArgument("bad weight '" + weight + "' for verifier " + w.name);
      }
    }
    if (w.name.empty()) return Status::InvalidArgument("verifier spec entry without a name");
    out.push_back(std::move(w));
  }
  GROVE_RETURN_IF_ERROR(CheckSpec(out));
  return out;
}

Result<std::vector<WeightedVerifier>> VerifierSpecFromConfig(const Config& section) {
  std::vector<WeightedVerifier> out;
  for (const std::string& key : section.Keys()) {
    GROVE_ASSIGN_OR_RETURN(double weight, section.Double(key));
    out.push_back({key, weight});
  }
  GROVE_RETURN_IF_ERROR(CheckSpec(out).WithContext(section.source()));
  return out;
}

std::string FormatVerifierSpec(const std::vector<WeightedVerifier>& spec) {
  std::ostringstream os;
  for (size_t i = 0; i < spec.size(); ++i) os << (i ? "," : "") << spec[i].name << ":" << spec[i].weight;
  return os.str();
}

Result<std::unique_ptr<Verifier>> MakeCompositeVerifier(const VerifierRegistry& registry,
                                                        const std::vector<WeightedVerifier>& spec) {
  GROVE_RETURN_IF_ERROR(CheckSpec(spec));
  std::vector<CompositeVerifier::Part> parts;
  for (const WeightedVerifier& w : spec) {
    GROVE_ASSIGN_OR_RETURN(std::unique_ptr<Verifier> v, registry.Create(w.name));
    parts.push_back({w.name, w.weight, std::move(v)});
  }
  return std::unique_ptr<Verifier>(std::make_unique<CompositeVerifier>(std::move(parts)));
}

}  // namespace grove::reward
