#include "model/tensor_names.hpp"

#include "sinkscope/checkpoint.hpp"

namespace sinkscope {

bool experts_fused(const Checkpoint& ckpt, int64_t layer) {
  return ckpt.find(layer_prefix(layer) + "mlp.experts.gate_up_proj") != nullptr;
}

ExpertLocation expert_location(const Checkpoint& ckpt, const ModelConfig& c, int64_t layer,
                               int64_t e) {
  const std::string p = layer_prefix(layer) + "mlp.experts.";
  const int64_t I = c.moe_intermediate_size, D = c.hidden_size;
  if (experts_fused(ckpt, layer)) {
    // gate_up_proj [E, 2I, D]: rows [e*2I, e*2I + I) are gate, the next I rows are up.
    return {{p + "gate_up_proj", e * 2 * I, e * 2 * I + I},
            {p + "gate_up_proj", e * 2 * I + I, (e + 1) * 2 * I},
            {p + "down_proj", e * D, (e + 1) * D}};
  }
  const std::string q = p + std::to_string(e) + ".";
  return {
      {q + "gate_proj.weight", 0, I}, {q + "up_proj.weight", 0, I}, {q + "down_proj.weight", 0, D}};
}

std::vector<RequiredTensor> required_tensors(const ModelConfig& c, const Checkpoint& ckpt) {
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads, KV = c.num_kv_heads;
  std::vector<RequiredTensor> r;
  r.push_back({"model.embed_tokens.weight", {c.vocab_size, D}});
  r.push_back({"model.norm.weight", {D}});
  if (!c.tie_word_embeddings) r.push_back({"lm_head.weight", {c.vocab_size, D}});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = layer_prefix(l);
    r.push_back({p + "input_layernorm.weight", {D}});
    r.push_back({p + "post_attention_layernorm.weight", {D}});
    r.push_back({p + "self_attn.q_proj.weight", {H * d, D}});
    r.push_back({p + "self_attn.k_proj.weight", {KV * d, D}});
    r.push_back({p + "self_attn.v_proj.weight", {KV * d, D}});
    r.push_back({p + "self_attn.o_proj.weight", {D, H * d}});
    r.push_back({p + "self_attn.q_norm.weight", {d}});
    r.push_back({p + "self_attn.k_norm.weight", {d}});
    if (c.is_moe_layer(l)) {
      const int64_t E = c.num_experts, I = c.moe_intermediate_size;
      r.push_back({p + "mlp.gate.weight", {E, D}});
      if (experts_fused(ckpt, l)) {
        r.push_back({p + "mlp.experts.gate_up_proj", {E, 2 * I, D}});
        r.push_back({p + "mlp.experts.down_proj", {E, D, I}});
      } else {
        for (int64_t e = 0; e < E; ++e) {
          const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
          r.push_back({q + "gate_proj.weight", {I, D}});
          r.push_back({q + "up_proj.weight", {I, D}});
          r.push_back({q + "down_proj.weight", {D, I}});
        }
      }
    } else {
      const int64_t I = c.intermediate_size;
      r.push_back({p + "mlp.gate_proj.weight", {I, D}});
      r.push_back({p + "mlp.up_proj.weight", {I, D}});
      r.push_back({p + "mlp.down_proj.weight", {D, I}});
    }
  }
  return r;
}

}  // namespace sinkscope
