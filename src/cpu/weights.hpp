// One rank's shard of the model in fp32 (the CPU backend's copy). Which tensors exist follows the
// family (sinkscope/family.hpp); absent parts stay empty.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "cpu/uninit_allocator.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

class Checkpoint;

// fp32 weights: not zeroed when allocated (the load writes every element), large ones on huge
// pages (uninit_allocator.hpp).
using WeightVector = UninitVector<float>;

struct NormWeights {
  WeightVector gain;  // [n]
  WeightVector bias;  // [n] LayerNorm only
};

struct MlpWeights {
  WeightVector gate, up;            // [I, D] (gate empty for an ungated MLP)
  WeightVector down;                // [D, I]
  WeightVector gate_bias, up_bias;  // [I] where the family has them
  WeightVector down_bias;           // [D] (only on the rank holding intermediate slice 0)
  int64_t inter = 0;
};

// Multi-head latent attention (DeepSeek-V3): the latent projections are replicated, kv_b_proj and
// q_b_proj (or q_proj) are sharded by head like any query projection.
struct MlaWeights {
  WeightVector q_a, q_a_norm;  // [Rq, D], [Rq] (empty without q_lora_rank)
  WeightVector q_b;            // [Hl * (nope + rope), Rq] this rank's heads
  WeightVector kv_a;           // [Rkv + rope, D]
  WeightVector kv_a_norm;      // [Rkv]
  WeightVector kv_b;           // [Hl * (nope + v), Rkv] this rank's heads
};

struct LayerWeights {
  NormWeights attn_norm, mlp_norm;          // pre-norm and parallel blocks
  NormWeights attn_out_norm, mlp_out_norm;  // post-norm blocks
  WeightVector q;                           // [Hl * d, D]  this rank's query heads
  WeightVector k, v;                        // [KVl * d, D] the KV heads it holds
  WeightVector q_bias, k_bias, v_bias;      // [Hl * d], [KVl * d]
  WeightVector o;                           // [D, Hl * d]  its columns of o_proj
  WeightVector o_bias;                      // [D]
  WeightVector q_norm, k_norm;              // [d] per head, or this rank's slice of the full width
  WeightVector sinks;  // [Hl] learned sink logits of this rank's heads (gpt-oss)
  bool moe = false;
  WeightVector router;              // [E, D] (replicated)
  WeightVector router_bias;         // [E] (gpt-oss)
  std::vector<MlpWeights> experts;  // local experts [expert_begin, expert_end)
  MlpWeights dense;                 // dense MLP layers (replicated)
  MlpWeights shared;                // the shared expert (replicated)
  WeightVector shared_gate;         // [D] (empty: an ungated shared expert)
  WeightVector score_bias;          // [E] DeepSeek's e_score_correction_bias (selection only)
  MlaWeights mla;                   // multi-head latent attention; L.q holds a plain q_proj
};

struct ModelWeights {
  std::vector<LayerWeights> layers;
  NormWeights final_norm;  // [D]
  WeightVector lm_head;    // [V, D], loaded only when logits are wanted
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
