// The model description read from a Hugging Face config.json. Which keys mean what, and which
// architectural features a model has, is decided by its family (sinkscope/family.hpp): this struct
// holds the resolved values, so the rest of the code asks "does it have a q/k bias" rather than
// "is it qwen2_moe".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sinkscope {

struct FamilySpec;

// How a decoder layer is wired (docs/metrics.md section 0 and "Model families").
enum class BlockKind : int32_t {
  kPreNorm = 0,   // y = x + attn(norm(x)); x' = y + mlp(norm(y))           (Llama, Qwen, Mixtral)
  kPostNorm = 1,  // y = x + norm(attn(x)); x' = y + norm(mlp(y))           (OLMo-2)
  kParallel = 2,  // x' = x + attn(norm1(x)) + mlp(norm2(x))                (GPT-NeoX, Pythia)
};
enum class NormKind : int32_t { kRms = 0, kLayer = 1 };  // RMSNorm | LayerNorm with bias
// q/k normalisation after the projections: none, per head over head_dim (Qwen3), or over the full
// projection width spanning all heads (OLMoE, OLMo-2).
enum class QkNormKind : int32_t { kNone = 0, kPerHead = 1, kFullWidth = 2 };
// kSwigluClamped (gpt-oss): gate' = min(gate, limit), up' = clamp(up, -limit, limit),
// h = (up' + 1) * gate' * sigmoid(1.702 gate') (ModelConfig::swiglu_limit).
enum class Activation : int32_t { kSilu = 0, kGeluErf = 1, kGeluTanh = 2, kSwigluClamped = 3 };
// Router: softmax over all experts then top-k (Qwen, OLMoE), or top-k of the logits then a
// softmax over the selected (Mixtral).
// DeepSeek-V3: sigmoid scores, group-limited top-k of the scores plus a selection-only bias,
// weights from the uncorrected scores (docs/metrics.md "DeepSeek-V3").
enum class RouterKind : int32_t { kSoftmaxTopK = 0, kTopKSoftmax = 1, kSigmoidGroupTopK = 2 };
enum class RopeKind : int32_t { kDefault = 0, kLinear = 1, kLlama3 = 2, kYarn = 3 };

struct RopeConfig {
  RopeKind kind = RopeKind::kDefault;
  double theta = 10000.0;
  int64_t rotary_dim = 0;  // dims of each head that rotate (partial rotary); 0: all of head_dim
  double factor = 1.0;     // linear and llama3
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int64_t original_max_position = 8192;                  // llama3, yarn
  // yarn (transformers' _compute_yarn_parameters): the correction range of beta_fast/beta_slow
  // rotations (floor/ceil when truncate); attention_factor scales cos and sin (so position 0's
  // rotation is a scaling by it), from attention_factor, or mscale / mscale_all_dim, or
  // 0.1 ln(factor) + 1; mscale_all_dim > 0 also scales the softmax (DeepSeek-V3).
  double beta_fast = 32, beta_slow = 1, attention_factor = 1.0, mscale_all_dim = 0;
  bool truncate = true;
  bool interleave = false;  // rotate pairs (2j, 2j+1) instead of halves (DeepSeek rope_interleave)
  int64_t rotated(int64_t head_dim) const { return rotary_dim > 0 ? rotary_dim : head_dim; }
  // The inverse frequencies of the rotated pairs, [rotated(head_dim) / 2], as transformers builds
  // them.
  std::vector<double> inv_freq(int64_t head_dim) const;
};

struct ModelConfig {
  std::string model_type;              // "qwen3_moe", "olmoe", "gpt_neox", ...
  const FamilySpec* family = nullptr;  // set by parse_model_config (never null afterwards)
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
  int64_t shared_expert_intermediate_size = 0;  // > 0: every MoE layer has a gated shared expert
  double rms_norm_eps = 1e-6;  // the norms' epsilon (layer_norm_eps for LayerNorm families)
  RopeConfig rope;
  bool tie_word_embeddings = false;
  std::string dtype;  // torch_dtype or dtype ("bfloat16", ...), informational

  // Architecture, resolved from the family and the config's switches.
  BlockKind block = BlockKind::kPreNorm;
  NormKind norm = NormKind::kRms;
  QkNormKind qk_norm = QkNormKind::kPerHead;
  Activation act = Activation::kSilu;  // of the dense MLP and the experts
  bool gated_mlp = true;               // SwiGLU (gate, up, down) or a plain up/act/down MLP
  RouterKind router = RouterKind::kSoftmaxTopK;
  bool qkv_bias = false;  // q/k/v projection biases
  bool o_bias = false;    // output projection bias
  bool mlp_bias = false;  // biases on the MLP's projections
  double clip_qkv = 0;    // > 0: q, k, v clamped to [-clip, clip] after the projections (OLMoE)
  int64_t sliding_window = 0;  // > 0: the model attends within a window (probes must fit in it)
  // Per-layer attention types (gpt-oss `layer_types`): 1 = sliding_attention, 0 = full. Empty:
  // every layer uses sliding_window (when > 0), and longer probes are refused (contract 1.1).
  std::vector<uint8_t> sliding_layers;
  bool learned_sinks = false;  // a learned sink logit per head (`self_attn.sinks`, gpt-oss)
  bool router_bias = false;    // the router's logits have a bias
  bool expert_bias = false;    // the experts' projections have biases
  double swiglu_limit = 7.0, swiglu_alpha = 1.702;  // Activation::kSwigluClamped

  // Multi-head latent attention (DeepSeek-V3; mla_kv_rank > 0). head_dim is then the query/key
  // width qk_nope + qk_rope, num_kv_heads = num_heads, and rope.rotary_dim = qk_rope (the last
  // dims of each head).
  int64_t mla_q_rank = 0;   // q_lora_rank; 0: a plain q_proj
  int64_t mla_kv_rank = 0;  // kv_lora_rank
  int64_t qk_nope_dim = 0, qk_rope_dim = 0, v_head_dim = 0;
  double softmax_scale = 0;  // > 0: the attention's scale (else 1 / sqrt(head_dim))
  // DeepSeek routing (router == kSigmoidGroupTopK) and its ungated shared experts.
  int64_t n_group = 1, topk_group = 1;
  double routed_scaling_factor = 1.0;
  bool shared_expert_gated = true;  // false: the shared expert has no sigmoid gate
  // FP8 checkpoints (quantization_config quant_method fp8): weight_scale_inv block shape.
  int64_t fp8_block_rows = 0, fp8_block_cols = 0;  // 0: no FP8 quantization declared
  // gpt-oss: quantization_config quant_method mxfp4 (the released checkpoints' experts as
  // `*_blocks` + `*_scales`). Informational for the planner's bytes on disk: the loader finds the
  // stored form by name, and model_config_to_json does not write it (synth writes bf16 experts).
  bool mxfp4_experts = false;

  // Layer l is MoE when the model has experts, l is not in mlp_only_layers and
  // (l+1) % decoder_sparse_step == 0.
  bool is_moe_layer(int64_t layer) const;
  bool any_dense_layer() const;
  bool has_shared_expert() const { return shared_expert_intermediate_size > 0; }
  int64_t kv_group_size() const { return num_heads / num_kv_heads; }
  bool mla() const { return mla_kv_rank > 0; }
  int64_t value_dim() const { return mla() ? v_head_dim : head_dim; }
  // The attention window of layer l: query i sees keys j with i - window < j <= i; 0 = all j <= i.
  int64_t window(int64_t layer) const {
    if (sliding_layers.empty()) return sliding_window;
    return sliding_layers.at(static_cast<size_t>(layer)) ? sliding_window : 0;
  }
};

// Parses and validates config.json. Throws InputError naming the file and the key that is
// missing, of the wrong type, out of its documented range or contradictory (e.g. top_k > experts,
// heads not dividing); an unsupported model_type or rope setting is refused by name.
ModelConfig parse_model_config(const std::string& config_json_path);
ModelConfig parse_model_config_text(const std::string& json_text,
                                    const std::string& name_for_errors);

// Writes a config.json that transformers' config class of the family loads (used by `synth`).
std::string model_config_to_json(const ModelConfig& c);

}  // namespace sinkscope
