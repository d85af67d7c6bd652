// config.json parsing: every key variant of INTERFACE.md "Inputs", validated before use.
#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/json_bounded.hpp"
#include "io/small_file.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/limits.hpp"

namespace sinkscope {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw InputError(file + ": " + what);
}

const json* find_key(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

int64_t get_int(const json& j, const std::string& file, const char* key, bool required,
                int64_t fallback = 0) {
  const json* v = find_key(j, key);
  if (!v) {
    if (required) fail(file, std::string("missing key '") + key + "'");
    return fallback;
  }
  if (!v->is_number_integer()) fail(file, std::string("key '") + key + "' is not an integer");
  return v->get<int64_t>();
}

double get_double(const json& j, const std::string& file, const char* key, double fallback) {
  const json* v = find_key(j, key);
  if (!v) return fallback;
  if (!v->is_number()) fail(file, std::string("key '") + key + "' is not a number");
  return v->get<double>();
}

bool get_bool(const json& j, const std::string& file, const char* key, bool fallback) {
  const json* v = find_key(j, key);
  if (!v) return fallback;
  if (!v->is_boolean()) fail(file, std::string("key '") + key + "' is not a boolean");
  return v->get<bool>();
}

}  // namespace

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end())
    return false;
  return decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
}

ModelConfig parse_model_config_text(const std::string& text, const std::string& file) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(file, std::string("not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) fail(file, "top level is not a JSON object");

  ModelConfig c;
  if (const json* v = find_key(j, "model_type"); v && v->is_string())
    c.model_type = v->get<std::string>();
  if (c.model_type.empty()) fail(file, "missing key 'model_type'");
  if (c.model_type != "qwen3_moe" && c.model_type != "qwen2_moe" && c.model_type != "qwen3")
    fail(file, "model_type '" + c.model_type + "' is not supported (supported: qwen3_moe, qwen3)");

  c.vocab_size = get_int(j, file, "vocab_size", true);
  c.hidden_size = get_int(j, file, "hidden_size", true);
  c.num_layers = get_int(j, file, "num_hidden_layers", true);
  c.num_heads = get_int(j, file, "num_attention_heads", true);
  c.num_kv_heads = get_int(j, file, "num_key_value_heads", false, c.num_heads);
  c.head_dim = get_int(j, file, "head_dim", false, 0);
  c.intermediate_size = get_int(j, file, "intermediate_size", false, 0);
  c.moe_intermediate_size = get_int(j, file, "moe_intermediate_size", false, 0);
  if (find_key(j, "num_experts"))
    c.num_experts = get_int(j, file, "num_experts", true);
  else
    c.num_experts = get_int(j, file, "num_local_experts", false, 0);
  c.top_k = get_int(j, file, "num_experts_per_tok", c.num_experts > 0, 0);
  c.norm_topk_prob = get_bool(j, file, "norm_topk_prob", c.model_type == "qwen3_moe");
  c.decoder_sparse_step = get_int(j, file, "decoder_sparse_step", false, 1);
  if (const json* v = find_key(j, "mlp_only_layers")) {
    if (!v->is_array()) fail(file, "key 'mlp_only_layers' is not a list");
    for (const auto& x : *v) {
      if (!x.is_number_integer()) fail(file, "key 'mlp_only_layers' has a non-integer entry");
      c.mlp_only_layers.push_back(x.get<int64_t>());
    }
  }
  c.rms_norm_eps = get_double(j, file, "rms_norm_eps", 1e-6);
  c.tie_word_embeddings = get_bool(j, file, "tie_word_embeddings", false);

  // rope_theta (older writers) or rope_parameters.rope_theta (transformers >= 5).
  if (find_key(j, "rope_theta")) {
    c.rope_theta = get_double(j, file, "rope_theta", 10000.0);
  } else if (const json* rp = find_key(j, "rope_parameters")) {
    if (!rp->is_object()) fail(file, "key 'rope_parameters' is not an object");
    c.rope_theta = get_double(*rp, file, "rope_theta", 10000.0);
    if (const json* t = find_key(*rp, "rope_type");
        t && t->is_string() && t->get<std::string>() != "default")
      fail(file, "rope_parameters.rope_type '" + t->get<std::string>() +
                     "' is not supported (only 'default')");
  }
  if (const json* rs = find_key(j, "rope_scaling"); rs && rs->is_object()) {
    const json* t = find_key(*rs, "rope_type");
    if (!t) t = find_key(*rs, "type");
    if (t && t->is_string() && t->get<std::string>() != "default")
      fail(file,
           "rope_scaling type '" + t->get<std::string>() + "' is not supported (only 'default')");
  }
  if (const json* v = find_key(j, "torch_dtype"); v && v->is_string())
    c.dtype = v->get<std::string>();
  else if (const json* v2 = find_key(j, "dtype"); v2 && v2->is_string())
    c.dtype = v2->get<std::string>();

  // Consistency: every contradiction is reported by name.
  auto positive = [&](int64_t v, const char* key) {
    if (v <= 0)
      fail(file, std::string("key '") + key + "' must be positive, got " + std::to_string(v));
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.hidden_size, "hidden_size");
  positive(c.num_layers, "num_hidden_layers");
  positive(c.num_heads, "num_attention_heads");
  positive(c.num_kv_heads, "num_key_value_heads");
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_heads != 0)
      fail(file, "num_attention_heads (" + std::to_string(c.num_heads) +
                     ") does not divide hidden_size (" + std::to_string(c.hidden_size) +
                     ") and head_dim is absent");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  positive(c.head_dim, "head_dim");
  if (c.head_dim % 2 != 0)
    fail(file, "head_dim must be even for RoPE, got " + std::to_string(c.head_dim));
  if (c.num_heads % c.num_kv_heads != 0)
    fail(file, "num_key_value_heads (" + std::to_string(c.num_kv_heads) +
                   ") does not divide num_attention_heads (" + std::to_string(c.num_heads) + ")");
  if (c.num_experts < 0) fail(file, "num_experts must not be negative");
  if (c.num_experts > 0) {
    positive(c.top_k, "num_experts_per_tok");
    if (c.top_k > c.num_experts)
      fail(file, "num_experts_per_tok (" + std::to_string(c.top_k) + ") exceeds num_experts (" +
                     std::to_string(c.num_experts) + ")");
    positive(c.decoder_sparse_step, "decoder_sparse_step");
  }
  bool any_moe = false, any_dense = false;
  for (int64_t l = 0; l < c.num_layers; ++l) (c.is_moe_layer(l) ? any_moe : any_dense) = true;
  if (any_moe) positive(c.moe_intermediate_size, "moe_intermediate_size");
  if (any_dense) positive(c.intermediate_size, "intermediate_size");
  if (!(c.rms_norm_eps > 0)) fail(file, "key 'rms_norm_eps' must be positive");
  if (!(c.rope_theta > 0)) fail(file, "rope_theta must be positive");
  return c;
}

ModelConfig parse_model_config(const std::string& path) {
  // A regular file of at most kMaxConfigBytes (a FIFO or /dev/zero is refused, never read), and
  // nested at most kMaxJsonDepth levels: checked by a bounded parse before the full one.
  const std::string text = read_regular_file(path, kMaxConfigBytes, "config file");
  parse_json_bounded(text, path, kMaxJsonDepth);
  return parse_model_config_text(text, path);
}

std::string model_config_to_json(const ModelConfig& c) {
  json j;
  j["architectures"] = json::array({"Qwen3MoeForCausalLM"});
  j["model_type"] = c.model_type.empty() ? "qwen3_moe" : c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["intermediate_size"] = c.intermediate_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_experts"] = c.num_experts;
  j["num_experts_per_tok"] = c.top_k;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["decoder_sparse_step"] = c.decoder_sparse_step;
  j["mlp_only_layers"] = c.mlp_only_layers;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["max_position_embeddings"] = 32768;
  j["torch_dtype"] = c.dtype.empty() ? "bfloat16" : c.dtype;
  j["output_router_logits"] = false;
  j["router_aux_loss_coef"] = 0.001;
  return j.dump(2) + "\n";
}

}  // namespace sinkscope
