// safetensors checkpoints: bit-exact round trips, clear errors on bad files.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/checkpoint.h"
#include "model/safetensors.h"
#include "tests/model/test_util.h"

namespace grove::model {
namespace {

namespace fs = std::filesystem;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("grove_ckpt_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    config_ = testing::MicroConfig(ScoreFunc::kSigmoid, true, 0.0);
    model_ = std::move(*Model::Create(config_, 77));
    path_ = (dir_ / "step-1.safetensors").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Bytes() {
    std::ifstream f(path_, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  }
  void Write(const std::string& bytes) {
    std::ofstream f(path_, std::ios::binary | std::ios::trunc);
    f << bytes;
  }
  // Rewrites the JSON header through `edit`, keeping the data.
  void EditHeader(const std::function<void(nlohmann::json&)>& edit) {
    std::string b = Bytes();
    uint64_t n;
    std::memcpy(&n, b.data(), 8);
    nlohmann::json h = nlohmann::json::parse(b.substr(8, n));
    edit(h);
    std::string text = h.dump();
    uint64_t m = text.size();
    std::string out(8, '\0');
    std::memcpy(out.data(), &m, 8);
    Write(out + text + b.substr(8 + n));
  }
  std::string LoadError() {
    auto r = LoadModel(path_);
    EXPECT_FALSE(r.ok());
    return r.ok() ? "" : r.status().ToString();
  }

  fs::path dir_;
  ModelConfig config_;
  std::unique_ptr<Model> model_;
  std::string path_;
};

TEST_F(CheckpointTest, RoundTripIsBitExact) {
  ASSERT_TRUE(SaveModel(path_, *model_, {{"step", "1"}}).ok());
  auto loaded = LoadModel(path_);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->config().ToJson(), config_.ToJson());
  ASSERT_EQ((*loaded)->params().size(), model_->params().size());
  EXPECT_EQ(0, std::memcmp((*loaded)->params().data(), model_->params().data(), model_->params().size_bytes()));
  auto meta = ReadMetadata(path_);
  ASSERT_TRUE(meta.ok());
  EXPECT_EQ(meta->at("step"), "1");
  // Into an existing model of another seed.
  auto other = std::move(*Model::Create(config_, 78));
  ASSERT_TRUE(LoadParams(path_, other.get()).ok());
  EXPECT_EQ(0, std::memcmp(other->params().data(), model_->params().data(), model_->params().size_bytes()));
}

TEST_F(CheckpointTest, OptimizerStateRoundTrip) {
  std::mt19937_64 rng(1);
  const int64_t n = model_->layout().total();
  std::vector<float> m = testing::RandomVector<float>(n, rng), v = testing::RandomVector<float>(n, rng);
  const std::string opath = OptimizerStatePath(path_);
  EXPECT_EQ(opath, (dir_ / "step-1.optim.safetensors").string());
  ASSERT_TRUE(SaveOptimizerState(opath, model_->layout(), {{"adam_m", m}, {"adam_v", v}}, {{"step", "9"}}).ok());
  auto st = LoadOptimizerState(opath, model_->layout(), {"adam_m", "adam_v"});
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->buffers.at("adam_m"), m);
  EXPECT_EQ(st->buffers.at("adam_v"), v);
  EXPECT_EQ(st->metadata.at("step"), "9");
  auto missing = LoadOptimizerState(opath, model_->layout(), {"adam_x"});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("missing tensor adam_x/embed"), std::string::npos) << missing.status();
}

TEST_F(CheckpointTest, MismatchedModelIsNamed) {
  ASSERT_TRUE(SaveModel(path_, *model_).ok());
  ModelConfig other = config_;
  other.hidden = 12;
  auto m2 = std::move(*Model::Create(other, 1));
  Status s = LoadParams(path_, m2.get());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("differs from the model's"), std::string::npos) << s;
}

TEST_F(CheckpointTest, CorruptFilesGiveClearErrors) {
  ASSERT_TRUE(SaveModel(path_, *model_).ok());
  const std::string good = Bytes();

  Write(good.substr(0, 5));
  EXPECT_NE(LoadError().find("shorter than the 8-byte header length"), std::string::npos);

  Write(good.substr(0, good.size() - 4));
  EXPECT_NE(LoadError().find("truncated"), std::string::npos) << LoadError();

  std::string huge = good;
  const uint64_t big = 1ull << 40;
  std::memcpy(huge.data(), &big, 8);
  Write(huge);
  EXPECT_NE(LoadError().find("exceeds the 100 MB limit"), std::string::npos);

  std::string badjson = good;
  badjson[9] = '!';
  Write(badjson);
  EXPECT_NE(LoadError().find("not valid JSON"), std::string::npos);

  Write(good);
  EditHeader([](nlohmann::json& h) { h["embed"]["dtype"] = "BF16"; });
  EXPECT_NE(LoadError().find("dtype BF16 is not supported"), std::string::npos) << LoadError();

  Write(good);
  EditHeader([](nlohmann::json& h) { h["norm"]["shape"] = {4, 2}; });  // same byte count, wrong shape
  EXPECT_NE(LoadError().find("tensor norm has shape [4,2], the model expects [8]"), std::string::npos) << LoadError();

  Write(good);
  EditHeader([](nlohmann::json& h) { h["norm"]["shape"] = {9}; });
  EXPECT_NE(LoadError().find("tensor norm: data_offsets span 32 bytes"), std::string::npos) << LoadError();

  Write(good);
  EditHeader([](nlohmann::json& h) {
    h["renamed"] = h["lm_head"];
    h.erase("lm_head");
  });
  EXPECT_NE(LoadError().find("missing tensor lm_head"), std::string::npos) << LoadError();

  Write(good);
  EditHeader([](nlohmann::json& h) { h["embed"]["data_offsets"][0] = 4; });
  EXPECT_FALSE(LoadError().empty());

  Write(good);
  EditHeader([](nlohmann::json& h) { h["__metadata__"]["format"] = "other"; });
  EXPECT_NE(LoadError().find("not a grove model file"), std::string::npos) << LoadError();

  Write(good);
  EditHeader([](nlohmann::json& h) { h["__metadata__"]["config"] = "{\"hidden\": 3}"; });
  EXPECT_NE(LoadError().find("model config JSON"), std::string::npos) << LoadError();

  auto none = LoadModel((dir_ / "absent.safetensors").string());
  EXPECT_EQ(none.status().code(), StatusCode::kIOError);
}

TEST_F(CheckpointTest, RandomHeaderDamageNeverCrashes) {
  ASSERT_TRUE(SaveModel(path_, *model_).ok());
  const std::string good = Bytes();
  uint64_t n;
  std::memcpy(&n, good.data(), 8);
  std::mt19937_64 rng(5);
  int failures = 0;
  for (int i = 0; i < 300; ++i) {
    std::string b = good;
    for (int k = 0; k < 3; ++k) b[rng() % (8 + n)] = char(rng() % 256);
    Write(b);
    auto r = LoadModel(path_);
    failures += !r.ok();
  }
  EXPECT_GT(failures, 200);  // almost every damaged header is rejected (spaces may be hit harmlessly)
}

TEST(Safetensors, WriterRejectsBadInput) {
  std::vector<float> v(3);
  const std::string p = (fs::temp_directory_path() / "grove_st_bad.safetensors").string();
  EXPECT_FALSE(WriteSafetensors(p, {{"a", {2, 2}, v}}, {}).ok());
  EXPECT_FALSE(WriteSafetensors(p, {{"a", {3}, v}, {"a", {3}, v}}, {}).ok());
  EXPECT_FALSE(WriteSafetensors("/nonexistent-dir/x.safetensors", {{"a", {3}, v}}, {}).ok());
}

// Found by fuzzing (tests/fuzz, safetensors target): LoadModel built the model
// from the file's config before checking that the file could hold its
// weights, so a few hundred bytes could ask for gigabytes.
TEST_F(CheckpointTest, ConfigLargerThanTheFileIsRefusedBeforeAllocating) {
  ASSERT_TRUE(SaveModel(path_, *model_).ok());
  EditHeader([](nlohmann::json& h) {
    auto cfg = nlohmann::json::parse(h["__metadata__"]["config"].get<std::string>());
    cfg["hidden"] = 1 << 16;  // a valid config of ~10^7 parameters; the file holds ~10^3
    h["__metadata__"]["config"] = cfg.dump();
  });
  const std::string error = LoadError();
  EXPECT_NE(error.find("parameters, the file holds"), std::string::npos) << error;
}

}  // namespace
}  // namespace grove::model
