// One rank's shard of the model in fp32 (the CPU backend's copy). Which tensors exist follows the
// family (sinkscope/family.hpp); absent parts stay empty.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "sinkscope/config.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

class Checkpoint;

struct NormWeights {
  std::vector<float> gain;  // [n]
  std::vector<float> bias;  // [n] LayerNorm only
};

struct MlpWeights {
  std::vector<float> gate, up;            // [I, D] (gate empty for an ungated MLP)
  std::vector<float> down;                // [D, I]
  std::vector<float> gate_bias, up_bias;  // [I] where the family has them
  std::vector<float> down_bias;           // [D] (only on the rank holding intermediate slice 0)
  int64_t inter = 0;
};

// Multi-head latent attention (DeepSeek-V3): the latent projections are replicated, kv_b_proj and
// q_b_proj (or q_proj) are sharded by head like any query projection.
struct MlaWeights {
  std::vector<float> q_a, q_a_norm;  // [Rq, D], [Rq] (empty without q_lora_rank)
  std::vector<float> q_b;            // [Hl * (nope + rope), Rq] this rank's heads
  std::vector<float> kv_a;           // [Rkv + rope, D]
  std::vector<float> kv_a_norm;      // [Rkv]
  std::vector<float> kv_b;           // [Hl * (nope + v), Rkv] this rank's heads
};

struct LayerWeights {
  NormWeights attn_norm, mlp_norm;            // pre-norm and parallel blocks
  NormWeights attn_out_norm, mlp_out_norm;    // post-norm blocks
  std::vector<float> q;                       // [Hl * d, D]  this rank's query heads
  std::vector<float> k, v;                    // [KVl * d, D] the KV heads it holds
  std::vector<float> q_bias, k_bias, v_bias;  // [Hl * d], [KVl * d]
  std::vector<float> o;                       // [D, Hl * d]  its columns of o_proj
  std::vector<float> o_bias;                  // [D]
  std::vector<float> q_norm, k_norm;  // [d] per head, or this rank's slice of the full width
  std::vector<float> sinks;           // [Hl] learned sink logits of this rank's heads (gpt-oss)
  bool moe = false;
  std::vector<float> router;        // [E, D] (replicated)
  std::vector<float> router_bias;   // [E] (gpt-oss)
  std::vector<MlpWeights> experts;  // local experts [expert_begin, expert_end)
  MlpWeights dense;                 // dense MLP layers (replicated)
  MlpWeights shared;                // the shared expert (replicated)
  std::vector<float> shared_gate;   // [D] (empty: an ungated shared expert)
  std::vector<float> score_bias;    // [E] DeepSeek's e_score_correction_bias (selection only)
  MlaWeights mla;                   // multi-head latent attention; L.q holds a plain q_proj
};

struct ModelWeights {
  std::vector<LayerWeights> layers;
  NormWeights final_norm;      // [D]
  std::vector<float> lm_head;  // [V, D], loaded only when logits are wanted
};

// Reads this rank's slices. The reads are listed first (their total is the progress's total), the
// kernel is told to read ahead of them (madvise, a window of kReadAheadBytes), and each large read
// converts on the checkpoint's read threads (Checkpoint::set_read_threads: the CPU backend sets
// --threads). `progress` (optional) gets (bytes read, bytes to read).
ModelWeights load_weights(const Checkpoint& ckpt, const ShardPlan& plan, bool with_lm_head,
                          const std::function<void(uint64_t, uint64_t)>& progress = {});
// One whole gpt-oss expert as load_weights holds it (docs/families.md): gate and up [I, D]
// de-interleaved from the fused bf16 or MXFP4 gate_up tensor, down [D, I], and their biases. The
// CUDA loader reads gpt-oss experts through this (MXFP4 decoded here, on the host).
MlpWeights load_gpt_oss_expert(const Checkpoint& ckpt, int64_t layer, int64_t expert);
// The bytes load_weights reads for this plan (what the progress counts to).
uint64_t planned_load_bytes(const Checkpoint& ckpt, const ShardPlan& plan, bool with_lm_head);

}  // namespace sinkscope
