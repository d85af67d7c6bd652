// Model families: one description per family (docs/families.md). A family says how its
// config.json reads, which architectural features it has, and what its tensors are called. Config
// parsing, checkpoint validation, both backends' loaders and `synth` all read this one table; a new
// family is one entry in src/family/families.cpp plus its golden fixture.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "sinkscope/config.hpp"

namespace sinkscope {

class Checkpoint;

// What a tensor is for. Name patterns use {l} for the layer and {e} for the expert.
enum class Role : int32_t {
  kEmbed,
  kFinalNorm,
  kFinalNormBias,
  kLmHead,
  kAttnNorm,  // the norm in front of attention (input_layernorm)
  kAttnNormBias,
  kMlpNorm,  // the norm in front of the MLP (post_attention_layernorm in pre-norm families)
  kMlpNormBias,
  kAttnOutNorm,  // post-norm families: the norm of the attention output
  kMlpOutNorm,   // post-norm families: the norm of the MLP output
  kQ,
  kK,
  kV,
  kQBias,
  kKBias,
  kVBias,
  kQkv,  // fused per-head interleaved [H, 3, d] rows (GPT-NeoX)
  kQkvBias,
  kO,
  kOBias,
  kQNorm,
  kKNorm,
  kMlpGate,
  kMlpUp,
  kMlpDown,
  kMlpGateBias,
  kMlpUpBias,
  kMlpDownBias,
  kRouter,
  kExpertGate,  // per-expert tensors
  kExpertUp,
  kExpertDown,
  kExpertsGateUp,  // fused 3-D tensors: [E, 2I, D] (gate rows, then up rows), [E, D, I]
  kExpertsDown,
  kSharedGate,
  kSharedUp,
  kSharedDown,
  kSharedExpertGate,  // [1, D]: the shared expert's sigmoid gate
  // Multi-head latent attention (DeepSeek-V3) and its router's selection bias.
  kQA,               // q_a_proj [q_lora_rank, D]
  kQANorm,           // q_a_layernorm [q_lora_rank]
  kQB,               // q_b_proj [H * (nope + rope), q_lora_rank]
  kKvA,              // kv_a_proj_with_mqa [kv_lora_rank + rope, D]
  kKvANorm,          // kv_a_layernorm [kv_lora_rank]
  kKvB,              // kv_b_proj [H * (nope + v), kv_lora_rank]
  kRouterScoreBias,  // e_score_correction_bias [E] (selection only)
  // gpt-oss: learned sink logits [H]; router bias [E]; expert biases [E, 2I] (interleaved like
  // gate_up) and [E, D]. Its kExpertsGateUp / kExpertsDown are [E, D, 2I] (columns: gate, up,
  // gate, ...) and [E, I, D], or their MXFP4 form (`*_blocks` + `*_scales`, docs/families.md).
  kSinks,
  kRouterBias,
  kExpertsGateUpBias,
  kExpertsDownBias,
  kCount
};

struct FamilySpec {
  const char* model_type;    // config.json's model_type
  const char* architecture;  // config.json's architectures[0] (what `synth` writes)
  const char* description;   // one line for docs and `inspect`
  // Architecture defaults; config keys may switch some (biases, parallel residual, activation).
  BlockKind block = BlockKind::kPreNorm;
  NormKind norm = NormKind::kRms;
  QkNormKind qk_norm = QkNormKind::kNone;
  RouterKind router = RouterKind::kSoftmaxTopK;
  bool moe = false;                // experts expected (num_experts > 0)
  bool shared_expert = false;      // may have a gated shared expert
  bool default_norm_topk = false;  // norm_topk_prob when config.json omits it
  bool default_qkv_bias = false;   // q/k/v biases when config.json has no attention_bias key
  bool default_tied = false;       // tie_word_embeddings when absent
  bool mla = false;                // multi-head latent attention (DeepSeek-V3)
  // gpt-oss: learned sinks, per-layer sliding windows, fused experts with interleaved gate/up
  // columns ([E, D, 2I], in x out) and biases, stored in bf16 or MXFP4, the clamped SwiGLU, yarn.
  bool gpt_oss_layout = false;
  // Name patterns per role; nullptr: the family has no such tensor. A role may list alternatives
  // separated by '|' (e.g. Mixtral's block_sparse_moe. and mlp. spellings); the first one that
  // the checkpoint holds is used.
  std::array<const char*, static_cast<size_t>(Role::kCount)> names{};
};

// The family of `model_type`; throws InputError listing the supported ones.
const FamilySpec& family_of(const std::string& model_type);
const std::vector<const FamilySpec*>& all_families();

// The name of `role` for layer `layer` and expert `expert` as this model's checkpoint spells it
// (alternatives resolved against `ckpt` when given, else the first). Throws RuntimeFailure when
// the family has no such role.
std::string tensor_name(const ModelConfig& c, Role role, int64_t layer = -1, int64_t expert = -1,
                        const Checkpoint* ckpt = nullptr);
bool has_role(const ModelConfig& c, Role role);

struct RequiredTensor {
  std::string name;
  std::vector<int64_t> shape;
  const char* stored_dtype = nullptr;  // a packed format's dtype as stored ("U8"); null: computable
};

// MXFP4 (gpt-oss): a tensor `X_blocks` [..., G, 16] uint8 (two e2m1 values per byte, the low
// nibble first) with `X_scales` [..., G] uint8 (e8m0: 2^(s - 127)) holds [..., 32 G] values.
bool is_mxfp4_blocks(const std::string& name);
std::string mxfp4_scales_name(const std::string& blocks_name);

// True when layer l stores its experts as fused 3-D tensors.
bool experts_fused(const Checkpoint& ckpt, int64_t layer);

// A row range of a tensor viewed as [prod(shape[:-1]), shape[-1]].
struct RowSlice {
  std::string tensor;
  int64_t row_begin, row_end;
};
struct ExpertLocation {
  RowSlice gate, up, down;  // gate/up: [I, D]; down: [D, I]
};
ExpertLocation expert_location(const Checkpoint& ckpt, int64_t layer, int64_t e);

// Every tensor the model needs, with the shape config.json implies: as `ckpt` spells them, or
// (ckpt null) the family's first spelling with experts per expert or fused (`synth`).
std::vector<RequiredTensor> required_tensors(const Checkpoint& ckpt);
std::vector<RequiredTensor> required_tensors(const ModelConfig& c, const Checkpoint* ckpt,
                                             bool fused_experts);

// Checks that every required tensor is present with its shape. Throws InputError naming the
// checkpoint folder and the first missing or mis-shaped tensor.
void validate_checkpoint(const Checkpoint& ckpt);

}  // namespace sinkscope
