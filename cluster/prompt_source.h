// PromptSource: where the coordinator's prompts come from. Task generators
// implement it; the coordinator pulls one prompt at a time, only when a
// worker asks for work, so a source may be infinite.
#pragma once

#include <optional>

#include "actors/prompt.h"

namespace grove {

class PromptSource {
 public:
  virtual ~PromptSource() = default;
  // The next prompt, or nullopt when there is none now (exhausted, or not
  // ready yet: the coordinator asks again on the next WorkRequest). The
  // coordinator overwrites Prompt::id with its own cursor.
  virtual std::optional<Prompt> Next() = 0;
};

}  // namespace grove
