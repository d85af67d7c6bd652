#include "model/weights.hpp"

#include "model/tensor_names.hpp"
#include "sinkscope/checkpoint.hpp"

namespace sinkscope {
namespace {

std::vector<float> rows(const Checkpoint& ck, const std::string& name, int64_t r0, int64_t r1,
                        int64_t width) {
  std::vector<float> out(static_cast<size_t>((r1 - r0) * width));
  ck.read_rows(name, r0, r1, out.data());
  return out;
}

std::vector<float> vec(const Checkpoint& ck, const std::string& name, int64_t n) {
  return rows(ck, name, 0, n, 1);
}

}  // namespace

ModelWeights load_weights(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head) {
  const ModelConfig& c = ck.config();
  const int64_t D = c.hidden_size, d = c.head_dim;
  ModelWeights w;
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights& L = w.layers[static_cast<size_t>(l)];
    const std::string p = layer_prefix(l);
    L.input_norm = vec(ck, p + "input_layernorm.weight", D);
    L.post_norm = vec(ck, p + "post_attention_layernorm.weight", D);
    L.q = rows(ck, p + "self_attn.q_proj.weight", plan.head_begin * d, plan.head_end * d, D);
    L.k = rows(ck, p + "self_attn.k_proj.weight", plan.kv_begin * d, plan.kv_end * d, D);
    L.v = rows(ck, p + "self_attn.v_proj.weight", plan.kv_begin * d, plan.kv_end * d, D);
    L.o.resize(static_cast<size_t>(D * plan.local_heads() * d));
    ck.read_cols(p + "self_attn.o_proj.weight", plan.head_begin * d, plan.head_end * d, L.o.data());
    L.q_norm = vec(ck, p + "self_attn.q_norm.weight", d);
    L.k_norm = vec(ck, p + "self_attn.k_norm.weight", d);
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      L.router = rows(ck, p + "mlp.gate.weight", 0, c.num_experts, D);
      for (int64_t e = plan.expert_begin; e < plan.expert_end; ++e) {
        // Expert tensor parallelism: this rank's rows [inter_begin, inter_end) of gate/up and the
        // same columns of down (the SwiGLU is element-wise over the intermediate dimension).
        const ExpertLocation loc = expert_location(ck, c, l, e);
        const int64_t i0 = plan.inter_begin, i1 = plan.inter_end;
        MlpWeights m;
        m.inter = i1 - i0;
        m.gate = rows(ck, loc.gate.tensor, loc.gate.row_begin + i0, loc.gate.row_begin + i1, D);
        m.up = rows(ck, loc.up.tensor, loc.up.row_begin + i0, loc.up.row_begin + i1, D);
        m.down.resize(static_cast<size_t>(D * m.inter));
        ck.read_block(loc.down.tensor, loc.down.row_begin, loc.down.row_end, i0, i1, m.down.data());
        L.experts.push_back(std::move(m));
      }
    } else {
      const int64_t I = c.intermediate_size;
      L.dense.inter = I;
      L.dense.gate = rows(ck, p + "mlp.gate_proj.weight", 0, I, D);
      L.dense.up = rows(ck, p + "mlp.up_proj.weight", 0, I, D);
      L.dense.down = rows(ck, p + "mlp.down_proj.weight", 0, D, I);
    }
  }
  w.final_norm = vec(ck, "model.norm.weight", D);
  if (with_lm_head)
    w.lm_head = rows(ck, c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", 0,
                     c.vocab_size, D);
  return w;
}

}  // namespace sinkscope
