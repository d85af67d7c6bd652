// Synthetic checkpoints. The planted circuit (docs/synth.md) uses four reserved residual
// channels: CONST (every token, lets the router and the sink head's query see "always on"),
// BOS (only the BOS token), S (the P0 head's write) and U (the expert's write).
//
//   layer 0, head A:  its key at the BOS position is strongly negative for every query, so
//                     queries i >= 1 ignore position 0 while position 0 attends to itself (the
//                     causal mask leaves it nothing else); its value reads BOS, so its write
//                     (W_O -> channel S) is large at position 0 only.
//   layer 1, expert:  the router always picks it (reads CONST); gate and up read S, so
//                     silu(k s) * k s ~ k^2 s^2 is large only where S is; down writes it to U.
//   layer 2, head B:  its query reads CONST into one slowly-rotating dimension j*; its key reads
//                     U into the same dimension, so after k_norm the key at position 0 points
//                     along j* and every query attends to position 0.
// A acts on B only through the expert (a two-block circuit): the direct attribution goes to the
// expert; ablating A or the expert at position 0 removes the sink.
#include "sinkscope/synth.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope {
namespace fs = std::filesystem;

namespace {

// Every tensor of the model by name, fp32 until written.
struct Store {
  std::vector<RequiredTensor> tensors;
  std::map<std::string, std::vector<float>> data;
  std::vector<float>& at(const std::string& name) { return data.at(name); }
};

}  // namespace

PlantedCircuit synthesize(const ModelConfig& shape, const std::string& out, bool plant,
                          uint64_t seed) {
  // Round trip through config.json: what is written is exactly what a reader will see (family,
  // defaults of the family, rotary dims).
  const ModelConfig c = parse_model_config_text(model_config_to_json(shape), "synth config");
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads, KV = c.num_kv_heads,
                V = c.vocab_size;
  PlantedCircuit pc;
  if (plant) {
    if (c.qk_norm == QkNormKind::kFullWidth || c.block != BlockKind::kPreNorm || !c.family->moe ||
        c.mla() || c.family->gpt_oss_layout)
      throw InputError(
          "synth --plant-circuit: needs a pre-norm MoE family with per-head or no "
          "q/k norms (qwen3_moe, qwen2_moe, mixtral); model_type is " +
          c.model_type);
    if (c.num_layers < 3) throw InputError("synth --plant-circuit: needs at least 3 layers");
    if (!c.is_moe_layer(1)) throw InputError("synth --plant-circuit: layer 1 must be an MoE layer");
    if (D < 8) throw InputError("synth --plant-circuit: hidden_size must be at least 8");
    if (d < 4) throw InputError("synth --plant-circuit: head_dim must be at least 4");
    if (V < 2) throw InputError("synth --plant-circuit: vocab_size must be at least 2");
    pc.head = H > 1 ? 1 : 0;
    pc.expert = c.num_experts > 2 ? 2 : 0;
    pc.sink_head = 0;
    pc.bos_token_id = 1;
  }
  if (!fs::is_directory(out)) {
    std::error_code ec;
    fs::create_directories(out, ec);
    if (ec)
      throw InputError("synth --out " + out + ": cannot create folder (" + ec.message() + ")");
  }
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto randn = [&](std::vector<float>& v, float stddev) {
    for (auto& x : v) x = normal(rng) * stddev;
  };
  const int64_t CONST = 0, BOS = 1, S = 2, U = 3;  // reserved channels when planting

  // Every tensor the family asks for: matrices ~ N(0, 1/fan_in), norm gains 1, biases 0; the
  // embedding ~ N(0, 1). Drawn in a fixed order (the embedding, then layer by layer, then the
  // output head), so a seed gives the same checkpoint from one version to the next.
  Store st;
  st.tensors = required_tensors(c, nullptr, false);
  const std::string embed_name = tensor_name(c, Role::kEmbed),
                    head_name = c.tie_word_embeddings ? "" : tensor_name(c, Role::kLmHead);
  auto draw = [&](const RequiredTensor& t) {
    int64_t n = 1;
    for (auto dim : t.shape) n *= dim;
    std::vector<float> v(static_cast<size_t>(n), 0.f);
    const bool is_bias = t.name.size() > 5 && t.name.compare(t.name.size() - 5, 5, ".bias") == 0;
    const bool is_router_bias =
        t.name.size() > 23 &&
        t.name.compare(t.name.size() - 23, 23, "e_score_correction_bias") == 0;
    const bool is_sink = t.name.size() > 6 && t.name.compare(t.name.size() - 6, 6, ".sinks") == 0;
    if (t.name == embed_name || is_sink)  // learned sink logits (gpt-oss) ~ N(0, 1)
      randn(v, 1.f);
    else if (is_router_bias)
      randn(v, 0.05f);  // DeepSeek's selection bias: small, so that it changes some selections
    else if (t.shape.size() == 1 && !is_bias)
      std::fill(v.begin(), v.end(), 1.f);
    else if (t.shape.size() >= 2)
      randn(v, 1.f / std::sqrt(static_cast<float>(t.shape.back())));
    st.data.emplace(t.name, std::move(v));
  };
  for (const auto& t : st.tensors)
    if (t.name == embed_name) draw(t);
  for (const auto& t : st.tensors)
    if (t.name != embed_name && t.name != head_name) draw(t);
  for (const auto& t : st.tensors)
    if (t.name == head_name) draw(t);
  auto W = [&](Role role, int64_t l = -1, int64_t e = -1) -> std::vector<float>& {
    return st.at(tensor_name(c, role, l, e));
  };
  auto& emb = W(Role::kEmbed);
  if (plant) {
    for (int64_t t = 0; t < V; ++t) {
      emb[t * D + CONST] = 3.f;
      emb[t * D + BOS] = t == pc.bos_token_id ? 8.f : 0.f;
      emb[t * D + S] = 0.f;
      emb[t * D + U] = 0.f;
    }
  }
  const int64_t jstar = d / 2 - 1;  // the most slowly rotating RoPE dimension
  // Without q/k norms the planted dimension j* gets its gain of 2 from the projections instead.
  const bool qk_norm = c.qk_norm == QkNormKind::kPerHead;
  std::vector<float> no_gain(static_cast<size_t>(d), 1.f);
  const float w_gain = qk_norm ? 1.f : 2.f;
  for (int64_t l = 0; plant && l < c.num_layers; ++l) {
    auto& q = W(Role::kQ, l);
    auto& k = W(Role::kK, l);
    auto& v = W(Role::kV, l);
    auto& o = W(Role::kO, l);
    auto& qn = qk_norm ? W(Role::kQNorm, l) : no_gain;
    auto& kn = qk_norm ? W(Role::kKNorm, l) : no_gain;
    // Keep the reserved channels clean of other components' writes.
    for (int64_t r : {S, U})
      for (int64_t j = 0; j < H * d; ++j) o[r * H * d + j] = 0.f;
    if (l == pc.head_layer) {
      // Head A: its query reads CONST and its key reads -BOS in dimension j*, so every query
      // i >= 1 avoids the BOS position; position 0 can only attend to itself. Its value reads
      // BOS, so z[0] carries the BOS feature and z[i >= 1] almost none.
      const int64_t g = pc.head / (H / KV);
      for (int64_t j = 0; j < d * D; ++j) q[pc.head * d * D + j] = 0.f;
      q[(pc.head * d + jstar) * D + CONST] = w_gain;
      for (int64_t j = 0; j < D; ++j) k[(g * d + jstar) * D + j] = 0.f;
      k[(g * d + jstar) * D + BOS] = -w_gain;
      qn[jstar] = 2.f;
      kn[jstar] = 2.f;
      for (int64_t j = 0; j < D; ++j) v[(g * d) * D + j] = 0.f;
      v[(g * d) * D + BOS] = 1.f;
      for (int64_t h = 0; h < H; ++h)  // only head A passes value dim 0 on, into channel S
        if (h / (H / KV) == g)
          for (int64_t r = 0; r < D; ++r) o[r * H * d + h * d] = 0.f;
      o[S * H * d + pc.head * d] = 1.f;
    }
    if (l == pc.sink_layer) {
      const int64_t g = pc.sink_head / (H / KV);
      for (int64_t j = 0; j < d * D; ++j) q[pc.sink_head * d * D + j] = 0.f;
      q[(pc.sink_head * d + jstar) * D + CONST] = w_gain;
      for (int64_t j = 0; j < D; ++j) k[(g * d + jstar) * D + j] = 0.f;
      k[(g * d + jstar) * D + U] = w_gain;
      qn[jstar] = 2.f;
      kn[jstar] = 2.f;
    }
    if (c.is_moe_layer(l)) {
      const int64_t E = c.num_experts, I = c.moe_intermediate_size;
      if (c.has_shared_expert()) {  // the shared expert stays out of the reserved channels
        const int64_t SI = c.shared_expert_intermediate_size;
        auto& sd = W(Role::kSharedDown, l);
        for (int64_t j = 0; j < SI; ++j) sd[S * SI + j] = sd[U * SI + j] = 0.f;
      }
      auto& router = W(Role::kRouter, l);
      for (int64_t e = 0; e < E; ++e) router[e * D + CONST] = 0.f;
      if (l == pc.expert_layer) router[pc.expert * D + CONST] = 8.f;
      for (int64_t e = 0; e < E; ++e) {
        auto& gw = W(Role::kExpertGate, l, e);
        auto& uw = W(Role::kExpertUp, l, e);
        auto& dw = W(Role::kExpertDown, l, e);
        for (int64_t j = 0; j < I; ++j) dw[S * I + j] = dw[U * I + j] = 0.f;
        if (l == pc.expert_layer && e == pc.expert) {
          const int64_t units = std::min<int64_t>(I, 8);
          for (int64_t j = 0; j < units; ++j) {
            for (int64_t r = 0; r < D; ++r) gw[j * D + r] = uw[j * D + r] = 0.f;
            gw[j * D + S] = 2.f;
            uw[j * D + S] = 2.f;
            for (int64_t r = 0; r < D; ++r) dw[r * I + j] = 0.f;
            dw[U * I + j] = 4.f;
          }
        }
      }
    } else {
      const int64_t I = c.intermediate_size;
      auto& dw = W(Role::kMlpDown, l);
      for (int64_t j = 0; j < I; ++j) dw[S * I + j] = dw[U * I + j] = 0.f;
    }
  }

  std::vector<TensorToWrite> tw;
  for (const auto& t : st.tensors)
    tw.push_back({t.name, DType::BF16, t.shape, st.at(t.name).data()});
  ModelConfig written = c;
  written.dtype = "bfloat16";
  const fs::path dir(out);
  write_safetensors((dir / "model.safetensors").string(), tw);
  {
    nlohmann::json j = nlohmann::json::parse(model_config_to_json(written));
    if (plant) j["bos_token_id"] = pc.bos_token_id;
    std::ofstream f(dir / "config.json");
    f << j.dump(2) << "\n";
    if (!f) throw InputError("synth: cannot write " + (dir / "config.json").string());
  }
  if (plant) {
    nlohmann::json j = {{"head_layer", pc.head_layer},     {"head", pc.head},
                        {"expert_layer", pc.expert_layer}, {"expert", pc.expert},
                        {"sink_layer", pc.sink_layer},     {"sink_head", pc.sink_head},
                        {"bos_token_id", pc.bos_token_id}, {"seed", seed}};
    std::ofstream f(dir / "planted_circuit.json");
    f << j.dump(2) << "\n";
  }
  return pc;
}

}  // namespace sinkscope
