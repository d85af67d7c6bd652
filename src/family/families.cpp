// The family table (docs/families.md): every supported model_type, its architecture and its tensor
// names. Adding a family is one entry here plus its golden fixture under tests/golden/families/.
#include <string>

#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope {
namespace {

using R = Role;

// Names shared by the Llama-style families (model.layers.{l}.self_attn.*, mlp.*).
void llama_names(FamilySpec& f) {
  auto& n = f.names;
  n[size_t(R::kEmbed)] = "model.embed_tokens.weight";
  n[size_t(R::kFinalNorm)] = "model.norm.weight";
  n[size_t(R::kLmHead)] = "lm_head.weight";
  n[size_t(R::kAttnNorm)] = "model.layers.{l}.input_layernorm.weight";
  n[size_t(R::kMlpNorm)] = "model.layers.{l}.post_attention_layernorm.weight";
  n[size_t(R::kQ)] = "model.layers.{l}.self_attn.q_proj.weight";
  n[size_t(R::kK)] = "model.layers.{l}.self_attn.k_proj.weight";
  n[size_t(R::kV)] = "model.layers.{l}.self_attn.v_proj.weight";
  n[size_t(R::kO)] = "model.layers.{l}.self_attn.o_proj.weight";
  n[size_t(R::kQBias)] = "model.layers.{l}.self_attn.q_proj.bias";
  n[size_t(R::kKBias)] = "model.layers.{l}.self_attn.k_proj.bias";
  n[size_t(R::kVBias)] = "model.layers.{l}.self_attn.v_proj.bias";
  n[size_t(R::kOBias)] = "model.layers.{l}.self_attn.o_proj.bias";
  n[size_t(R::kMlpGate)] = "model.layers.{l}.mlp.gate_proj.weight";
  n[size_t(R::kMlpUp)] = "model.layers.{l}.mlp.up_proj.weight";
  n[size_t(R::kMlpDown)] = "model.layers.{l}.mlp.down_proj.weight";
  n[size_t(R::kMlpGateBias)] = "model.layers.{l}.mlp.gate_proj.bias";
  n[size_t(R::kMlpUpBias)] = "model.layers.{l}.mlp.up_proj.bias";
  n[size_t(R::kMlpDownBias)] = "model.layers.{l}.mlp.down_proj.bias";
}

void qk_norm_names(FamilySpec& f) {
  f.names[size_t(R::kQNorm)] = "model.layers.{l}.self_attn.q_norm.weight";
  f.names[size_t(R::kKNorm)] = "model.layers.{l}.self_attn.k_norm.weight";
}

// Experts under mlp. (Qwen, OLMoE): per expert, or fused 3-D as transformers 5 writes them.
void moe_names(FamilySpec& f) {
  auto& n = f.names;
  n[size_t(R::kRouter)] = "model.layers.{l}.mlp.gate.weight";
  n[size_t(R::kExpertGate)] = "model.layers.{l}.mlp.experts.{e}.gate_proj.weight";
  n[size_t(R::kExpertUp)] = "model.layers.{l}.mlp.experts.{e}.up_proj.weight";
  n[size_t(R::kExpertDown)] = "model.layers.{l}.mlp.experts.{e}.down_proj.weight";
  n[size_t(R::kExpertsGateUp)] = "model.layers.{l}.mlp.experts.gate_up_proj";
  n[size_t(R::kExpertsDown)] = "model.layers.{l}.mlp.experts.down_proj";
}

std::vector<FamilySpec> make_families() {
  std::vector<FamilySpec> out;
  {
    FamilySpec f{"qwen3_moe", "Qwen3MoeForCausalLM",
                 "Qwen3-MoE: per-head q/k RMSNorm, softmax router, optional dense layers"};
    f.qk_norm = QkNormKind::kPerHead;
    f.moe = true;
    f.default_norm_topk = true;
    llama_names(f);
    qk_norm_names(f);
    moe_names(f);
    out.push_back(f);
  }
  {
    FamilySpec f{"qwen3", "Qwen3ForCausalLM", "Qwen3 dense: per-head q/k RMSNorm, SwiGLU"};
    f.qk_norm = QkNormKind::kPerHead;
    f.default_tied = false;
    llama_names(f);
    qk_norm_names(f);
    out.push_back(f);
  }
  {
    FamilySpec f{"qwen2_moe", "Qwen2MoeForCausalLM",
                 "Qwen2-MoE: q/k/v biases, softmax router, shared expert with a sigmoid gate"};
    f.moe = true;
    f.shared_expert = true;
    f.default_qkv_bias = true;
    llama_names(f);
    moe_names(f);
    auto& n = f.names;
    n[size_t(R::kSharedGate)] = "model.layers.{l}.mlp.shared_expert.gate_proj.weight";
    n[size_t(R::kSharedUp)] = "model.layers.{l}.mlp.shared_expert.up_proj.weight";
    n[size_t(R::kSharedDown)] = "model.layers.{l}.mlp.shared_expert.down_proj.weight";
    n[size_t(R::kSharedExpertGate)] = "model.layers.{l}.mlp.shared_expert_gate.weight";
    out.push_back(f);
  }
  {
    FamilySpec f{"olmoe", "OlmoeForCausalLM",
                 "OLMoE: q/k RMSNorm over the full projection width, softmax router"};
    f.qk_norm = QkNormKind::kFullWidth;
    f.moe = true;
    f.default_norm_topk = false;
    llama_names(f);
    qk_norm_names(f);
    moe_names(f);
    out.push_back(f);
  }
  {
    FamilySpec f{"mixtral", "MixtralForCausalLM",
                 "Mixtral: top-k of the router logits, softmax over the selected"};
    f.moe = true;
    f.router = RouterKind::kTopKSoftmax;
    f.default_norm_topk = true;
    llama_names(f);
    auto& n = f.names;
    n[size_t(R::kRouter)] =
        "model.layers.{l}.block_sparse_moe.gate.weight|model.layers.{l}.mlp.gate.weight";
    n[size_t(R::kExpertGate)] = "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight";
    n[size_t(R::kExpertUp)] = "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight";
    n[size_t(R::kExpertDown)] = "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight";
    n[size_t(R::kExpertsGateUp)] = "model.layers.{l}.mlp.experts.gate_up_proj";
    n[size_t(R::kExpertsDown)] = "model.layers.{l}.mlp.experts.down_proj";
    out.push_back(f);
  }
  {
    FamilySpec f{"llama", "LlamaForCausalLM", "Llama (1-3): RMSNorm, SwiGLU, Llama-3 rope_scaling"};
    llama_names(f);
    out.push_back(f);
  }
  {
    FamilySpec f{"olmo2", "Olmo2ForCausalLM",
                 "OLMo-2: norms after attention and MLP, q/k RMSNorm over the full width"};
    f.block = BlockKind::kPostNorm;
    f.qk_norm = QkNormKind::kFullWidth;
    llama_names(f);
    qk_norm_names(f);
    auto& n = f.names;
    n[size_t(R::kAttnNorm)] = nullptr;
    n[size_t(R::kMlpNorm)] = nullptr;
    n[size_t(R::kAttnOutNorm)] = "model.layers.{l}.post_attention_layernorm.weight";
    n[size_t(R::kMlpOutNorm)] = "model.layers.{l}.post_feedforward_layernorm.weight";
    out.push_back(f);
  }
  {
    FamilySpec f{"deepseek_v3", "DeepseekV3ForCausalLM",
                 "DeepSeek-V3: multi-head latent attention, sigmoid group-limited router with a "
                 "selection bias, ungated shared experts, FP8 block-scaled weights"};
    f.moe = true;
    f.mla = true;
    f.shared_expert = true;
    f.router = RouterKind::kSigmoidGroupTopK;
    f.default_norm_topk = true;
    llama_names(f);
    moe_names(f);
    auto& n = f.names;
    n[size_t(R::kK)] = nullptr;
    n[size_t(R::kV)] = nullptr;
    n[size_t(R::kQA)] = "model.layers.{l}.self_attn.q_a_proj.weight";
    n[size_t(R::kQANorm)] = "model.layers.{l}.self_attn.q_a_layernorm.weight";
    n[size_t(R::kQB)] = "model.layers.{l}.self_attn.q_b_proj.weight";
    n[size_t(R::kKvA)] = "model.layers.{l}.self_attn.kv_a_proj_with_mqa.weight";
    n[size_t(R::kKvANorm)] = "model.layers.{l}.self_attn.kv_a_layernorm.weight";
    n[size_t(R::kKvB)] = "model.layers.{l}.self_attn.kv_b_proj.weight";
    n[size_t(R::kRouterScoreBias)] = "model.layers.{l}.mlp.gate.e_score_correction_bias";
    n[size_t(R::kSharedGate)] = "model.layers.{l}.mlp.shared_experts.gate_proj.weight";
    n[size_t(R::kSharedUp)] = "model.layers.{l}.mlp.shared_experts.up_proj.weight";
    n[size_t(R::kSharedDown)] = "model.layers.{l}.mlp.shared_experts.down_proj.weight";
    out.push_back(f);
  }
  {
    FamilySpec f{
        "gpt_neox", "GPTNeoXForCausalLM",
        "GPT-NeoX / Pythia: LayerNorm, parallel residual, partial rotary, fused qkv, GELU"};
    f.block = BlockKind::kParallel;
    f.norm = NormKind::kLayer;
    f.default_qkv_bias = true;
    auto& n = f.names;
    n[size_t(R::kEmbed)] = "gpt_neox.embed_in.weight";
    n[size_t(R::kFinalNorm)] = "gpt_neox.final_layer_norm.weight";
    n[size_t(R::kFinalNormBias)] = "gpt_neox.final_layer_norm.bias";
    n[size_t(R::kLmHead)] = "embed_out.weight";
    n[size_t(R::kAttnNorm)] = "gpt_neox.layers.{l}.input_layernorm.weight";
    n[size_t(R::kAttnNormBias)] = "gpt_neox.layers.{l}.input_layernorm.bias";
    n[size_t(R::kMlpNorm)] = "gpt_neox.layers.{l}.post_attention_layernorm.weight";
    n[size_t(R::kMlpNormBias)] = "gpt_neox.layers.{l}.post_attention_layernorm.bias";
    n[size_t(R::kQkv)] = "gpt_neox.layers.{l}.attention.query_key_value.weight";
    n[size_t(R::kQkvBias)] = "gpt_neox.layers.{l}.attention.query_key_value.bias";
    n[size_t(R::kO)] = "gpt_neox.layers.{l}.attention.dense.weight";
    n[size_t(R::kOBias)] = "gpt_neox.layers.{l}.attention.dense.bias";
    n[size_t(R::kMlpUp)] = "gpt_neox.layers.{l}.mlp.dense_h_to_4h.weight";
    n[size_t(R::kMlpUpBias)] = "gpt_neox.layers.{l}.mlp.dense_h_to_4h.bias";
    n[size_t(R::kMlpDown)] = "gpt_neox.layers.{l}.mlp.dense_4h_to_h.weight";
    n[size_t(R::kMlpDownBias)] = "gpt_neox.layers.{l}.mlp.dense_4h_to_h.bias";
    out.push_back(f);
  }
  {
    FamilySpec f{"gpt_oss", "GptOssForCausalLM",
                 "gpt-oss: learned attention sinks, alternating sliding/full layers, yarn, "
                 "biased experts with a clamped SwiGLU (bf16 or MXFP4)"};
    f.moe = true;
    f.gpt_oss_layout = true;
    f.router = RouterKind::kTopKSoftmax;
    f.default_norm_topk = true;
    f.default_qkv_bias = true;
    llama_names(f);
    auto& n = f.names;
    n[size_t(R::kSinks)] = "model.layers.{l}.self_attn.sinks";
    n[size_t(R::kRouter)] = "model.layers.{l}.mlp.router.weight";
    n[size_t(R::kRouterBias)] = "model.layers.{l}.mlp.router.bias";
    n[size_t(R::kExpertsGateUp)] =
        "model.layers.{l}.mlp.experts.gate_up_proj|model.layers.{l}.mlp.experts.gate_up_proj_"
        "blocks";
    n[size_t(R::kExpertsDown)] =
        "model.layers.{l}.mlp.experts.down_proj|model.layers.{l}.mlp.experts.down_proj_blocks";
    n[size_t(R::kExpertsGateUpBias)] = "model.layers.{l}.mlp.experts.gate_up_proj_bias";
    n[size_t(R::kExpertsDownBias)] = "model.layers.{l}.mlp.experts.down_proj_bias";
    out.push_back(f);
  }
  return out;
}

}  // namespace

const std::vector<const FamilySpec*>& all_families() {
  static const std::vector<FamilySpec> families = make_families();
  static const std::vector<const FamilySpec*> ptrs = [] {
    std::vector<const FamilySpec*> p;
    for (const auto& f : families) p.push_back(&f);
    return p;
  }();
  return ptrs;
}

const FamilySpec& family_of(const std::string& model_type) {
  std::string names;
  for (const FamilySpec* f : all_families()) {
    if (model_type == f->model_type) return *f;
    names += (names.empty() ? "" : ", ") + std::string(f->model_type);
  }
  throw InputError("model_type '" + model_type + "' is not supported (supported: " + names + ")");
}

}  // namespace sinkscope
