// The model description read from a Hugging Face config.json (Qwen3-MoE family first).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sinkscope {

struct ModelConfig {
  std::string model_type;  // "qwen3_moe"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;         // num_hidden_layers
  int64_t num_heads = 0;          // num_attention_heads
  int64_t num_kv_heads = 0;       // num_key_value_heads
  int64_t head_dim = 0;           // head_dim, or hidden_size / num_heads when absent
  int64_t intermediate_size = 0;  // dense MLP layers
  int64_t moe_intermediate_size = 0;
  int64_t num_experts = 0;  // num_experts or num_local_experts
  int64_t top_k = 0;        // num_experts_per_tok
  bool norm_topk_prob = true;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;  // rope_theta or rope_parameters.rope_theta
  bool tie_word_embeddings = false;
  std::string dtype;  // torch_dtype or dtype ("bfloat16", ...), informational

  // docs/schema.md: layer l is MoE when l is not in mlp_only_layers and (l+1) % decoder_sparse_step
  // == 0.
  bool is_moe_layer(int64_t layer) const;
  int64_t kv_group_size() const { return num_heads / num_kv_heads; }
};

// Parses and validates config.json. Throws InputError naming the file and the key that is
// missing, of the wrong type or contradictory (e.g. top_k > experts, heads not dividing).
ModelConfig parse_model_config(const std::string& config_json_path);
ModelConfig parse_model_config_text(const std::string& json_text,
                                    const std::string& name_for_errors);

// Writes a config.json that transformers' Qwen3MoeConfig loads (used by `synth`).
std::string model_config_to_json(const ModelConfig& c);

}  // namespace sinkscope
