#include "reward/python_code.h"

#include <optional>

#include "reward/answer.h"

namespace grove::reward {
namespace {

ExtractedCode Fail(std::string error) {
  ExtractedCode out;
  out.error = std::move(error);
  return out;
}

bool IsPythonInfo(std::string_view info) {
  info = TrimSpace(info);
  return info.empty() || info == "python" || info == "python3" || info == "py" || info == "Python";
}

// The last complete python block of `text`, or why there is none.
// nullopt with *saw_fence false when the text has no ``` line at all.
std::optional<std::string_view> LastPythonBlock(std::string_view text, bool* saw_fence, std::string* error) {
  *saw_fence = false;
  std::optional<std::string_view> last;
  bool inside = false, inside_python = false;
  size_t body_start = 0;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    if (line.starts_with("```")) {
      *saw_fence = true;
      if (!inside) {
        inside = true;
        inside_python = IsPythonInfo(line.substr(3));
        body_start = end == text.size() ? end : end + 1;
      } else {
        inside = false;
        if (inside_python) last = text.substr(body_start, pos - body_start);
      }
    }
    if (end == text.size()) break;
    pos = end + 1;
  }
  if (inside && !last) *error = "unterminated ``` block";
  else if (*saw_fence && !last) *error = "no ```python block";
  return last;
}

}  // namespace

ExtractedCode ExtractPythonCode(std::string_view completion, size_t max_bytes) {
  std::string_view text = completion;
  if (size_t think = text.rfind("</think>"); think != std::string_view::npos) text = text.substr(think + 8);
  if (text.find("<answer>") != std::string_view::npos) {
    AnswerBlock block = ExtractAnswer(completion);
    if (!block.found) return Fail(block.error);
    text = block.text;
  }
  bool saw_fence = false;
  std::string error;
  std::optional<std::string_view> block = LastPythonBlock(text, &saw_fence, &error);
  std::string_view code;
  if (block) {
    code = *block;
  } else if (saw_fence) {
    return Fail(error);
  } else {
    code = TrimSpace(text);
  }
  if (TrimSpace(code).empty()) return Fail("no code");
  if (code.size() > max_bytes) return Fail("code longer than " + std::to_string(max_bytes) + " bytes");
  if (code.find('\0') != std::string_view::npos) return Fail("code contains a NUL byte");
  ExtractedCode out;
  out.found = true;
  out.code = std::string(code);
  return out;
}

}  // namespace grove::reward
