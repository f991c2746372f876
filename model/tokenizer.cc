#include "model/tokenizer.h"

#include <cstdio>

namespace grove::model {
namespace {

constexpr const char* kSpecials[] = {"<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>"};
constexpr const char kChars[] = "0123456789+-*/()=., abcdefghijklmnopqrstuvwxyz^\n";

std::string Printable(unsigned char ch) {
  if (ch >= 32 && ch < 127) return std::string("'") + char(ch) + "'";
  char buf[16];
  std::snprintf(buf, sizeof(buf), "byte 0x%02x", ch);
  return buf;
}

}  // namespace

CharTokenizer::CharTokenizer() {
  for (int32_t& id : char_id_) id = -1;
  for (const char* s : kSpecials) pieces_.emplace_back(s);
  for (const char* c = kChars; *c; ++c) {
    char_id_[static_cast<unsigned char>(*c)] = int32_t(pieces_.size());
    pieces_.emplace_back(1, *c);
  }
}

Result<std::vector<int32_t>> CharTokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    if (text[i] == '<') {
      bool matched = false;
      for (int32_t s = 0; s < kNumSpecial; ++s) {
        if (text.substr(i, pieces_[s].size()) == pieces_[s]) {
          ids.push_back(s);
          i += pieces_[s].size();
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    const unsigned char ch = static_cast<unsigned char>(text[i]);
    if (char_id_[ch] < 0)
      return Status::InvalidArgument("CharTokenizer: " + Printable(ch) + " at offset " + std::to_string(i) +
                                     " is not in the vocabulary");
    ids.push_back(char_id_[ch]);
    ++i;
  }
  return ids;
}

Result<std::string> CharTokenizer::Decode(std::span<const int32_t> ids) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size())
      return Status::InvalidArgument("CharTokenizer: id " + std::to_string(ids[i]) + " at " + std::to_string(i) +
                                     " outside [0, " + std::to_string(vocab_size()) + ")");
    out += pieces_[ids[i]];
  }
  return out;
}

Result<int32_t> CharTokenizer::SpecialId(std::string_view special) const {
  for (int32_t s = 0; s < kNumSpecial; ++s)
    if (pieces_[s] == special) return s;
  return Status::NotFound("CharTokenizer: no special token \"" + std::string(special) + "\"");
}

}  // namespace grove::model
