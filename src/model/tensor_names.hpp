// Tensor names of the Qwen3-MoE family as written by transformers, and where each expert's
// matrices live. Two on-disk expert layouts exist: per-expert tensors (the Hub's, and what
// `synth` writes) and fused 3-D tensors (`mlp.experts.gate_up_proj` [E, 2I, D] and
// `mlp.experts.down_proj` [E, D, I]); both are read as row ranges of a 2-D view.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sinkscope/config.hpp"

namespace sinkscope {

class Checkpoint;

struct RequiredTensor {
  std::string name;
  std::vector<int64_t> shape;
};

inline std::string layer_prefix(int64_t l) { return "model.layers." + std::to_string(l) + "."; }

// A row range of a tensor viewed as [prod(shape[:-1]), shape[-1]].
struct RowSlice {
  std::string tensor;
  int64_t row_begin, row_end;
};

struct ExpertLocation {
  RowSlice gate, up, down;  // gate/up: [I, D]; down: [D, I]
};

// True when layer l stores its experts fused (3-D tensors).
bool experts_fused(const Checkpoint& ckpt, int64_t layer);
ExpertLocation expert_location(const Checkpoint& ckpt, const ModelConfig& c, int64_t layer,
                               int64_t e);

// Everything the model needs, with the shape config.json implies.
std::vector<RequiredTensor> required_tensors(const ModelConfig& c, const Checkpoint& ckpt);

}  // namespace sinkscope
