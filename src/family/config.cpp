// config.json parsing: the family (sinkscope/family.hpp) decides which keys apply and their
// defaults; every value is range-checked before use (docs/reliability.md lists the limits).
#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/json_bounded.hpp"
#include "io/small_file.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"
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

std::string get_string(const json& j, const std::string& file, const char* key,
                       const std::string& fallback) {
  const json* v = find_key(j, key);
  if (!v) return fallback;
  if (!v->is_string()) fail(file, std::string("key '") + key + "' is not a string");
  return v->get<std::string>();
}

void in_range(const std::string& file, const char* key, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi)
    fail(file, std::string("key '") + key + "' must lie in [" + std::to_string(lo) + ", " +
                   std::to_string(hi) + "], got " + std::to_string(v));
}

// yarn as transformers' _compute_yarn_parameters: the correction range from
// original_max_position_embeddings, `truncate` (default true) flooring/ceiling its ends, and the
// attention factor mscale / mscale_all_dim (DeepSeek) or 0.1 ln(factor) + 1.
double yarn_mscale(double scale, double m) {
  return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0;
}

void read_yarn(const json& b, const std::string& file, const std::string& where, const json& top,
               RopeConfig& r) {
  r.kind = RopeKind::kYarn;
  r.original_max_position = get_int(b, file, "original_max_position_embeddings", true);
  if (r.original_max_position <= 0)
    fail(file, where + "original_max_position_embeddings must be positive");
  r.factor = get_double(b, file, "factor", 0);
  if (!find_key(b, "factor")) {
    const int64_t max_pos = get_int(top, file, "max_position_embeddings", true);
    r.factor = static_cast<double>(max_pos) / static_cast<double>(r.original_max_position);
  }
  r.beta_fast = get_double(b, file, "beta_fast", 32);
  r.beta_slow = get_double(b, file, "beta_slow", 1);
  if (r.beta_fast == 0) r.beta_fast = 32;  // transformers: `or 32`, `or 1`
  if (r.beta_slow == 0) r.beta_slow = 1;
  if (!(r.beta_fast > 0) || !(r.beta_slow > 0) || !std::isfinite(r.beta_fast) ||
      !std::isfinite(r.beta_slow))
    fail(file, where + "beta_fast and beta_slow must be positive");
  r.truncate = get_bool(b, file, "truncate", true);
  const double mscale = get_double(b, file, "mscale", 0);
  r.mscale_all_dim = get_double(b, file, "mscale_all_dim", 0);
  if (!(r.factor >= 1.0 && std::isfinite(r.factor)))
    fail(file, where + "factor must be a number >= 1");
  if (find_key(b, "attention_factor"))
    r.attention_factor = get_double(b, file, "attention_factor", 1.0);
  else if (mscale != 0 && r.mscale_all_dim != 0)
    r.attention_factor = yarn_mscale(r.factor, mscale) / yarn_mscale(r.factor, r.mscale_all_dim);
  else
    r.attention_factor = yarn_mscale(r.factor, 1.0);
  if (!(r.attention_factor > 0) || !std::isfinite(r.attention_factor))
    fail(file, where + "attention_factor must be positive");
}

// Rope: rope_theta (transformers 4), rope_parameters (transformers 5) and rope_scaling (4) are
// all read; every scaling type other than the supported ones is refused by name, never ignored.
void parse_rope(const json& j, const std::string& file, ModelConfig& c) {
  RopeConfig& r = c.rope;
  r.theta = get_double(j, file, "rope_theta", get_double(j, file, "rotary_emb_base", 10000.0));
  auto read_block = [&](const json& b, const char* key) {
    if (!b.is_object()) fail(file, std::string("key '") + key + "' is not an object");
    const std::string where = std::string(key) + ".";
    if (const json* t = find_key(b, "rope_theta")) {
      if (!t->is_number()) fail(file, where + "rope_theta is not a number");
      r.theta = t->get<double>();
    }
    std::string type = get_string(b, file, "rope_type", get_string(b, file, "type", "default"));
    if (type == "default") {
      r.kind = RopeKind::kDefault;
    } else if (type == "linear") {
      r.kind = RopeKind::kLinear;
      r.factor = get_double(b, file, "factor", 0);
    } else if (type == "llama3") {
      r.kind = RopeKind::kLlama3;
      r.factor = get_double(b, file, "factor", 0);
      r.low_freq_factor = get_double(b, file, "low_freq_factor", 0);
      r.high_freq_factor = get_double(b, file, "high_freq_factor", 0);
      r.original_max_position = get_int(b, file, "original_max_position_embeddings", true);
      if (!(r.low_freq_factor > 0) || !(r.high_freq_factor > r.low_freq_factor))
        fail(file, where + "llama3 needs 0 < low_freq_factor < high_freq_factor");
      if (r.original_max_position <= 0)
        fail(file, where + "original_max_position_embeddings must be positive");
    } else if (type == "yarn") {
      read_yarn(b, file, where, j, r);
    } else {
      // yarn's attention factor scales the rotated q and k: only the MLA path applies it.
      fail(file, where + "rope_type '" + type +
                     "' is not supported (supported: default, linear, llama3, yarn)");
    }
    if (r.kind != RopeKind::kDefault && !(r.factor >= 1.0 && std::isfinite(r.factor)))
      fail(file, where + "factor must be a number >= 1");
    if (const json* p = find_key(b, "partial_rotary_factor")) {
      if (!p->is_number()) fail(file, where + "partial_rotary_factor is not a number");
      r.rotary_dim = static_cast<int64_t>(p->get<double>() * static_cast<double>(c.head_dim));
    }
  };
  bool any_block = false;
  for (const char* key : {"rope_parameters", "rope_scaling"})
    if (const json* b = find_key(j, key)) {
      read_block(*b, key);
      any_block = true;
    }
  if (!any_block && c.family->gpt_oss_layout) {
    // GptOssConfig's defaults when config.json names no rope parameters.
    if (!find_key(j, "rope_theta")) r.theta = 150000.0;
    const json yarn = {{"rope_type", "yarn"}, {"factor", 32.0},
                       {"beta_fast", 32.0},   {"beta_slow", 1.0},
                       {"truncate", false},   {"original_max_position_embeddings", 4096}};
    read_yarn(yarn, file, "rope_parameters (GptOssConfig default).", j, r);
  }
  if (!(r.theta > 0) || !std::isfinite(r.theta)) fail(file, "rope_theta must be positive");
  if (const json* p = find_key(j, "rotary_pct")) {
    if (!p->is_number()) fail(file, "key 'rotary_pct' is not a number");
    r.rotary_dim = static_cast<int64_t>(p->get<double>() * static_cast<double>(c.head_dim));
  } else if (const json* p2 = find_key(j, "partial_rotary_factor")) {
    if (!p2->is_number()) fail(file, "key 'partial_rotary_factor' is not a number");
    r.rotary_dim = static_cast<int64_t>(p2->get<double>() * static_cast<double>(c.head_dim));
  } else if (r.rotary_dim == 0) {
    r.rotary_dim = c.family->block == BlockKind::kParallel
                       ? static_cast<int64_t>(0.25 * static_cast<double>(c.head_dim))
                       : c.head_dim;
  }
  if (r.rotary_dim <= 0 || r.rotary_dim > c.head_dim || r.rotary_dim % 2 != 0)
    fail(file, "the rotary dimension (" + std::to_string(r.rotary_dim) +
                   ") must be even and lie in [2, head_dim = " + std::to_string(c.head_dim) + "]");
}

// Multi-head latent attention (DeepSeek-V3): the key width is qk_nope + qk_rope, the value width
// v_head_dim; every head has its own key and value (num_key_value_heads = num_attention_heads).
void parse_mla(const json& j, const std::string& file, ModelConfig& c) {
  if (const json* q = find_key(j, "q_lora_rank")) {
    if (!q->is_number_integer()) fail(file, "key 'q_lora_rank' is not an integer");
    c.mla_q_rank = q->get<int64_t>();
    in_range(file, "q_lora_rank", c.mla_q_rank, 1, kMaxHidden);
  }
  c.mla_kv_rank = get_int(j, file, "kv_lora_rank", true);
  in_range(file, "kv_lora_rank", c.mla_kv_rank, 1, kMaxHidden);
  c.qk_nope_dim = get_int(j, file, "qk_nope_head_dim", true);
  c.qk_rope_dim = get_int(j, file, "qk_rope_head_dim", true);
  c.v_head_dim = get_int(j, file, "v_head_dim", true);
  in_range(file, "qk_nope_head_dim", c.qk_nope_dim, 1, kMaxHeadDim);
  in_range(file, "qk_rope_head_dim", c.qk_rope_dim, 2, kMaxHeadDim);
  in_range(file, "v_head_dim", c.v_head_dim, 1, kMaxHeadDim);
  if (c.qk_rope_dim % 2 != 0)
    fail(file, "qk_rope_head_dim must be even for RoPE, got " + std::to_string(c.qk_rope_dim));
  c.head_dim = c.qk_nope_dim + c.qk_rope_dim;
  in_range(file, "qk_nope_head_dim + qk_rope_head_dim", c.head_dim, 2, kMaxHeadDim);
  if (c.num_kv_heads != c.num_heads)
    fail(file, "key 'num_key_value_heads' (" + std::to_string(c.num_kv_heads) +
                   ") must equal num_attention_heads under multi-head latent attention");
  c.rope.rotary_dim = c.qk_rope_dim;
}

// DeepSeek routing and expert layout: sigmoid scores, n_group / topk_group, the routed scaling
// factor, n_shared_experts ungated shared experts, the first first_k_dense_replace layers dense.
void parse_deepseek_moe(const json& j, const std::string& file, ModelConfig& c) {
  const std::string scoring = get_string(j, file, "scoring_func", "sigmoid");
  if (scoring != "sigmoid")
    fail(file, "scoring_func '" + scoring + "' is not supported (supported: sigmoid)");
  const std::string method = get_string(j, file, "topk_method", "noaux_tc");
  if (method != "noaux_tc")
    fail(file, "topk_method '" + method + "' is not supported (supported: noaux_tc)");
  c.n_group = get_int(j, file, "n_group", false, 1);
  c.topk_group = get_int(j, file, "topk_group", false, 1);
  in_range(file, "n_group", c.n_group, 1, std::max<int64_t>(c.num_experts, 1));
  in_range(file, "topk_group", c.topk_group, 1, c.n_group);
  if (c.num_experts % c.n_group != 0)
    fail(file, "key 'n_group' (" + std::to_string(c.n_group) +
                   ") does not divide the number of experts (" + std::to_string(c.num_experts) +
                   ")");
  if (c.num_experts > 0 && c.num_experts / c.n_group < 2)
    fail(file, "key 'n_group': groups need at least 2 experts (groups are scored by their top 2)");
  if (c.num_experts > 0 && c.top_k > c.topk_group * (c.num_experts / c.n_group))
    fail(file, "key 'num_experts_per_tok' (" + std::to_string(c.top_k) +
                   ") exceeds the experts of topk_group groups");
  c.routed_scaling_factor = get_double(j, file, "routed_scaling_factor", 1.0);
  if (!(c.routed_scaling_factor > 0) || !std::isfinite(c.routed_scaling_factor))
    fail(file, "key 'routed_scaling_factor' must be positive");
  const int64_t shared = get_int(j, file, "n_shared_experts", false, 0);
  in_range(file, "n_shared_experts", shared, 0, kMaxExperts);
  c.shared_expert_intermediate_size = shared * c.moe_intermediate_size;
  c.shared_expert_gated = false;
  const int64_t dense = get_int(j, file, "first_k_dense_replace", false, 0);
  in_range(file, "first_k_dense_replace", dense, 0, c.num_layers);
  c.mlp_only_layers.clear();
  for (int64_t l = 0; l < dense; ++l) c.mlp_only_layers.push_back(l);
}

// quantization_config: only FP8 (e4m3) with block scales (`weight_scale_inv`) is read; any other
// method is refused by name, never ignored.
void parse_quantization(const json& j, const std::string& file, ModelConfig& c) {
  const json* q = find_key(j, "quantization_config");
  if (!q) return;
  if (!q->is_object()) fail(file, "key 'quantization_config' is not an object");
  const std::string method = get_string(*q, file, "quant_method", "");
  // gpt-oss: MXFP4 experts (`*_blocks` + `*_scales`), found by name in the checkpoint.
  if (method == "mxfp4" && c.family->gpt_oss_layout) {
    c.mxfp4_experts = true;
    return;
  }
  if (method != "fp8")
    fail(file, "quantization_config.quant_method '" + method +
                   "' is not supported (supported: fp8 with block scales; mxfp4 for gpt_oss)");
  const std::string fmt = get_string(*q, file, "fmt", "e4m3");
  if (fmt != "e4m3")
    fail(file, "quantization_config.fmt '" + fmt + "' is not supported (supported: e4m3)");
  c.fp8_block_rows = c.fp8_block_cols = 128;
  if (const json* b = find_key(*q, "weight_block_size")) {
    if (!b->is_array() || b->size() != 2 || !(*b)[0].is_number_integer() ||
        !(*b)[1].is_number_integer() || (*b)[0].get<int64_t>() <= 0 ||
        (*b)[1].get<int64_t>() <= 0 || (*b)[0].get<int64_t>() > (int64_t{1} << 20) ||
        (*b)[1].get<int64_t>() > (int64_t{1} << 20))
      fail(file, "quantization_config.weight_block_size must be two positive integers");
    c.fp8_block_rows = (*b)[0].get<int64_t>();
    c.fp8_block_cols = (*b)[1].get<int64_t>();
  }
}

// gpt-oss: learned sinks, biases everywhere (attention_bias, default true), the clamped SwiGLU,
// and `layer_types` (sliding_attention / full_attention per layer; GptOssConfig's default
// alternates, starting with a sliding layer).
void parse_gpt_oss(const json& j, const std::string& file, ModelConfig& c) {
  c.learned_sinks = true;
  c.router_bias = c.expert_bias = true;
  c.qkv_bias = c.o_bias = get_bool(j, file, "attention_bias", true);
  c.act = Activation::kSwigluClamped;
  c.swiglu_limit = get_double(j, file, "swiglu_limit", 7.0);
  c.swiglu_alpha = get_double(j, file, "swiglu_alpha", 1.702);
  if (!(c.swiglu_limit > 0) || !std::isfinite(c.swiglu_limit))
    fail(file, "key 'swiglu_limit' must be positive");
  if (!std::isfinite(c.swiglu_alpha)) fail(file, "key 'swiglu_alpha' must be finite");
  c.sliding_layers.assign(static_cast<size_t>(c.num_layers), 0);
  if (const json* v = find_key(j, "layer_types")) {
    if (!v->is_array() || v->size() != static_cast<size_t>(c.num_layers))
      fail(file,
           "key 'layer_types' must list one type per layer (" + std::to_string(c.num_layers) + ")");
    for (size_t l = 0; l < v->size(); ++l) {
      const json& t = (*v)[l];
      const std::string s = t.is_string() ? t.get<std::string>() : "";
      if (s != "sliding_attention" && s != "full_attention")
        fail(file, "key 'layer_types' entry " + std::to_string(l) +
                       " must be \"sliding_attention\" or \"full_attention\"");
      c.sliding_layers[l] = s == "sliding_attention";
    }
  } else {
    for (int64_t l = 0; l < c.num_layers; ++l)
      c.sliding_layers[static_cast<size_t>(l)] = l % 2 == 0;
  }
}

Activation parse_activation(const std::string& file, const std::string& act) {
  if (act == "silu" || act == "swish") return Activation::kSilu;
  if (act == "gelu") return Activation::kGeluErf;
  if (act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast")
    return Activation::kGeluTanh;
  fail(file, "hidden_act '" + act +
                 "' is not supported (supported: silu, gelu, gelu_new, gelu_pytorch_tanh)");
}

}  // namespace

std::vector<double> RopeConfig::inv_freq(int64_t head_dim) const {
  const int64_t rd = rotated(head_dim), n = rd / 2;
  std::vector<double> f(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j)
    f[static_cast<size_t>(j)] =
        1.0 / std::pow(theta, static_cast<double>(2 * j) / static_cast<double>(rd));
  if (kind == RopeKind::kLinear) {
    for (auto& v : f) v /= factor;
  } else if (kind == RopeKind::kLlama3) {
    // transformers' _compute_llama3_parameters: long wavelengths are slowed by `factor`, short
    // ones kept, and the band in between interpolated.
    const double old = static_cast<double>(original_max_position);
    const double low_wavelen = old / low_freq_factor, high_wavelen = old / high_freq_factor;
    for (auto& v : f) {
      const double wavelen = 2 * M_PI / v;
      double out = wavelen > low_wavelen ? v / factor : v;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        const double smooth =
            (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
        out = (1 - smooth) * out / factor + smooth * out;
      }
      v = out;
    }
  }
  if (kind == RopeKind::kYarn) {
    // transformers' _compute_yarn_parameters: interpolated (/ factor) below the ramp's low end,
    // extrapolated (unchanged) above its high end, linear in between (the ramp in float32).
    const double dim = static_cast<double>(rd), base = theta;
    auto correction_dim = [&](double rotations) {
      return dim * std::log(static_cast<double>(original_max_position) / (rotations * 2 * M_PI)) /
             (2 * std::log(base));
    };
    double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
    if (truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, dim - 1);
    if (low == high) high += 0.001;
    for (int64_t j = 0; j < n; ++j) {
      const float ramp = std::clamp(
          (static_cast<float>(j) - static_cast<float>(low)) / static_cast<float>(high - low), 0.f,
          1.f);
      const double extrapolation = 1.0 - static_cast<double>(ramp);
      const double v = f[static_cast<size_t>(j)];
      f[static_cast<size_t>(j)] = v / factor * (1 - extrapolation) + v * extrapolation;
    }
  }
  return f;
}

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end())
    return false;
  return decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
}

bool ModelConfig::any_dense_layer() const {
  for (int64_t l = 0; l < num_layers; ++l)
    if (!is_moe_layer(l)) return true;
  return false;
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
  c.model_type = get_string(j, file, "model_type", "");
  if (c.model_type.empty()) fail(file, "missing key 'model_type'");
  try {
    c.family = &family_of(c.model_type);
  } catch (const InputError& e) {
    fail(file, e.what());
  }
  const FamilySpec& f = *c.family;
  c.block = f.block;
  c.norm = f.norm;
  c.qk_norm = f.qk_norm;
  c.router = f.router;

  c.vocab_size = get_int(j, file, "vocab_size", true);
  c.hidden_size = get_int(j, file, "hidden_size", true);
  c.num_layers = get_int(j, file, "num_hidden_layers", true);
  c.num_heads = get_int(j, file, "num_attention_heads", true);
  in_range(file, "vocab_size", c.vocab_size, 1, kMaxVocab);
  in_range(file, "hidden_size", c.hidden_size, 1, kMaxHidden);
  in_range(file, "num_hidden_layers", c.num_layers, 1, kMaxLayers);
  in_range(file, "num_attention_heads", c.num_heads, 1, kMaxHeads);
  c.num_kv_heads = get_int(j, file, "num_key_value_heads", false, c.num_heads);
  in_range(file, "num_key_value_heads", c.num_kv_heads, 1, c.num_heads);
  if (f.mla) {
    parse_mla(j, file, c);
  } else if (find_key(j, "head_dim")) {
    c.head_dim = get_int(j, file, "head_dim", true);
    in_range(file, "head_dim", c.head_dim, 2, kMaxHeadDim);
  } else {
    if (c.hidden_size % c.num_heads != 0)
      fail(file, "num_attention_heads (" + std::to_string(c.num_heads) +
                     ") does not divide hidden_size (" + std::to_string(c.hidden_size) +
                     ") and head_dim is absent");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0)
    fail(file, "head_dim must be even for RoPE, got " + std::to_string(c.head_dim));
  if (c.num_heads % c.num_kv_heads != 0)
    fail(file, "num_key_value_heads (" + std::to_string(c.num_kv_heads) +
                   ") does not divide num_attention_heads (" + std::to_string(c.num_heads) + ")");
  c.intermediate_size = get_int(j, file, "intermediate_size", false, 0);
  in_range(file, "intermediate_size", c.intermediate_size, 0, kMaxInter);

  // Experts.
  if (f.moe) {
    if (find_key(j, "num_experts"))
      c.num_experts = get_int(j, file, "num_experts", true);
    else if (find_key(j, "num_local_experts"))
      c.num_experts = get_int(j, file, "num_local_experts", false, 0);
    else
      c.num_experts = get_int(j, file, "n_routed_experts", false, 0);
    in_range(file, "num_experts", c.num_experts, 0, kMaxExperts);
    c.top_k = get_int(j, file, "num_experts_per_tok", c.num_experts > 0, 0);
    // OLMoE and Mixtral size their experts with intermediate_size; Qwen with its own key.
    c.moe_intermediate_size = get_int(j, file, "moe_intermediate_size", false, c.intermediate_size);
    in_range(file, "moe_intermediate_size", c.moe_intermediate_size, 0, kMaxInter);
    c.norm_topk_prob = get_bool(j, file, "norm_topk_prob", f.default_norm_topk);
    c.decoder_sparse_step = get_int(j, file, "decoder_sparse_step", false, 1);
    if (const json* v = find_key(j, "mlp_only_layers")) {
      if (!v->is_array()) fail(file, "key 'mlp_only_layers' is not a list");
      if (v->size() > static_cast<size_t>(c.num_layers))
        fail(file, "key 'mlp_only_layers' lists more layers than num_hidden_layers");
      for (const auto& x : *v) {
        if (!x.is_number_integer()) fail(file, "key 'mlp_only_layers' has a non-integer entry");
        const int64_t l = x.get<int64_t>();
        if (l < 0 || l >= c.num_layers)
          fail(file, "key 'mlp_only_layers' names layer " + std::to_string(l) +
                         " of a model with " + std::to_string(c.num_layers) + " layers");
        c.mlp_only_layers.push_back(l);
      }
    }
    if (f.shared_expert) {
      c.shared_expert_intermediate_size =
          get_int(j, file, "shared_expert_intermediate_size", false, 0);
      in_range(file, "shared_expert_intermediate_size", c.shared_expert_intermediate_size, 0,
               kMaxInter);
    }
    if (f.mla) parse_deepseek_moe(j, file, c);
    if (const json* v = find_key(j, "clip_qkv"))
      fail(file, "key 'clip_qkv' (" + v->dump() +
                     ") is not supported: the key attribution needs linear projections");
  }

  // Norms, biases, activation, residual wiring.
  c.rms_norm_eps = c.norm == NormKind::kLayer ? get_double(j, file, "layer_norm_eps", 1e-5)
                                              : get_double(j, file, "rms_norm_eps", 1e-6);
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps))
    fail(file, c.norm == NormKind::kLayer ? "key 'layer_norm_eps' must be positive"
                                          : "key 'rms_norm_eps' must be positive");
  c.tie_word_embeddings = get_bool(j, file, "tie_word_embeddings", f.default_tied);
  if (c.family->block == BlockKind::kParallel) {
    c.block = get_bool(j, file, "use_parallel_residual", true) ? BlockKind::kParallel
                                                               : BlockKind::kPreNorm;
    c.gated_mlp = false;
    c.qkv_bias = c.o_bias = get_bool(j, file, "attention_bias", true);
    c.mlp_bias = true;
    c.act = parse_activation(file, get_string(j, file, "hidden_act", "gelu"));
  } else {
    const bool attention_bias = get_bool(j, file, "attention_bias", false);
    c.qkv_bias = get_bool(j, file, "qkv_bias", f.default_qkv_bias || attention_bias);
    c.o_bias = attention_bias;
    c.mlp_bias = get_bool(j, file, "mlp_bias", false);
    c.act = parse_activation(file, get_string(j, file, "hidden_act", "silu"));
  }
  if (f.gpt_oss_layout) parse_gpt_oss(j, file, c);
  if (const json* v = find_key(j, "sliding_window")) {
    const bool use = get_bool(j, file, "use_sliding_window",
                              f.model_type != std::string("qwen2_moe") &&
                                  f.model_type != std::string("qwen3_moe") &&
                                  f.model_type != std::string("qwen3"));
    if (use) {
      if (!v->is_number_integer() || v->get<int64_t>() <= 0)
        fail(file, "key 'sliding_window' must be a positive integer");
      c.sliding_window = v->get<int64_t>();
    }
  }
  if (f.mla) {
    if (c.qkv_bias || c.o_bias)
      fail(file, "key 'attention_bias' = true is not supported for " + c.model_type +
                     " (the latent projections' biases; no released model has them)");
    c.rope.interleave = get_bool(j, file, "rope_interleave", true);
  }
  parse_rope(j, file, c);
  if (f.mla) {
    // transformers: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under yarn.
    c.softmax_scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    if (c.rope.kind == RopeKind::kYarn && c.rope.mscale_all_dim != 0) {
      const double m = yarn_mscale(c.rope.factor, c.rope.mscale_all_dim);
      c.softmax_scale *= m * m;
    }
  }
  parse_quantization(j, file, c);
  c.dtype = get_string(j, file, "torch_dtype", get_string(j, file, "dtype", ""));

  // Consistency: every contradiction is reported by name.
  if (c.num_experts > 0) {
    in_range(file, "num_experts_per_tok", c.top_k, 1, c.num_experts);
    if (c.decoder_sparse_step <= 0 || c.decoder_sparse_step > c.num_layers)
      fail(file, "key 'decoder_sparse_step' must lie in [1, num_hidden_layers]");
  }
  bool any_moe = false, any_dense = false;
  for (int64_t l = 0; l < c.num_layers; ++l) (c.is_moe_layer(l) ? any_moe : any_dense) = true;
  if (any_moe && c.moe_intermediate_size <= 0)
    fail(file, "key 'moe_intermediate_size' must be positive");
  if (any_dense && c.intermediate_size <= 0) fail(file, "key 'intermediate_size' must be positive");
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
  const FamilySpec& f =
      c.family ? *c.family : family_of(c.model_type.empty() ? "qwen3_moe" : c.model_type);
  json j;
  j["architectures"] = json::array({f.architecture});
  j["model_type"] = f.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["intermediate_size"] = c.intermediate_size;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["max_position_embeddings"] = 32768;
  j["torch_dtype"] = c.dtype.empty() ? "bfloat16" : c.dtype;
  j["rope_theta"] = c.rope.theta;
  if (c.rope.kind == RopeKind::kLinear)
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope.factor}};
  if (c.rope.kind == RopeKind::kLlama3)
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope.factor},
                         {"low_freq_factor", c.rope.low_freq_factor},
                         {"high_freq_factor", c.rope.high_freq_factor},
                         {"original_max_position_embeddings", c.rope.original_max_position}};
  if (c.rope.kind == RopeKind::kYarn)
    j["rope_scaling"] = {{"rope_type", "yarn"},
                         {"factor", c.rope.factor},
                         {"original_max_position_embeddings", c.rope.original_max_position},
                         {"beta_fast", c.rope.beta_fast},
                         {"beta_slow", c.rope.beta_slow},
                         {"attention_factor", c.rope.attention_factor},
                         {"truncate", c.rope.truncate},
                         {"mscale_all_dim", c.rope.mscale_all_dim}};
  if (c.fp8_block_rows > 0)
    j["quantization_config"] = {{"quant_method", "fp8"},
                                {"fmt", "e4m3"},
                                {"activation_scheme", "dynamic"},
                                {"weight_block_size", {c.fp8_block_rows, c.fp8_block_cols}}};
  if (f.gpt_oss_layout) {
    j["intermediate_size"] = c.moe_intermediate_size;
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
    std::vector<std::string> types;
    for (int64_t l = 0; l < c.num_layers; ++l)
      types.push_back(static_cast<size_t>(l) < c.sliding_layers.size() &&
                              c.sliding_layers[static_cast<size_t>(l)]
                          ? "sliding_attention"
                          : "full_attention");
    j["layer_types"] = types;
    j["swiglu_limit"] = c.swiglu_limit;
    j["swiglu_alpha"] = c.swiglu_alpha;
  }
  if (c.norm == NormKind::kLayer) {
    j["layer_norm_eps"] = c.rms_norm_eps;
  } else {
    j["rms_norm_eps"] = c.rms_norm_eps;
  }
  if (f.block == BlockKind::kParallel) {
    j["use_parallel_residual"] = c.block == BlockKind::kParallel;
    j["rotary_pct"] = c.rope.rotary_dim > 0
                          ? static_cast<double>(c.rope.rotary_dim) / static_cast<double>(c.head_dim)
                          : 0.25;
    j["hidden_act"] = c.act == Activation::kGeluTanh ? "gelu_new" : "gelu";
    j["attention_bias"] = c.qkv_bias;
  } else {
    j["head_dim"] = c.head_dim;
    j["hidden_act"] = "silu";
    j["attention_bias"] = c.o_bias || (f.gpt_oss_layout && c.qkv_bias);
    if (f.default_qkv_bias) j["qkv_bias"] = c.qkv_bias;
    j["mlp_bias"] = c.mlp_bias;
  }
  if (f.moe) {
    j["num_experts"] = c.num_experts;
    j["num_local_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.top_k;
    j["moe_intermediate_size"] = c.moe_intermediate_size;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["decoder_sparse_step"] = c.decoder_sparse_step;
    j["mlp_only_layers"] = c.mlp_only_layers;
    j["output_router_logits"] = false;
    j["router_aux_loss_coef"] = 0.001;
    if (f.shared_expert && !f.mla)
      j["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size;
  }
  if (f.mla) {
    // DeepseekV3Config's keys (transformers writes head_dim = qk_rope_head_dim).
    j.erase("num_experts");
    j.erase("num_local_experts");
    j.erase("decoder_sparse_step");
    j.erase("mlp_only_layers");
    j["n_routed_experts"] = c.num_experts;
    j["head_dim"] = c.qk_rope_dim;
    j["q_lora_rank"] = c.mla_q_rank > 0 ? json(c.mla_q_rank) : json(nullptr);
    j["kv_lora_rank"] = c.mla_kv_rank;
    j["qk_nope_head_dim"] = c.qk_nope_dim;
    j["qk_rope_head_dim"] = c.qk_rope_dim;
    j["v_head_dim"] = c.v_head_dim;
    j["rope_interleave"] = c.rope.interleave;
    j["n_group"] = c.n_group;
    j["topk_group"] = c.topk_group;
    j["routed_scaling_factor"] = c.routed_scaling_factor;
    j["n_shared_experts"] = c.moe_intermediate_size > 0
                                ? c.shared_expert_intermediate_size / c.moe_intermediate_size
                                : 0;
    j["first_k_dense_replace"] = static_cast<int64_t>(c.mlp_only_layers.size());
    j["scoring_func"] = "sigmoid";
    j["topk_method"] = "noaux_tc";
  }
  return j.dump(2) + "\n";
}

}  // namespace sinkscope
