// Where a completion's answer is, and whether its tags are in order.
//
// The policy is asked to write "<think>...</think><answer>...</answer>". The
// accuracy verifiers score only the text inside the single <answer> block that
// follows the thinking; an answer written only inside <think>, or two answer
// blocks, is no answer. Both functions are linear in the completion and never
// allocate more than the answer itself.
#pragma once

#include <string>
#include <string_view>

namespace grove::reward {

struct AnswerBlock {
  bool found = false;
  std::string_view text;  // inside <answer>...</answer>, untrimmed; a view into the completion
  std::string error;      // why not found ("no <answer> block", "2 <answer> blocks", ...)
};

AnswerBlock ExtractAnswer(std::string_view completion);

// Empty when `completion` is exactly: optional whitespace, <think>, text,
// </think>, optional whitespace, <answer>, text, </answer>, optional
// whitespace, with each tag once. Otherwise the first rule broken.
std::string CheckFormat(std::string_view completion);

// Strips ASCII whitespace from both ends.
std::string_view TrimSpace(std::string_view s);

// A short printable rendering of untrusted text for reasons: at most
// `max_chars` characters, bytes outside printable ASCII as '?'.
std::string Snippet(std::string_view s, size_t max_chars = 24);

}  // namespace grove::reward
