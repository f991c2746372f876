#include "base/config.h"

#include <gtest/gtest.h>

namespace grove {
namespace {

constexpr char kToml[] = R"(
name = "run"
[learner]
lr = 1e-3
steps = 40
clip = [0.2, 0.28]
use_kl = true
[[actors]]
role = "rollout"
[[actors]]
role = "verifier"
)";

TEST(Config, TypedReads) {
  Result<Config> c = Config::Parse(kToml, "test.toml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(*c->String("name"), "run");
  EXPECT_DOUBLE_EQ(*c->Double("learner.lr"), 1e-3);
  EXPECT_DOUBLE_EQ(*c->Double("learner.steps"), 40.0);  // int accepted as float
  EXPECT_EQ(*c->Int("learner.steps"), 40);
  EXPECT_EQ(*c->Bool("learner.use_kl"), true);
  EXPECT_EQ(c->DoubleList("learner.clip")->at(1), 0.28);
  EXPECT_EQ(*c->Int("learner.missing", 7), 7);
  Config learner = c->Section("learner");
  EXPECT_EQ(*learner.Int("steps"), 40);
  auto actors = c->TableArray("actors");
  ASSERT_TRUE(actors.ok());
  ASSERT_EQ(actors->size(), 2u);
  EXPECT_EQ(*(*actors)[1].String("role"), "verifier");
}

TEST(Config, ErrorsNameThePath) {
  Config c = *Config::Parse(kToml, "test.toml");
  Result<int64_t> wrong = c.Int("learner.lr");
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("learner.lr"), std::string::npos);
  EXPECT_NE(wrong.status().message().find("test.toml"), std::string::npos);
  EXPECT_EQ(c.Int("learner.nope").status().code(), StatusCode::kNotFound);
  // A wrong type is an error even when a fallback exists.
  EXPECT_FALSE(c.Int("name", 3).ok());
}

TEST(Config, ParseErrorHasLine) {
  Result<Config> c = Config::Parse("a = 1\nb = = 2\n", "bad.toml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("bad.toml:2"), std::string::npos) << c.status();
}

TEST(Config, CheckKeysCatchesTypos) {
  Config c = *Config::Parse("[learner]\nleraning_rate = 1\n");
  Status s = c.Section("learner").CheckKeys({"learning_rate", "steps"});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("learner.leraning_rate"), std::string::npos);
}

TEST(Config, OverrideIsCopyOnWrite) {
  Config a = *Config::Parse(kToml);
  Config b = a;
  ASSERT_TRUE(b.Override("learner.steps=5").ok());
  ASSERT_TRUE(b.Override("new.section.word=hello").ok());
  EXPECT_EQ(*a.Int("learner.steps"), 40);
  EXPECT_EQ(*b.Int("learner.steps"), 5);
  EXPECT_EQ(*b.String("new.section.word"), "hello");
  EXPECT_FALSE(b.Override("noequals").ok());
  EXPECT_FALSE(b.Override("name.x=1").ok());  // name is a string, not a table
}

// Found by fuzzing (tests/fuzz, config target): a key with a control
// character or a ' (a quoted TOML key, or an --set key) was accepted, and ToToml
// wrote it back as a literal string that does not parse, so the config file
// `grove up` hands every actor was unreadable. Such keys are now refused;
// control characters in values still round-trip.
TEST(Config, ControlCharactersInKeysAreRefusedAndValuesRoundTrip) {
  auto quoted = Config::Parse("[a]\n\"b\\nc\" = 1\n", "keys.toml");
  ASSERT_FALSE(quoted.ok());
  EXPECT_NE(quoted.status().message().find("keys.toml: key 'a.b"), std::string::npos) << quoted.status();
  EXPECT_NE(quoted.status().message().find("control character"), std::string::npos) << quoted.status();
  EXPECT_FALSE(Config::Parse("[[t]]\n\"x\\u0001\" = 2\n").ok());

  Config c = *Config::Parse("[a]\nv = \"x\\u0001\\ny\"\n");
  Status s = c.Override(std::string("a.k\nx=1", 7));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("control character"), std::string::npos) << s;
  ASSERT_TRUE(c.Override(std::string("a.w=\x01 \0 x", 9)).ok());  // not TOML: kept as a string
  auto back = Config::Parse(c.ToToml());
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << c.ToToml();
  EXPECT_EQ(*back->String("a.v"), "x\x01\ny");
  EXPECT_EQ(*back->String("a.w"), std::string("\x01 \0 x", 5));
  EXPECT_EQ(back->ToToml(), c.ToToml());
  // toml++ writes a key with a ' (and no ") back bare, which does not parse.
  EXPECT_FALSE(Config::Parse("\"it's\" = 1\n").ok());
  EXPECT_FALSE(c.Override("a.'b.c=1").ok());
  ASSERT_TRUE(Config::Parse("\"a.b c\" = 1\n").ok());  // other quoted keys round-trip
  EXPECT_TRUE(Config::Parse(Config::Parse("\"a.b c\" = 1\n")->ToToml()).ok());
  // toml++ writes a string starting with a newline as a multi-line literal,
  // whose first newline TOML drops: refused from files and overrides alike.
  auto newline = Config::Parse("[a]\nv = \"\\nx\"\n", "nl.toml");
  ASSERT_FALSE(newline.ok());
  EXPECT_NE(newline.status().message().find("nl.toml: the string at 'a.v'"), std::string::npos) << newline.status();
  EXPECT_FALSE(c.Override("a.s=\ns").ok());
  EXPECT_FALSE(c.Override("a.s=[\"x\", \"\\ny\"]").ok());
  ASSERT_TRUE(c.Override("a.s=[\"x\", \"y\\nz\"]").ok());
  EXPECT_EQ(*c.StringList("a.s"), (std::vector<std::string>{"x", "y\nz"}));
  // Bytes that are not UTF-8 would be written back as other characters.
  EXPECT_FALSE(c.Override("a.k\xff=1").ok());
  EXPECT_FALSE(c.Override("a.k=\xc3").ok());
  EXPECT_FALSE(c.Override("a.k=\xed\xa0\x80").ok());  // a surrogate
  EXPECT_FALSE(c.Override("a.k=\xc0\xaf").ok());      // overlong '/'
  ASSERT_TRUE(c.Override("a.k=\xc3\xbf\xe2\x82\xac\xf0\x9f\x98\x80").ok());
  EXPECT_EQ(*c.String("a.k"), "\xc3\xbf\xe2\x82\xac\xf0\x9f\x98\x80");
}

}  // namespace
}  // namespace grove
