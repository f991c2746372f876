#include "cluster/task_prompt_source.h"

namespace grove {

std::optional<Prompt> TaskPromptSource::Next() {
  reward::Problem p = task_->Generate(reward::Split::kTrain, next_++);
  Prompt out;
  out.task = std::string(task_->name());
  out.text = std::move(p.prompt);
  out.reference = std::move(p.reference);
  return out;
}

}  // namespace grove
