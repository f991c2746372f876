// Tokenizer: text <-> token ids. CharTokenizer is the character-level
// vocabulary of the synthetic reasoning tasks; a byte-level BPE can implement
// the same interface later.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"

namespace grove::model {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // InvalidArgument naming the offending character and its byte offset when
  // the text holds something outside the vocabulary.
  virtual Result<std::vector<int32_t>> Encode(std::string_view text) const = 0;
  // InvalidArgument for an id outside [0, vocab_size()).
  virtual Result<std::string> Decode(std::span<const int32_t> ids) const = 0;
  virtual int32_t vocab_size() const = 0;
  virtual int32_t pad_id() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  // Id of a special token by its text ("<think>"), NotFound otherwise.
  virtual Result<int32_t> SpecialId(std::string_view special) const = 0;
};

// Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <think>, 4 </think>, 5 <answer>,
// 6 </answer>, then the characters "0123456789+-*/()=., " "a".."z" "^" "\n"
// (55 ids). Special tokens are matched atomically wherever their text
// appears; a '<' that does not start one is an error (it is not in the
// character set).
class CharTokenizer final : public Tokenizer {
 public:
  CharTokenizer();
  Result<std::vector<int32_t>> Encode(std::string_view text) const override;
  Result<std::string> Decode(std::span<const int32_t> ids) const override;
  int32_t vocab_size() const override { return int32_t(pieces_.size()); }
  int32_t pad_id() const override { return 0; }
  int32_t bos_id() const override { return 1; }
  int32_t eos_id() const override { return 2; }
  Result<int32_t> SpecialId(std::string_view special) const override;

  static constexpr int32_t kNumSpecial = 7;

 private:
  std::vector<std::string> pieces_;
  int32_t char_id_[256];
};

}  // namespace grove::model
