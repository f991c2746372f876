// Tasks: where prompts, their reference data and their verifiers come from.
//
// A task generates problems from (seed, split, index) alone, so any process
// can regenerate any problem, and a run is reproducible from its config. The
// eval split is held out by construction: a problem belongs to the eval split
// exactly when a hash of its prompt falls in the eval bucket, so no eval
// prompt can ever appear in training, for any seed or index.
//
// Prompts are short plain text over the character-level tokenizer's set:
// digits, + - * / ( ) = . , space, a-z, ^ and newline. Each problem also has a
// demonstration: a short correct "<think>..</think><answer>..</answer>"
// completion for the supervised warm-start before RL.
//
// Tasks by name (config keys, all optional, defaults in brackets):
//   arithmetic  seed[1] min_digits[1] max_digits[2] ops["+-*"] eval_fraction[0.1]
//               prompt "12+7=", answer "19"; verifiers "format:0.1,exact:1"
//   countdown   seed[1] count[3] max_number[20] max_target[200] eval_fraction[0.1]
//               prompt "use 3 7 12 to make 33", answer e.g. "(3*7)+12";
//               verifiers "format:0.1,countdown:1"
//   symbolic    seed[1] max_degree[3] max_coefficient[5] modes["diff,expand"] eval_fraction[0.1]
//               prompt "diff 3x^2+2x-1" or "expand (x+2)(x-3)";
//               verifiers "format:0.1,symbolic:1"
//   python      seed[1] tests[5] max_n[1000] eval_fraction[0.1]
//               prompt "read n, print 3*n+2" (also n*n+b, n mod a, c*x+a*y, digit
//               sum); reference {"tests": [{"input": "7\n", "output": "23\n"}, ...]}
//               hidden cases with inputs in [0, max_n]; the demonstration's
//               answer is the program. Verifiers "format:0.1,python_tests:1"
//               (runs the program in the bubblewrap sandbox).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/config.h"
#include "base/result.h"

namespace grove::reward {

enum class Split { kTrain, kEval };

struct Problem {
  std::string prompt;
  std::string reference;      // JSON text for the verifiers
  std::string demonstration;  // a correct completion
};

class Task {
 public:
  virtual ~Task() = default;
  virtual std::string_view name() const = 0;
  // Deterministic in (the task's seed and config, split, index).
  virtual Problem Generate(Split split, uint64_t index) const = 0;
  // The weighted verifier spec that scores this task ("format:0.1,exact:1").
  virtual std::string verifier_spec() const = 0;
};

// NotFound for an unknown name; InvalidArgument for a bad or unknown config key.
Result<std::unique_ptr<Task>> MakeTask(std::string_view name, const Config& section);
std::vector<std::string> TaskNames();

// True when the character-level tokenizer can spell `text` (see above).
bool IsPromptText(std::string_view text);

}  // namespace grove::reward
