// Writes what `grpo_step.py --check DIR` needs to prove that the PyTorch
// baseline computes grove's model: the weights of a freshly initialized grove
// model (model.safetensors, SaveModel's format, config JSON in its metadata)
// and reference.json holding random token sequences with grove's CPU Score()
// log-probs and routes for them.
//
//   build/bench/dump_reference --config configs/model/tiny.toml --seed 7 --out /tmp/check-tiny
//
// The router bias is drawn at random (uniform in +-bias_scale) instead of
// init's zeros so the check also covers bias-steered top-k selection.
#include <gflags/gflags.h>
#include <glog/logging.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/checkpoint.h"
#include "model/config.h"
#include "model/transformer.h"

DEFINE_string(config, "configs/model/tiny.toml", "model config (TOML with a [model] section)");
DEFINE_uint64(seed, 7, "seed of the weights, bias and token sequences");
DEFINE_string(out, "", "output folder (created)");
DEFINE_int32(sequences, 4, "token sequences to score");
DEFINE_int32(min_len, 8, "shortest sequence");
DEFINE_int32(max_len, 0, "longest sequence (0: min(max_seq_len, 96))");
DEFINE_double(bias_scale, 0.02, "router bias ~ U(-bias_scale, bias_scale); 0 keeps init's zeros");

namespace {

int Run() {
  using namespace grove::model;
  if (FLAGS_out.empty()) { std::fprintf(stderr, "--out is required\n"); return 2; }
  auto config = ModelConfig::LoadFile(FLAGS_config);
  if (!config.ok()) { std::fprintf(stderr, "%s\n", config.status().ToString().c_str()); return 2; }
  const ModelConfig& c = *config;
  const int max_len = FLAGS_max_len > 0 ? FLAGS_max_len : int(std::min<int64_t>(c.max_seq_len, 96));
  if (FLAGS_sequences < 1 || FLAGS_min_len < 2 || FLAGS_min_len > max_len || max_len > c.max_seq_len) {
    std::fprintf(stderr, "need sequences >= 1 and 2 <= min_len <= max_len <= max_seq_len (%lld)\n",
                 static_cast<long long>(c.max_seq_len));
    return 2;
  }
  auto model = Model::Create(c, FLAGS_seed);
  if (!model.ok()) { std::fprintf(stderr, "%s\n", model.status().ToString().c_str()); return 2; }
  Model& m = **model;
  std::mt19937_64 rng(FLAGS_seed ^ 0x9e3779b97f4a7c15ull);
  if (FLAGS_bias_scale > 0) {
    std::uniform_real_distribution<float> u(-float(FLAGS_bias_scale), float(FLAGS_bias_scale));
    for (int64_t l = 0; l < c.layers; ++l) {
      if (!c.is_moe_layer(l)) continue;
      const TensorInfo* t = m.layout().Find("layers." + std::to_string(l) + ".moe.router_bias");
      CHECK(t != nullptr);
      for (int64_t i = 0; i < t->numel; ++i) m.params()[t->offset + i] = u(rng);
    }
  }
  std::vector<ScoreRequest> batch(FLAGS_sequences);
  std::uniform_int_distribution<int> len_d(FLAGS_min_len, max_len);
  std::uniform_int_distribution<int32_t> tok_d(0, int32_t(c.vocab_size - 1));
  for (ScoreRequest& r : batch) {
    const int L = len_d(rng);
    for (int t = 0; t < L; ++t) r.tokens.push_back(tok_d(rng));
    r.score_from = std::uniform_int_distribution<int>(1, std::max(1, L / 2))(rng);
  }
  auto scored = m.Score(batch, /*keep_for_backward=*/false);
  if (!scored.ok()) { std::fprintf(stderr, "%s\n", scored.status().ToString().c_str()); return 1; }

  std::error_code ec;
  std::filesystem::create_directories(FLAGS_out, ec);
  if (ec) { std::fprintf(stderr, "cannot create %s: %s\n", FLAGS_out.c_str(), ec.message().c_str()); return 1; }
  const std::string weights = FLAGS_out + "/model.safetensors";
  if (grove::Status s = SaveModel(weights, m, {{"seed", std::to_string(FLAGS_seed)}}); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  nlohmann::ordered_json j;
  j["config"] = nlohmann::json::parse(c.ToJson());
  j["seed"] = FLAGS_seed;
  j["moe_layers"] = c.moe_layers();
  j["top_k"] = c.top_k;
  j["balance_loss"] = scored->balance_loss;
  nlohmann::ordered_json seqs = nlohmann::json::array();
  for (size_t i = 0; i < batch.size(); ++i) {
    nlohmann::ordered_json s;
    s["tokens"] = batch[i].tokens;
    s["score_from"] = batch[i].score_from;
    s["logprobs"] = scored->logprobs[i];
    s["routes"] = scored->routes[i];  // [L-1][moe_layers][top_k] flattened
    seqs.push_back(std::move(s));
  }
  j["sequences"] = std::move(seqs);
  std::ofstream f(FLAGS_out + "/reference.json");
  f << j.dump() << "\n";
  if (!f) { std::fprintf(stderr, "cannot write %s/reference.json\n", FLAGS_out.c_str()); return 1; }
  std::printf("wrote %s and %s/reference.json: %d sequences, %lld parameters\n", weights.c_str(), FLAGS_out.c_str(),
              FLAGS_sequences, static_cast<long long>(m.layout().total()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  google::InitGoogleLogging(argv[0]);
  return Run();
}
