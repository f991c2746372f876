// Fuzz target: experiment files. Config::Parse, every typed getter and
// Override on the parsed tree, then each role's parser of its section:
// model::ModelConfig::FromConfig, learner::ParseGrpoConfig,
// replay::ReplayOptionsFromConfig and reward::MakeTask (which generates
// problems from the config, so a hostile config must not make it loop or
// allocate without bound).
//
// Input: TOML text; if it holds a NUL byte, the text after the first NUL is
// an --set style assignment ("a.b=1") applied with Config::Override.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/config.h"
#include "learner/grpo_config.h"
#include "model/config.h"
#include "replay/replay_config.h"
#include "reward/task.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using grove::Config;
namespace fuzz = grove::fuzz;

// Reads `path` with every getter; each must return a value or an error.
void ReadEveryWay(const Config& c, std::string_view path) {
  uint64_t h = c.Has(path);
  if (auto v = c.Int(path); v.ok()) h += static_cast<uint64_t>(v.value());
  if (auto v = c.Int(path, 3); v.ok()) h += static_cast<uint64_t>(v.value());
  if (auto v = c.Double(path); v.ok()) h += static_cast<uint64_t>(v.value() == v.value());
  if (auto v = c.Bool(path, false); v.ok()) h += v.value();
  if (auto v = c.String(path); v.ok()) h += v.value().size();
  if (auto v = c.IntList(path); v.ok()) h += v.value().size();
  if (auto v = c.DoubleList(path); v.ok()) h += v.value().size();
  if (auto v = c.StringList(path); v.ok()) h += v.value().size();
  if (auto v = c.TableArray(path); v.ok()) {
    for (const Config& t : v.value()) h += t.Keys().size();
  }
  h += c.Section(path).Keys().size();
  fuzz::Sink(h);
}

// Walks the tree: every key, two levels deep, read every way.
void ReadTree(const Config& c, int depth) {
  for (const std::string& key : c.Keys()) {
    ReadEveryWay(c, key);
    if (depth < 2) ReadTree(c.Section(key), depth + 1);
  }
  fuzz::Sink(c.CheckKeys({"model", "learner", "replay", "task"}).ok());
}

void RoleParsers(const Config& root) {
  // Model: a config that parses must survive its own JSON round trip
  // (checkpoints carry it as JSON and rebuild it with FromJson).
  if (auto mc = grove::model::ModelConfig::FromConfig(root.Section("model")); mc.ok()) {
    const std::string json = mc.value().ToJson();
    auto back = grove::model::ModelConfig::FromJson(json);
    if (!back.ok()) fuzz::Fail(__FILE__, __LINE__, "ModelConfig JSON round trip: " + back.status().ToString());
    GROVE_FUZZ_CHECK(back.value().ToJson() == json);
    fuzz::Sink(static_cast<uint64_t>(mc.value().ActiveParams()));
  }
  fuzz::Sink(grove::learner::ParseGrpoConfig(root).ok());
  fuzz::Sink(grove::replay::ReplayOptionsFromConfig(root.Section("replay")).ok());

  Config task_cfg = root.Section("task");
  auto name = task_cfg.String("name", "arithmetic");
  if (!name.ok()) return;
  auto task = grove::reward::MakeTask(name.value(), task_cfg);
  if (!task.ok()) return;
  for (auto split : {grove::reward::Split::kTrain, grove::reward::Split::kEval}) {
    for (uint64_t i = 0; i < 3; ++i) {
      grove::reward::Problem p = task.value()->Generate(split, i);
      // Prompts must be spellable by the character tokenizer.
      GROVE_FUZZ_CHECK(grove::reward::IsPromptText(p.prompt));
      fuzz::Sink(p.reference.size() + p.demonstration.size());
    }
  }
  fuzz::Sink(task.value()->verifier_spec().size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 * 1024) return 0;  // experiment files are small; keeps runs fast
  std::string_view all(reinterpret_cast<const char*>(data), size);
  std::string_view toml = all;
  std::string_view assignment;
  if (size_t nul = all.find('\0'); nul != std::string_view::npos) {
    toml = all.substr(0, nul);
    assignment = all.substr(nul + 1);
  }
  auto parsed = Config::Parse(toml, "fuzz.toml");
  if (!parsed.ok()) return 0;
  Config config = std::move(parsed).value();
  if (!assignment.empty()) fuzz::Sink(config.Override(assignment).ok());

  ReadTree(config, 0);
  for (std::string_view path : {"model.hidden", "learner.grpo.clip_eps", "a.b.c", "", ".", "x..y"}) {
    ReadEveryWay(config, path);
  }
  // What ToToml writes must parse again to the same text.
  const std::string text = config.ToToml();
  auto again = Config::Parse(text, "fuzz-roundtrip.toml");
  if (!again.ok()) fuzz::Fail(__FILE__, __LINE__, "ToToml output does not parse: " + again.status().ToString());
  GROVE_FUZZ_CHECK(again.value().ToToml() == text);

  RoleParsers(config);
  return 0;
}
