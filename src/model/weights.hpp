// One rank's shard of the model in fp32 (the CPU backend's copy).
#pragma once

#include <cstdint>
#include <vector>

#include "sinkscope/config.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

class Checkpoint;

struct MlpWeights {
  std::vector<float> gate, up;  // [I, D]
  std::vector<float> down;      // [D, I]
  int64_t inter = 0;
};

struct LayerWeights {
  std::vector<float> input_norm, post_norm;  // [D]
  std::vector<float> q;                      // [Hl * d, D]  this rank's query heads
  std::vector<float> k, v;                   // [KVl * d, D] the KV heads it holds
  std::vector<float> o;                      // [D, Hl * d]  its columns of o_proj
  std::vector<float> q_norm, k_norm;         // [d]
  bool moe = false;
  std::vector<float> router;        // [E, D] (replicated)
  std::vector<MlpWeights> experts;  // local experts [expert_begin, expert_end)
  MlpWeights dense;                 // dense MLP layers (replicated)
};

struct ModelWeights {
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [D]
  std::vector<float> lm_head;     // [V, D], loaded only when logits are wanted
};

ModelWeights load_weights(const Checkpoint& ckpt, const ShardPlan& plan, bool with_lm_head);

}  // namespace sinkscope
