// A strict reader of Prometheus text exposition for the ops tests: every
// line must be a comment (# ...), blank, or `name{label="v",...} value`.
#pragma once

#include <map>
#include <string>

#include "base/result.h"

namespace grove::testing {

// Samples keyed by `name{labels}` exactly as written, e.g.
// grove_actor_restarts{role="rollout",id="rollout-0"}.
using Samples = std::map<std::string, double>;
Result<Samples> ParseExposition(const std::string& text);

}  // namespace grove::testing
