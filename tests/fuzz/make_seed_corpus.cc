// Writes the binary part of the seed corpus (tests/fuzz/corpus/): one encoded
// Envelope of every body kind, each field filled, for the frame target; a
// valid scored group and batch for the training-group target; a tiny
// safetensors file and a tiny checkpoint for the safetensors target. The
// text seeds (configs, answers) are written by hand. Deterministic: running
// it again rewrites identical files.
//
//   make_seed_corpus --out tests/fuzz/corpus
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <capnp/dynamic.h>
#include <capnp/message.h>
#include <capnp/schema.h>
#include <gflags/gflags.h>
#include <glog/logging.h>

#include "actors/codec.h"
#include "model/checkpoint.h"
#include "model/safetensors.h"
#include "model/transformer.h"

DEFINE_string(out, "tests/fuzz/corpus", "corpus root; one folder per target is written under it");

namespace {

namespace fs = std::filesystem;
using grove::actors::BodyKind;

void WriteFile(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  CHECK(out.good()) << "cannot write " << path;
}

// Sets every field of `s` (the first member of each union) to a small
// non-default value, so each seed reaches every field's reader.
void Fill(capnp::DynamicStruct::Builder s, int depth);

void FillField(capnp::DynamicStruct::Builder s, capnp::StructSchema::Field field, int depth) {
  capnp::Type t = field.getType();
  switch (t.which()) {
    case capnp::schema::Type::VOID:
      s.set(field, capnp::VOID);
      break;
    case capnp::schema::Type::BOOL:
      s.set(field, true);
      break;
    case capnp::schema::Type::INT8: case capnp::schema::Type::INT16:
    case capnp::schema::Type::INT32: case capnp::schema::Type::INT64:
      s.set(field, int64_t{-3});
      break;
    case capnp::schema::Type::UINT8: case capnp::schema::Type::UINT16:
    case capnp::schema::Type::UINT32: case capnp::schema::Type::UINT64:
      s.set(field, uint64_t{2});
      break;
    case capnp::schema::Type::FLOAT32: case capnp::schema::Type::FLOAT64:
      s.set(field, 0.25);
      break;
    case capnp::schema::Type::TEXT:
      s.set(field, capnp::Text::Reader("seed"));
      break;
    case capnp::schema::Type::DATA: {
      static const capnp::byte bytes[8] = {0, 0, 0x80, 0x3f, 0, 0, 0, 0x40};  // 1.0f, 2.0f
      s.set(field, capnp::Data::Reader(bytes, sizeof bytes));
      break;
    }
    case capnp::schema::Type::ENUM: {
      auto enumerants = t.asEnum().getEnumerants();
      s.set(field, capnp::DynamicEnum(enumerants[enumerants.size() - 1]));
      break;
    }
    case capnp::schema::Type::STRUCT:
      if (depth < 6) Fill(s.init(field).as<capnp::DynamicStruct>(), depth + 1);
      break;
    case capnp::schema::Type::LIST: {
      auto list = s.init(field, 2).as<capnp::DynamicList>();
      capnp::Type elem = list.getSchema().getElementType();
      for (unsigned i = 0; i < 2; ++i) {
        switch (elem.which()) {
          case capnp::schema::Type::STRUCT:
            if (depth < 6) Fill(list[i].as<capnp::DynamicStruct>(), depth + 1);
            break;
          case capnp::schema::Type::TEXT:
            list.set(i, capnp::Text::Reader(i == 0 ? "a" : "b"));
            break;
          case capnp::schema::Type::FLOAT32: case capnp::schema::Type::FLOAT64:
            list.set(i, -0.5);
            break;
          case capnp::schema::Type::INT8: case capnp::schema::Type::INT16:
          case capnp::schema::Type::INT32: case capnp::schema::Type::INT64:
            list.set(i, int64_t(i + 1));
            break;
          case capnp::schema::Type::UINT8: case capnp::schema::Type::UINT16:
          case capnp::schema::Type::UINT32: case capnp::schema::Type::UINT64:
            list.set(i, uint64_t(i));
            break;
          case capnp::schema::Type::BOOL:
            list.set(i, i == 0);
            break;
          default:
            break;  // lists of lists, enums, data: none in the schema today
        }
      }
      break;
    }
    default:
      break;
  }
}

void Fill(capnp::DynamicStruct::Builder s, int depth) {
  for (auto field : s.getSchema().getNonUnionFields()) FillField(s, field, depth);
  auto union_fields = s.getSchema().getUnionFields();
  if (union_fields.size() > 0) FillField(s, union_fields[0], depth);
}

std::string Envelope(BodyKind kind, bool filled) {
  capnp::MallocMessageBuilder message;
  auto env = grove::actors::InitEnvelope(message, "seed-actor", 7);
  env.setSentAtMs(0);  // deterministic seeds
  capnp::DynamicStruct::Builder body = capnp::toDynamic(env.initBody());
  auto field = body.getSchema().getFields()[static_cast<unsigned>(kind)];
  if (filled) {
    FillField(body, field, 0);
  } else if (field.getType().isStruct()) {
    body.init(field);
  } else {
    body.set(field, capnp::VOID);
  }
  return grove::actors::EncodeFrame(message);
}

// A scored group that DecodeTrainingGroup accepts for the shape the
// training-group target's bytes 0x7f 0xed pick: vocabulary 64, one MoE
// layer, top-2 of 5 experts, at most 58 tokens.
void FillScoredGroup(grove::wire::ScoredGroup::Builder sg, const std::string& id) {
  auto g = sg.initGroup();
  g.setGroupId(id);
  auto prompt = g.initPrompt();
  prompt.setId(11);
  prompt.setTask("arithmetic");
  prompt.setText("12+7=");
  prompt.setReference("{\"answer\": \"19\"}");
  prompt.setSplit("train");
  auto pt = g.initPromptTokens(3);
  for (unsigned i = 0; i < 3; ++i) pt.set(i, static_cast<int32_t>(10 + i));
  auto pr = g.initPromptRoutedExperts(6);
  for (unsigned i = 0; i < 6; ++i) pr.set(i, static_cast<uint16_t>(i % 5));
  g.setPolicyVersion(3);
  auto samples = g.initSamples(2);
  auto rewards = sg.initRewards(2);
  for (unsigned s = 0; s < 2; ++s) {
    auto smp = samples[s];
    auto tok = smp.initTokens(3);
    auto lp = smp.initLogprobs(3);
    for (unsigned i = 0; i < 3; ++i) {
      tok.set(i, static_cast<int32_t>(20 + i + s));
      lp.set(i, -0.5f * static_cast<float>(i + 1));
    }
    auto routes = smp.initRoutedExperts(4);
    for (unsigned i = 0; i < 4; ++i) routes.set(i, static_cast<uint16_t>((i + s) % 5));
    smp.setMoeLayers(1);
    smp.setTopK(2);
    smp.setPolicyVersion(3);
    smp.setFinish(s == 0 ? grove::wire::FinishReason::STOP : grove::wire::FinishReason::LENGTH);
    smp.setText("<think>.</think><answer>19</answer>");
    rewards[s].setTotal(s == 0 ? 1.0 : 0.0);
    rewards[s].setReason("ok");
  }
  sg.setVerifierId("verifier-0");
}

std::string ShapePrefix() { return std::string("\x7f\xed", 2); }

std::string ScoredGroupFrame() {
  capnp::MallocMessageBuilder message;
  auto env = grove::actors::InitEnvelope(message, "replay-0", 1);
  env.setSentAtMs(0);
  FillScoredGroup(env.initBody().initScoredGroup(), "rollout-0:11:0");
  return grove::actors::EncodeFrame(message);
}

std::string BatchFrame() {
  capnp::MallocMessageBuilder message;
  auto env = grove::actors::InitEnvelope(message, "replay-0", 2);
  env.setSentAtMs(0);
  auto batch = env.initBody().initBatch();
  auto groups = batch.initGroups(2);
  FillScoredGroup(groups[0], "rollout-0:11:0");
  FillScoredGroup(groups[1], "rollout-1:12:0");
  batch.setReady(true);
  return grove::actors::EncodeFrame(message);
}

std::string ReadBack(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  google::InitGoogleLogging(argv[0]);
  const fs::path root = FLAGS_out;

  // frame: byte 0 = the expected kind (or 0x3f: any), then the frame.
  auto fields = capnp::Schema::from<grove::wire::Envelope::Body>().getFields();
  for (unsigned k = 0; k < fields.size(); ++k) {
    const std::string name = fields[k].getProto().getName().cStr();
    const std::string filled = Envelope(static_cast<BodyKind>(k), true);
    WriteFile(root / "frame" / ("kind-" + name), std::string(1, static_cast<char>(k)) + filled);
    WriteFile(root / "frame" / ("any-empty-" + name),
              std::string(1, '\x7f') + Envelope(static_cast<BodyKind>(k), false));  // zero-copy, any kind
  }
  WriteFile(root / "frame" / "scored-group-real", std::string(1, static_cast<char>(BodyKind::SCORED_GROUP)) +
                                                      ScoredGroupFrame());

  WriteFile(root / "training_group" / "scored-group", ShapePrefix() + ScoredGroupFrame());
  WriteFile(root / "training_group" / "batch", ShapePrefix() + BatchFrame());
  // The same group against a shape that refuses it (vocabulary 16).
  WriteFile(root / "training_group" / "scored-group-small-vocab", std::string("\x0f\xed", 2) + ScoredGroupFrame());

  // safetensors: a plain file with metadata, and a checkpoint of a toy model.
  const fs::path tmp = fs::temp_directory_path() / "grove-make-seed-corpus";
  fs::create_directories(tmp);
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  const std::vector<float> b = {-1};
  CHECK(grove::model::WriteSafetensors((tmp / "plain.safetensors").string(),
                                       {{"a", {2, 3}, a}, {"b", {}, b}}, {{"note", "seed"}})
            .ok());
  WriteFile(root / "safetensors" / "plain", ReadBack(tmp / "plain.safetensors"));

  grove::model::ModelConfig c;
  c.vocab_size = 8;
  c.hidden = 4;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.head_dim = 2;
  c.max_seq_len = 8;
  c.dense_layers = 1;
  c.dense_hidden = 4;
  c.experts = 2;
  c.top_k = 1;
  c.expert_hidden = 4;
  auto model = grove::model::Model::Create(c, 1, true);
  CHECK(model.ok()) << model.status().ToString();
  CHECK(grove::model::SaveModel((tmp / "model.safetensors").string(), *model.value(), {{"step", "1"}}).ok());
  WriteFile(root / "safetensors" / "checkpoint", ReadBack(tmp / "model.safetensors"));
  // Optimizer state for the same layout, as the target's LoadOptimizerState reads it.
  std::span<const float> params(model.value()->params().data(), model.value()->params().size());
  CHECK(grove::model::SaveOptimizerState((tmp / "model.optim.safetensors").string(), model.value()->layout(),
                                         {{"adam_m", params}, {"adam_v", params}}, {{"step", "1"}})
            .ok());
  WriteFile(root / "safetensors" / "optimizer-state", ReadBack(tmp / "model.optim.safetensors"));
  fs::remove_all(tmp);
  LOG(INFO) << "wrote the seed corpus under " << root;
  return 0;
}
