// How task text becomes model tokens and back, the same for the rollout
// worker, the learner's warm-start and evaluation: a prompt is <bos> then its
// text; a completion is the model's tokens up to and including <eos>; the
// text verifiers see is the completion without the <eos>.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "model/tokenizer.h"

namespace grove::model {

Result<std::vector<int32_t>> EncodePrompt(const Tokenizer& tokenizer, std::string_view text);
// A demonstration (or any target completion text) followed by <eos>.
Result<std::vector<int32_t>> EncodeCompletion(const Tokenizer& tokenizer, std::string_view text);
// The text of completion tokens, a trailing <eos> dropped.
Result<std::string> DecodeCompletion(const Tokenizer& tokenizer, std::span<const int32_t> tokens);

}  // namespace grove::model
