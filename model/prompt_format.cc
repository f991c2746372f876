#include "model/prompt_format.h"

namespace grove::model {

Result<std::vector<int32_t>> EncodePrompt(const Tokenizer& tokenizer, std::string_view text) {
  GROVE_ASSIGN_OR_RETURN(std::vector<int32_t> body, tokenizer.Encode(text));
  std::vector<int32_t> ids;
  ids.reserve(body.size() + 1);
  ids.push_back(tokenizer.bos_id());
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

Result<std::vector<int32_t>> EncodeCompletion(const Tokenizer& tokenizer, std::string_view text) {
  GROVE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer.Encode(text));
  ids.push_back(tokenizer.eos_id());
  return ids;
}

Result<std::string> DecodeCompletion(const Tokenizer& tokenizer, std::span<const int32_t> tokens) {
  if (!tokens.empty() && tokens.back() == tokenizer.eos_id()) tokens = tokens.first(tokens.size() - 1);
  std::string text;
  size_t run_start = 0;  // decode runs of known ids whole (a tokenizer may join pieces)
  for (size_t i = 0; i <= tokens.size(); ++i) {
    const bool known = i < tokens.size() && tokens[i] >= 0 && tokens[i] < tokenizer.vocab_size();
    if (known) continue;
    if (i > run_start) {
      GROVE_ASSIGN_OR_RETURN(std::string piece, tokenizer.Decode(tokens.subspan(run_start, i - run_start)));
      text += piece;
    }
    if (i < tokens.size()) text += kUnknownTokenText;
    run_start = i + 1;
  }
  return text;
}

}  // namespace grove::model
