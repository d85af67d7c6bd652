#include "cpu/weights.hpp"

#include "sinkscope/checkpoint.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope {
namespace {

class Loader {
 public:
  explicit Loader(const Checkpoint& ck) : ck_(ck), c_(ck.config()) {}

  std::vector<float> rows(Role role, int64_t l, int64_t r0, int64_t r1, int64_t width) const {
    return rows_of(tensor_name(c_, role, l, -1, &ck_), r0, r1, width);
  }
  std::vector<float> rows_of(const std::string& name, int64_t r0, int64_t r1,
                             int64_t width) const {
    std::vector<float> out(static_cast<size_t>((r1 - r0) * width));
    ck_.read_rows(name, r0, r1, out.data());
    return out;
  }
  // A 1-D tensor's elements [b, e), or nothing where the family or config has no such tensor.
  std::vector<float> vec(Role role, int64_t l, int64_t b, int64_t e, bool present = true) const {
    if (!present || !has_role(c_, role)) return {};
    return rows(role, l, b, e, 1);
  }
  NormWeights norm(Role gain, Role bias, int64_t l) const {
    if (!has_role(c_, gain)) return {};
    const int64_t D = c_.hidden_size;
    return {vec(gain, l, 0, D), vec(bias, l, 0, D, c_.norm == NormKind::kLayer)};
  }
  // Column block [c0, c1) of every row of a 2-D tensor (o_proj's columns of this rank's heads).
  std::vector<float> cols(Role role, int64_t l, int64_t rows, int64_t c0, int64_t c1) const {
    std::vector<float> out(static_cast<size_t>(rows * (c1 - c0)));
    ck_.read_cols(tensor_name(c_, role, l), c0, c1, out.data());
    return out;
  }
  MlpWeights dense_mlp(int64_t l) const {
    const int64_t D = c_.hidden_size, I = c_.intermediate_size;
    MlpWeights m;
    m.inter = I;
    if (c_.gated_mlp) m.gate = rows(Role::kMlpGate, l, 0, I, D);
    m.up = rows(Role::kMlpUp, l, 0, I, D);
    m.down = rows(Role::kMlpDown, l, 0, D, I);
    if (c_.gated_mlp) m.gate_bias = vec(Role::kMlpGateBias, l, 0, I, c_.mlp_bias);
    m.up_bias = vec(Role::kMlpUpBias, l, 0, I, c_.mlp_bias);
    m.down_bias = vec(Role::kMlpDownBias, l, 0, D, c_.mlp_bias);
    return m;
  }

 private:
  const Checkpoint& ck_;
  const ModelConfig& c_;
};

}  // namespace

ModelWeights load_weights(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head) {
  const ModelConfig& c = ck.config();
  const Loader ld(ck);
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads;
  const int64_t h0 = plan.head_begin, h1 = plan.head_end, g0 = plan.kv_begin, g1 = plan.kv_end;
  ModelWeights w;
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights& L = w.layers[static_cast<size_t>(l)];
    L.attn_norm = ld.norm(Role::kAttnNorm, Role::kAttnNormBias, l);
    L.mlp_norm = ld.norm(Role::kMlpNorm, Role::kMlpNormBias, l);
    L.attn_out_norm = ld.norm(Role::kAttnOutNorm, Role::kCount, l);
    L.mlp_out_norm = ld.norm(Role::kMlpOutNorm, Role::kCount, l);
    if (has_role(c, Role::kQkv)) {
      // GPT-NeoX: rows of query_key_value are [H, 3, d] (per head: q, k, v); no GQA.
      const std::string name = tensor_name(c, Role::kQkv, l);
      for (int64_t h = h0; h < h1; ++h) {
        auto part = [&](int64_t which, std::vector<float>& dst) {
          auto r = ld.rows_of(name, (3 * h + which) * d, (3 * h + which + 1) * d, D);
          dst.insert(dst.end(), r.begin(), r.end());
        };
        part(0, L.q);
        part(1, L.k);
        part(2, L.v);
        if (c.qkv_bias) {
          const std::string bname = tensor_name(c, Role::kQkvBias, l);
          auto bias = [&](int64_t which, std::vector<float>& dst) {
            auto r = ld.rows_of(bname, (3 * h + which) * d, (3 * h + which + 1) * d, 1);
            dst.insert(dst.end(), r.begin(), r.end());
          };
          bias(0, L.q_bias);
          bias(1, L.k_bias);
          bias(2, L.v_bias);
        }
      }
    } else {
      L.q = ld.rows(Role::kQ, l, h0 * d, h1 * d, D);
      L.k = ld.rows(Role::kK, l, g0 * d, g1 * d, D);
      L.v = ld.rows(Role::kV, l, g0 * d, g1 * d, D);
      L.q_bias = ld.vec(Role::kQBias, l, h0 * d, h1 * d, c.qkv_bias);
      L.k_bias = ld.vec(Role::kKBias, l, g0 * d, g1 * d, c.qkv_bias);
      L.v_bias = ld.vec(Role::kVBias, l, g0 * d, g1 * d, c.qkv_bias);
    }
    L.o = ld.cols(Role::kO, l, D, h0 * d, h1 * d);
    L.o_bias = ld.vec(Role::kOBias, l, 0, D, c.o_bias);
    if (c.qk_norm == QkNormKind::kPerHead) {
      L.q_norm = ld.vec(Role::kQNorm, l, 0, d);
      L.k_norm = ld.vec(Role::kKNorm, l, 0, d);
    } else if (c.qk_norm == QkNormKind::kFullWidth) {
      L.q_norm = ld.vec(Role::kQNorm, l, h0 * d, h1 * d);
      L.k_norm = ld.vec(Role::kKNorm, l, g0 * d, g1 * d);
    }
    (void)H;
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      L.router = ld.rows(Role::kRouter, l, 0, c.num_experts, D);
      for (int64_t e = plan.expert_begin; e < plan.expert_end; ++e) {
        // Expert tensor parallelism: this rank's rows [inter_begin, inter_end) of gate/up and the
        // same columns of down (the SwiGLU is element-wise over the intermediate dimension).
        const ExpertLocation loc = expert_location(ck, l, e);
        const int64_t i0 = plan.inter_begin, i1 = plan.inter_end;
        MlpWeights m;
        m.inter = i1 - i0;
        m.gate = ld.rows_of(loc.gate.tensor, loc.gate.row_begin + i0, loc.gate.row_begin + i1, D);
        m.up = ld.rows_of(loc.up.tensor, loc.up.row_begin + i0, loc.up.row_begin + i1, D);
        m.down.resize(static_cast<size_t>(D * m.inter));
        ck.read_block(loc.down.tensor, loc.down.row_begin, loc.down.row_end, i0, i1, m.down.data());
        L.experts.push_back(std::move(m));
      }
      if (c.has_shared_expert()) {
        const int64_t S = c.shared_expert_intermediate_size;
        L.shared.inter = S;
        L.shared.gate = ld.rows(Role::kSharedGate, l, 0, S, D);
        L.shared.up = ld.rows(Role::kSharedUp, l, 0, S, D);
        L.shared.down = ld.rows(Role::kSharedDown, l, 0, D, S);
        L.shared_gate = ld.rows(Role::kSharedExpertGate, l, 0, 1, D);
      }
    } else {
      L.dense = ld.dense_mlp(l);
    }
  }
  w.final_norm = {ld.vec(Role::kFinalNorm, -1, 0, D),
                  ld.vec(Role::kFinalNormBias, -1, 0, D, c.norm == NormKind::kLayer)};
  if (with_lm_head)
    w.lm_head = ld.rows(c.tie_word_embeddings ? Role::kEmbed : Role::kLmHead, -1, 0, c.vocab_size, D);
  return w;
}

}  // namespace sinkscope
