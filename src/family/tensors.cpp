// Tensor names and the tensors a model needs, from the family table (sinkscope/family.hpp).
#include <string>

#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope {
namespace {

std::string expand(const std::string& pattern, int64_t layer, int64_t expert) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern.compare(i, 3, "{l}") == 0) {
      out += std::to_string(layer);
      i += 2;
    } else if (pattern.compare(i, 3, "{e}") == 0) {
      out += std::to_string(expert);
      i += 2;
    } else {
      out += pattern[i];
    }
  }
  return out;
}

const char* pattern_of(const ModelConfig& c, Role role) {
  if (!c.family) throw RuntimeFailure("model config has no family (parse_model_config not used)");
  return c.family->names[static_cast<size_t>(role)];
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// gpt-oss experts: bf16 [E, D, 2I] / [E, I, D] (in x out), or the MXFP4 form of the released
// checkpoints, rows out x in: gate_up_proj_blocks [E, 2I, D/32, 16] + _scales [E, 2I, D/32],
// down_proj_blocks [E, D, I/32, 16] + _scales [E, D, I/32] (uint8).
void gpt_oss_expert_tensors(const ModelConfig& c, const Checkpoint* ckpt, int64_t l,
                            std::vector<RequiredTensor>& r) {
  const int64_t E = c.num_experts, I = c.moe_intermediate_size, D = c.hidden_size;
  auto name = [&](Role role) { return tensor_name(c, role, l, -1, ckpt); };
  r.push_back({name(Role::kRouter), {E, D}});
  if (c.router_bias) r.push_back({name(Role::kRouterBias), {E}});
  auto matrix = [&](Role role, int64_t in, int64_t out) {
    const std::string n = name(role);
    if (!is_mxfp4_blocks(n)) {
      r.push_back({n, {E, in, out}});
      return;
    }
    // MXFP4 blocks of 32 values along the input dimension.
    const int64_t groups = in / 32;
    if (in % 32 != 0 && ckpt)
      throw InputError(ckpt->dir() + ": tensor '" + n +
                       "' is MXFP4, which needs a multiple of 32 " +
                       "inputs; config.json implies " + std::to_string(in));
    r.push_back({n, {E, out, groups, 16}, "U8"});
    r.push_back({mxfp4_scales_name(n), {E, out, groups}, "U8"});
  };
  matrix(Role::kExpertsGateUp, D, 2 * I);
  matrix(Role::kExpertsDown, I, D);
  if (c.expert_bias) {
    r.push_back({name(Role::kExpertsGateUpBias), {E, 2 * I}});
    r.push_back({name(Role::kExpertsDownBias), {E, D}});
  }
}

}  // namespace

bool has_role(const ModelConfig& c, Role role) { return pattern_of(c, role) != nullptr; }

std::string tensor_name(const ModelConfig& c, Role role, int64_t layer, int64_t expert,
                        const Checkpoint* ckpt) {
  const char* p = pattern_of(c, role);
  if (!p)
    throw RuntimeFailure("family " + c.model_type + " has no tensor of role " +
                         std::to_string(static_cast<int>(role)));
  std::string all(p), first;
  size_t start = 0;
  while (true) {
    const size_t bar = all.find('|', start);
    const std::string name =
        expand(all.substr(start, bar == std::string::npos ? std::string::npos : bar - start), layer,
               expert);
    if (first.empty()) first = name;
    if (!ckpt || ckpt->find(name)) return name;
    if (bar == std::string::npos) break;
    start = bar + 1;
  }
  return first;
}

bool is_mxfp4_blocks(const std::string& name) {
  return name.size() > 7 && name.compare(name.size() - 7, 7, "_blocks") == 0;
}

std::string mxfp4_scales_name(const std::string& blocks_name) {
  return blocks_name.substr(0, blocks_name.size() - 7) + "_scales";
}

bool experts_fused(const Checkpoint& ckpt, int64_t layer) {
  const ModelConfig& c = ckpt.config();
  return has_role(c, Role::kExpertsGateUp) &&
         ckpt.find(tensor_name(c, Role::kExpertsGateUp, layer, -1, &ckpt)) != nullptr;
}

ExpertLocation expert_location(const Checkpoint& ckpt, int64_t layer, int64_t e) {
  const ModelConfig& c = ckpt.config();
  const int64_t I = c.moe_intermediate_size, D = c.hidden_size;
  if (experts_fused(ckpt, layer)) {
    // gate_up_proj [E, 2I, D]: rows [e*2I, e*2I + I) are gate, the next I rows are up.
    const std::string gu = tensor_name(c, Role::kExpertsGateUp, layer),
                      dn = tensor_name(c, Role::kExpertsDown, layer);
    return {{gu, e * 2 * I, e * 2 * I + I},
            {gu, e * 2 * I + I, (e + 1) * 2 * I},
            {dn, e * D, (e + 1) * D}};
  }
  return {{tensor_name(c, Role::kExpertGate, layer, e, &ckpt), 0, I},
          {tensor_name(c, Role::kExpertUp, layer, e, &ckpt), 0, I},
          {tensor_name(c, Role::kExpertDown, layer, e, &ckpt), 0, D}};
}

std::vector<RequiredTensor> required_tensors(const Checkpoint& ckpt) {
  return required_tensors(ckpt.config(), &ckpt, false);
}

std::vector<RequiredTensor> required_tensors(const ModelConfig& c, const Checkpoint* ckpt,
                                             bool fused_experts) {
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads, KV = c.num_kv_heads,
                V = c.vocab_size;
  std::vector<RequiredTensor> r;
  auto need = [&](Role role, std::vector<int64_t> shape, int64_t l = -1, int64_t e = -1) {
    r.push_back({tensor_name(c, role, l, e, ckpt), std::move(shape)});
  };
  auto need_if = [&](bool cond, Role role, std::vector<int64_t> shape, int64_t l = -1) {
    if (cond && has_role(c, role)) need(role, std::move(shape), l);
  };
  const bool layer_norm = c.norm == NormKind::kLayer;
  need(Role::kEmbed, {V, D});
  need(Role::kFinalNorm, {D});
  need_if(layer_norm, Role::kFinalNormBias, {D});
  if (!c.tie_word_embeddings) need(Role::kLmHead, {V, D});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (c.block == BlockKind::kPostNorm) {
      need(Role::kAttnOutNorm, {D}, l);
      need(Role::kMlpOutNorm, {D}, l);
    } else {
      need(Role::kAttnNorm, {D}, l);
      need(Role::kMlpNorm, {D}, l);
      need_if(layer_norm, Role::kAttnNormBias, {D}, l);
      need_if(layer_norm, Role::kMlpNormBias, {D}, l);
    }
    if (c.mla()) {
      const int64_t Rq = c.mla_q_rank, Rkv = c.mla_kv_rank;
      if (Rq > 0) {
        need(Role::kQA, {Rq, D}, l);
        need(Role::kQANorm, {Rq}, l);
        need(Role::kQB, {H * d, Rq}, l);
      } else {
        need(Role::kQ, {H * d, D}, l);
      }
      need(Role::kKvA, {Rkv + c.qk_rope_dim, D}, l);
      need(Role::kKvANorm, {Rkv}, l);
      need(Role::kKvB, {H * (c.qk_nope_dim + c.v_head_dim), Rkv}, l);
    } else if (has_role(c, Role::kQkv)) {
      need(Role::kQkv, {3 * H * d, D}, l);
      need_if(c.qkv_bias, Role::kQkvBias, {3 * H * d}, l);
    } else {
      need(Role::kQ, {H * d, D}, l);
      need(Role::kK, {KV * d, D}, l);
      need(Role::kV, {KV * d, D}, l);
      need_if(c.qkv_bias, Role::kQBias, {H * d}, l);
      need_if(c.qkv_bias, Role::kKBias, {KV * d}, l);
      need_if(c.qkv_bias, Role::kVBias, {KV * d}, l);
    }
    need(Role::kO, {D, H * c.value_dim()}, l);
    need_if(c.o_bias, Role::kOBias, {D}, l);
    if (c.qk_norm == QkNormKind::kPerHead) {
      need(Role::kQNorm, {d}, l);
      need(Role::kKNorm, {d}, l);
    } else if (c.qk_norm == QkNormKind::kFullWidth) {
      need(Role::kQNorm, {H * d}, l);
      need(Role::kKNorm, {KV * d}, l);
    }
    need_if(c.learned_sinks, Role::kSinks, {H}, l);
    if (c.is_moe_layer(l) && c.family->gpt_oss_layout) {
      gpt_oss_expert_tensors(c, ckpt, l, r);
    } else if (c.is_moe_layer(l)) {
      const int64_t E = c.num_experts, I = c.moe_intermediate_size;
      need(Role::kRouter, {E, D}, l);
      if (c.router == RouterKind::kSigmoidGroupTopK) need(Role::kRouterScoreBias, {E}, l);
      if (ckpt ? experts_fused(*ckpt, l) : fused_experts) {
        need(Role::kExpertsGateUp, {E, 2 * I, D}, l);
        need(Role::kExpertsDown, {E, D, I}, l);
      } else {
        for (int64_t e = 0; e < E; ++e) {
          need(Role::kExpertGate, {I, D}, l, e);
          need(Role::kExpertUp, {I, D}, l, e);
          need(Role::kExpertDown, {D, I}, l, e);
        }
      }
      if (c.has_shared_expert()) {
        const int64_t S = c.shared_expert_intermediate_size;
        need(Role::kSharedGate, {S, D}, l);
        need(Role::kSharedUp, {S, D}, l);
        need(Role::kSharedDown, {D, S}, l);
        if (c.shared_expert_gated) need(Role::kSharedExpertGate, {1, D}, l);
      }
    } else {
      const int64_t I = c.intermediate_size;
      if (c.gated_mlp) need(Role::kMlpGate, {I, D}, l);
      need(Role::kMlpUp, {I, D}, l);
      need(Role::kMlpDown, {D, I}, l);
      if (c.gated_mlp) need_if(c.mlp_bias, Role::kMlpGateBias, {I}, l);
      need_if(c.mlp_bias, Role::kMlpUpBias, {I}, l);
      need_if(c.mlp_bias, Role::kMlpDownBias, {D}, l);
    }
  }
  return r;
}

void validate_checkpoint(const Checkpoint& ckpt) {
  for (const auto& need : required_tensors(ckpt)) {
    const TensorInfo* t = ckpt.find(need.name);
    if (!t)
      throw InputError(ckpt.dir() + ": tensor '" + need.name + "' is missing from the checkpoint");
    if (t->shape != need.shape)
      throw InputError(ckpt.dir() + ": tensor '" + t->name + "' has shape " + shape_str(t->shape) +
                       ", config.json implies " + shape_str(need.shape));
    if (need.stored_dtype) {
      if (t->dtype_str != need.stored_dtype)
        throw InputError(ckpt.dir() + ": tensor '" + t->name + "' has dtype " + t->dtype_str +
                         ", MXFP4 stores " + need.stored_dtype);
    } else if (t->dtype == DType::Other) {
      throw InputError(ckpt.dir() + ": tensor '" + t->name + "' has dtype " + t->dtype_str +
                       " (supported: BF16, F16, F32, F8_E4M3 with a weight_scale_inv)");
    }
    if (t->dtype == DType::F8E4M3) check_fp8_scale(ckpt, *t);
  }
}

}  // namespace sinkscope
