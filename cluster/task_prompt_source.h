// TaskPromptSource: the coordinator's prompts from a task generator's train
// split, in index order. Problems are a pure function of (task seed, index),
// so the stream is reproducible from the config.
#pragma once

#include <cstdint>
#include <memory>

#include "cluster/prompt_source.h"
#include "reward/task.h"

namespace grove {

class TaskPromptSource final : public PromptSource {
 public:
  explicit TaskPromptSource(std::unique_ptr<reward::Task> task, uint64_t first_index = 0)
      : task_(std::move(task)), next_(first_index) {}
  std::optional<Prompt> Next() override;

 private:
  std::unique_ptr<reward::Task> task_;
  uint64_t next_;
};

}  // namespace grove
