// Where the model's Python program is in a completion.
//
// The rule, in order:
//  1. Text inside <think>...</think> is never code: only what follows the
//     last "</think>" is read (the whole completion when there is none), so
//     drafts in the reasoning do not count.
//  2. When that text has an "<answer>" tag, the program must be inside the
//     single <answer>...</answer> block (ExtractAnswer's rules); otherwise the
//     text itself is read.
//  3. In it, the last fenced block whose info string is empty, "python",
//     "python3" or "py" (a line starting with ``` opens it, the next line
//     starting with ``` closes it) is the program. Text with no ``` line at all
//     is the program as a whole. Fences but no such complete block (only
//     ```cpp, or an unterminated fence) is an error.
//  4. The program must be non-empty, at most `max_bytes`, and free of NUL
//     bytes.
// Linear in the completion; never throws.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace grove::reward {

struct ExtractedCode {
  bool found = false;
  std::string code;   // the program, without the fence lines
  std::string error;  // why none was found ("no code", "unterminated ``` block", ...)
};

ExtractedCode ExtractPythonCode(std::string_view completion, size_t max_bytes);

}  // namespace grove::reward
