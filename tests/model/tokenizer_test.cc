#include "model/tokenizer.h"

#include <gtest/gtest.h>

#include "model/prompt_format.h"

namespace grove::model {
namespace {

TEST(CharTokenizer, RoundTripsTaskText) {
  CharTokenizer t;
  EXPECT_EQ(t.vocab_size(), 55);
  const std::string text = "<bos>what is (12+3)*4^2 / 6.5, x = y\n<think>12+3=15</think><answer>-40</answer><eos>";
  auto ids = t.Encode(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ((*ids)[0], t.bos_id());
  EXPECT_EQ(ids->back(), t.eos_id());
  auto back = t.Decode(*ids);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, text);
}

TEST(CharTokenizer, SpecialTokensAreAtomic) {
  CharTokenizer t;
  auto ids = t.Encode("<think>1</think>");
  ASSERT_TRUE(ids.ok());
  ASSERT_EQ(ids->size(), 3u);
  EXPECT_EQ((*ids)[0], *t.SpecialId("<think>"));
  EXPECT_EQ((*ids)[2], *t.SpecialId("</think>"));
  EXPECT_EQ(*t.SpecialId("<pad>"), t.pad_id());
  EXPECT_EQ(t.SpecialId("<nope>").status().code(), StatusCode::kNotFound);
  // All ids distinct and decodable.
  for (int32_t i = 0; i < t.vocab_size(); ++i) {
    auto s = t.Decode(std::vector<int32_t>{i});
    ASSERT_TRUE(s.ok());
    auto again = t.Encode(*s);
    ASSERT_TRUE(again.ok()) << *s;
    EXPECT_EQ(*again, std::vector<int32_t>{i});
  }
}

TEST(CharTokenizer, RejectsUnknownInput) {
  CharTokenizer t;
  auto r = t.Encode("ab#c");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'#' at offset 2"), std::string::npos) << r.status();
  r = t.Encode("<thonk>");
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(t.Encode("A").ok());
  EXPECT_FALSE(t.Decode(std::vector<int32_t>{55}).ok());
  EXPECT_FALSE(t.Decode(std::vector<int32_t>{-1}).ok());
}

// A model whose vocab is padded past the tokenizer's (configs/gpu-1-small.toml had
// 64 vs 55) can emit the padding ids; its completion text shows them as
// U+FFFD instead of failing (a failure stopped the learner's evaluation).
TEST(DecodeCompletion, PaddingIdsBecomeReplacementCharacters) {
  CharTokenizer t;
  auto ids = EncodeCompletion(t, "12+3");
  ASSERT_TRUE(ids.ok());
  auto text = DecodeCompletion(t, *ids);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "12+3");  // <eos> dropped
  std::vector<int32_t> mixed = {59, ids->at(0), 63, 55, ids->at(1), -4, t.eos_id()};
  text = DecodeCompletion(t, mixed);
  ASSERT_TRUE(text.ok()) << text.status();
  const std::string r(kUnknownTokenText);
  EXPECT_EQ(*text, r + "1" + r + r + "2" + r);
  text = DecodeCompletion(t, std::vector<int32_t>{60});
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, r);
  text = DecodeCompletion(t, std::vector<int32_t>{});
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "");
}

}  // namespace
}  // namespace grove::model
