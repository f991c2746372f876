#include "reward/answer.h"

#include <cstddef>

namespace grove::reward {
namespace {

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
constexpr std::string_view kAnswerOpen = "<answer>";
constexpr std::string_view kAnswerClose = "</answer>";

size_t CountOf(std::string_view hay, std::string_view needle) {
  size_t n = 0;
  for (size_t pos = hay.find(needle); pos != std::string_view::npos;
       pos = hay.find(needle, pos + needle.size())) {
    ++n;
  }
  return n;
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

}  // namespace

std::string_view TrimSpace(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && IsSpace(s[b])) ++b;
  while (e > b && IsSpace(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::string Snippet(std::string_view s, size_t max_chars) {
  std::string out;
  for (size_t i = 0; i < s.size() && out.size() < max_chars; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    out.push_back(c >= 0x20 && c < 0x7f ? static_cast<char>(c) : '?');
  }
  if (s.size() > max_chars) out += "...";
  return out;
}

AnswerBlock ExtractAnswer(std::string_view completion) {
  AnswerBlock block;
  // The answer must come after the thinking, when there is thinking.
  std::string_view after_think = completion;
  size_t think_close = completion.rfind(kThinkClose);
  if (think_close != std::string_view::npos) {
    after_think = completion.substr(think_close + kThinkClose.size());
  }
  const size_t total = CountOf(completion, kAnswerOpen);
  if (total > 1) {
    block.error = std::to_string(total) + " <answer> blocks";
    return block;
  }
  if (CountOf(after_think, kAnswerOpen) == 0) {
    block.error = total > 0 ? "answer only inside <think>" : "no <answer> block";
    return block;
  }
  size_t open = after_think.find(kAnswerOpen);
  size_t begin = open + kAnswerOpen.size();
  size_t close = after_think.find(kAnswerClose, begin);
  if (close == std::string_view::npos) {
    block.error = "unclosed <answer> block";
    return block;
  }
  block.found = true;
  block.text = after_think.substr(begin, close - begin);
  return block;
}

std::string CheckFormat(std::string_view completion) {
  for (std::string_view tag : {kThinkOpen, kThinkClose, kAnswerOpen, kAnswerClose}) {
    size_t n = CountOf(completion, tag);
    if (n != 1) return std::string(tag) + (n == 0 ? " missing" : " appears " + std::to_string(n) + " times");
  }
  std::string_view rest = TrimSpace(completion);
  if (!rest.starts_with(kThinkOpen)) return "text before <think>";
  size_t think_close = rest.find(kThinkClose);
  size_t answer_open = rest.find(kAnswerOpen);
  size_t answer_close = rest.find(kAnswerClose);
  if (!(think_close < answer_open && answer_open < answer_close)) return "tags out of order";
  if (!TrimSpace(rest.substr(think_close + kThinkClose.size(), answer_open - think_close - kThinkClose.size()))
           .empty()) {
    return "text between </think> and <answer>";
  }
  if (!rest.ends_with(kAnswerClose)) return "text after </answer>";
  return "";
}

}  // namespace grove::reward
