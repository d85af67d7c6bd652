// One rank's shard of the model on the device: bf16 matrices (fp32 norms and router), laid out for
// the backend's products. Loaded from a checkpoint (stored bytes copied as they are; f16/f32
// rounded to bf16 on the device) or made at random on the device for benchmarks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "cuda/device_buffer.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {
class Checkpoint;
}

namespace sinkscope::cuda {

class Blas;

struct DeviceLayer {
  DeviceBuffer<float> input_norm, post_norm;            // [D] (absent in post-norm blocks)
  DeviceBuffer<float> input_norm_bias, post_norm_bias;  // [D] LayerNorm only
  DeviceBuffer<float> attn_out_norm, mlp_out_norm;      // [D] post-norm blocks only
  // Per-head q/k RMSNorm: [d]; full-width: this rank's slices [Hl*d] and [KVl*d].
  DeviceBuffer<float> q_norm, k_norm;
  DeviceBuffer<bf16_bits> wqkv;  // [Hl*d + 2*KVl*d, D]: this rank's q rows, then k, then v
  DeviceBuffer<float> qkv_bias;  // [Hl*d + 2*KVl*d] where the family has q/k/v biases
  DeviceBuffer<float> kconst;    // [KVl*d] W_K beta_in + b_K where either exists
  DeviceBuffer<bf16_bits> wo;    // [D, Hl*dv]: its columns of o_proj (dv: the value width)
  DeviceBuffer<float> o_bias;    // [D] where the family has an output bias
  DeviceBuffer<float> sinks;     // [Hl] learned sink logits of the local heads (gpt-oss)
  // Post-norm blocks: diag(attn_out_norm) W_O, the head writes as the block adds them (before the
  // per-position 1 / rms); the Gram matrices below are of this one then.
  DeviceBuffer<bf16_bits> wo_scaled;
  // Per local head h the Gram matrix W_O,h^T W_O,h [dv, dv] split into bf16 hi + lo parts: the
  // head write norms come from z^T M z without forming the per-head writes.
  DeviceBuffer<bf16_bits> gram_hi, gram_lo;  // [Hl, dv, dv]
  // Multi-head latent attention (DeepSeek-V3; wqkv unused): mla_a = [q_a (Rq rows, with a low-rank
  // query) ; kv_a (Rkv + rope rows)] x D, replicated; mla_q = q_b [Hl*dqk, Rq] of this rank's
  // heads (q_proj [Hl*dqk, D] without a low-rank query); mla_kv_b [Hl*(nope + dv), Rkv]; the latent
  // norms' gains.
  DeviceBuffer<bf16_bits> mla_a, mla_q, mla_kv_b;
  DeviceBuffer<float> mla_q_a_norm, mla_kv_a_norm;
  bool moe = false;
  DeviceBuffer<float> router;  // [E, D] fp32 (routing is decided in fp32)
  // [E, 2D] = [W_r | W_r] in bf16 when every router weight is a bf16 value (as checkpoints store
  // them): the fp32 router product then runs on the tensor cores as u_hi W_r^T + [u_mid | u_lo]
  // [W_r | W_r]^T, the fp32 input split into three bf16 parts (exact products, fp32 sums). Empty
  // otherwise (the fp32 product on the CUDA cores).
  DeviceBuffer<bf16_bits> router_split;
  DeviceBuffer<float> router_bias;        // [E] (gpt-oss)
  DeviceBuffer<float> router_score_bias;  // [E] DeepSeek's e_score_correction_bias (selection)
  // Expert biases (gpt-oss): [El, 2I] (gate | up) and [El, D].
  DeviceBuffer<float> expert_gate_up_bias, expert_down_bias;
  DeviceBuffer<bf16_bits> w_gate_up;  // [El, 2I, D] (gate rows, then up rows); dense: [1, 2I, D]
                                      // (ungated MLPs: [1, I, D], the up rows only)
  DeviceBuffer<bf16_bits> w_down;     // [El, D, I]; dense: [1, D, I]
  DeviceBuffer<float> mlp_bias;       // dense MLP: [2I] (gate | up) or [I] (ungated)
  DeviceBuffer<float> down_bias;      // dense MLP: [D]
  int64_t inter = 0;
  // The shared expert (Qwen2-MoE): a SwiGLU MLP of width shared_inter on every token, scaled by
  // sigmoid(u . shared_gate).
  DeviceBuffer<bf16_bits> shared_gate_up, shared_down;  // [2S, D], [D, S]
  DeviceBuffer<float> shared_gate;                      // [D]
  int64_t shared_inter = 0;
};

struct DeviceModel {
  std::vector<DeviceLayer> layers;
  DeviceBuffer<float> final_norm;       // [D]
  DeviceBuffer<float> final_norm_bias;  // [D] LayerNorm only
  DeviceBuffer<bf16_bits> lm_head;      // [V, D], only when logits are wanted
  DeviceBuffer<bf16_bits> embed;  // [V, D], synthetic models only (checkpoints embed on the host)
  uint64_t bytes_loaded = 0;      // checkpoint bytes converted (or bf16 bytes made, synthetic)
};

// Stored bf16 bytes go to the device as they are: `threads` host threads (--threads, at most 8)
// each fill their own pinned staging buffers from the mapped file and copy them asynchronously on
// their own streams; s waits for every copy before the function returns. f16/f32 checkpoints are
// rounded to bf16 on the device. `progress` (optional) gets (bytes read, bytes to read).
DeviceModel load_device_model(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head,
                              Blas& blas, cudaStream_t s, int threads,
                              const std::function<void(uint64_t, uint64_t)>& progress = {});
DeviceModel synthesize_device_model(const ModelConfig& c, const ShardPlan& plan, bool with_lm_head,
                                    uint64_t seed, Blas& blas, cudaStream_t s);

}  // namespace sinkscope::cuda
