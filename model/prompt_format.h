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
// The replacement character (U+FFFD, UTF-8) a completion shows for an id its
// tokenizer does not have.
inline constexpr std::string_view kUnknownTokenText = "\xEF\xBF\xBD";

// The text of completion tokens, a trailing <eos> dropped. A model's vocab
// may be padded past the tokenizer's (GPU kernels want multiples of 8) and a
// model can emit those ids: each id outside [0, tokenizer.vocab_size())
// becomes kUnknownTokenText, which no verifier accepts as an answer, instead
// of an error that would stop an evaluation or a worker.
Result<std::string> DecodeCompletion(const Tokenizer& tokenizer, std::span<const int32_t> tokens);

}  // namespace grove::model
