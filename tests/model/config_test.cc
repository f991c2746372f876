#include "model/config.h"

#include <gtest/gtest.h>

#include <limits>

#include "model/param_layout.h"
#include "model/tokenizer.h"
#include "tests/model/test_util.h"

namespace grove::model {
namespace {

TEST(ModelConfig, GpuReferenceHasAbout1Point7BParams) {
  auto c = ModelConfig::LoadFile(testing::SourcePath("configs/model/gpu-ref.toml"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->moe_layers(), 15);
  ParamLayout layout(*c);
  const double total = double(layout.total()), active = double(c->ActiveParams());
  EXPECT_GT(total, 1.6e9);
  EXPECT_LT(total, 1.8e9);
  EXPECT_GT(active, 0.28e9);
  EXPECT_LT(active, 0.34e9);
  ASSERT_NE(layout.Find("layers.15.moe.experts.63.w2"), nullptr);
  EXPECT_EQ(layout.Find("layers.15.moe.experts.63.w2")->shape, (std::vector<int64_t>{1024, 512}));
  EXPECT_EQ(layout.Find("layers.3.moe.shared.w1")->shape, (std::vector<int64_t>{1024, 1024}));
  EXPECT_EQ(layout.Find("layers.0.mlp.w1")->shape, (std::vector<int64_t>{2816, 1024}));
  EXPECT_EQ(layout.Find("layers.0.moe.router"), nullptr);
  EXPECT_FALSE(layout.Find("layers.1.moe.router_bias")->trainable);
}

TEST(ModelConfig, TinyMatchesTokenizerAndLayoutIsDense) {
  auto c = ModelConfig::LoadFile(testing::SourcePath("configs/model/tiny.toml"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, CharTokenizer().vocab_size());
  ParamLayout layout(*c);
  int64_t next = 0;
  for (const TensorInfo& t : layout.tensors()) {
    EXPECT_EQ(t.offset, next) << t.name;
    next += t.numel;
  }
  EXPECT_EQ(next, layout.total());
}

TEST(ModelConfig, JsonRoundTripAndErrors) {
  ModelConfig c = testing::MicroConfig(ScoreFunc::kSoftmax, true, 0.25);
  auto back = ModelConfig::FromJson(c.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), c.ToJson());
  EXPECT_FALSE(ModelConfig::FromJson("{").ok());
  auto typo = Config::Parse("[model]\nvocab_size = 5\nhidden = 8\nlayers = 1\nheads = 2\nmax_seq_len = 8\n"
                            "dense_hidden = 4\nexprets = 3\n");
  ASSERT_TRUE(typo.ok());
  auto r = ModelConfig::FromConfig(typo->Section("model"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("exprets"), std::string::npos) << r.status();
  auto bad = Config::Parse("[model]\nvocab_size = 5\nhidden = 8\nlayers = 1\nheads = 3\nkv_heads = 2\n"
                           "head_dim = 4\nmax_seq_len = 8\ndense_hidden = 4\n");
  r = ModelConfig::FromConfig(bad->Section("model"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("kv_heads must divide heads"), std::string::npos) << r.status();
}

// Found by fuzzing (tests/fuzz, config target): sizes were unbounded, so a
// config (or a checkpoint's metadata) with an absurd size hung ParamLayout
// and ActiveParams (a loop per layer and expert) or overflowed int64.
TEST(ModelConfig, AbsurdSizesAreRefusedByName) {
  const ModelConfig good = testing::MicroConfig(ScoreFunc::kSoftmax, true, 0.0);
  ASSERT_TRUE(good.Validate().ok());
  auto refused = [&](auto edit, const std::string& needle) {
    ModelConfig c = good;
    edit(c);
    Status s = c.Validate();
    EXPECT_FALSE(s.ok()) << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s;
    EXPECT_FALSE(ModelConfig::FromJson(c.ToJson()).ok()) << needle;
  };
  refused([](ModelConfig& c) { c.layers = int64_t{1} << 40; }, "layers");
  refused([](ModelConfig& c) { c.hidden = int64_t{1} << 40; }, "hidden");
  refused([](ModelConfig& c) { c.vocab_size = int64_t{1} << 62; }, "vocab_size");
  refused([](ModelConfig& c) { c.head_dim = int64_t{1} << 50; }, "head_dim");
  refused([](ModelConfig& c) { c.heads = c.kv_heads = int64_t{1} << 30; }, "heads");
  refused([](ModelConfig& c) { c.layers = 4096; c.dense_layers = 0; c.experts = 65535; c.top_k = 1; }, "2^20 tensors");
  refused([](ModelConfig& c) { c.hidden = c.expert_hidden = 1 << 24; }, "2^40 parameters");
  refused([](ModelConfig& c) { c.init_std = std::numeric_limits<double>::infinity(); }, "finite");
  refused([](ModelConfig& c) { c.rope_base = std::numeric_limits<double>::infinity(); }, "finite");
  // The largest sizes still accepted give a layout whose total is exact.
  ModelConfig big = good;
  big.layers = 64;
  big.experts = 256;
  big.dense_layers = 1;
  big.top_k = 8;
  ASSERT_TRUE(big.Validate().ok());
  EXPECT_GT(ParamLayout(big).total(), big.ActiveParams());
}

}  // namespace
}  // namespace grove::model
