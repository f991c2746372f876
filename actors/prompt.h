// Prompt: one unit of work as roles and prompt sources see it, free of the
// wire format (the coordinator and ActorClient convert).
#pragma once

#include <cstdint>
#include <string>

namespace grove {

struct Prompt {
  uint64_t id = 0;         // assigned by the coordinator's cursor; unique per run
  std::string task;        // task name, e.g. "arithmetic"
  std::string text;        // the prompt as the model sees it
  std::string reference;   // the task's reference data, JSON
  std::string split = "train";
};

}  // namespace grove
