// ValidateLearnerConfig on configs a user gets wrong: each is refused before
// any process starts, naming the file and the key.
#include <gtest/gtest.h>

#include <string>

#include "base/config.h"
#include "learner/learner_actor.h"

namespace grove::learner {
namespace {

Status Validate(const std::string& learner_keys) {
  auto cfg = Config::Parse("[model]\nvocab_size = 56\nhidden = 64\nlayers = 2\nheads = 2\nkv_heads = 1\n"
                           "head_dim = 32\nmax_seq_len = 64\ndense_layers = 1\ndense_hidden = 128\n"
                           "experts = 4\ntop_k = 2\nexpert_hidden = 64\n"
                           "[learner]\n" + learner_keys,
                           "bad.toml");
  if (!cfg.ok()) return cfg.status();
  return ValidateLearnerConfig(*cfg, /*check_device=*/false);
}

TEST(LearnerConfig, RefusesWhatCannotRunNamingTheKey) {
  EXPECT_TRUE(Validate("steps = 3\n").ok()) << Validate("steps = 3\n");
  EXPECT_TRUE(Validate("checkpoint_every = 0\neval_device = \"cpu\"\n").ok());
  EXPECT_TRUE(Validate("micro_batch_tokens = 4096\n").ok()) << Validate("micro_batch_tokens = 4096\n");
  EXPECT_TRUE(Validate("micro_batch_tokens = 0\n").ok());
  struct Case {
    const char* keys;
    const char* names;
  };
  for (const Case& c : {Case{"eval_device = \"tpu\"\n", "learner.eval_device 'tpu'"},
                        Case{"device = \"cpu\"\neval_device = \"gpu\"\n", "learner.eval_device = gpu needs"},
                        Case{"checkpoint_every = -1\n", "learner.checkpoint_every"},
                        Case{"micro_batch_tokens = -1\n", "learner.micro_batch_tokens"},
                        Case{"eval_kv_memory_fraction = 1.5\n", "learner.eval_kv_memory_fraction"},
                        Case{"eval_kv_memory_fraction = 0\n", "learner.eval_kv_memory_fraction"},
                        Case{"warmstart_lr = -1.0\n", "learner.warmstart_lr"},
                        Case{"evaldevice = \"gpu\"\n", "evaldevice"}}) {
    Status s = Validate(c.keys);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.keys << s;
    EXPECT_NE(s.ToString().find(c.names), std::string::npos) << c.keys << s;
    EXPECT_NE(s.ToString().find("bad.toml"), std::string::npos) << c.keys << s;
  }
}

}  // namespace
}  // namespace grove::learner
