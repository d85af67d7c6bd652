// Multi-head latent attention (DeepSeek-V3) on the CPU: the projections of one layer and the
// differential key attribution through the latent and the shared rope key (docs/metrics.md,
// "DeepSeek-V3"). The rest of the attention block (softmax, head writes, the circuit records) is
// the generic one of src/cpu/backend.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/weights.hpp"
#include "sinkscope/config.hpp"

namespace sinkscope::cpu {

// The latent norms' epsilon: transformers builds q_a_layernorm and kv_a_layernorm with
// DeepseekV3RMSNorm's default, not the config's rms_norm_eps.
constexpr double kMlaLatentEps = 1e-6;

// From the normed input u [B*T, D] of the layer: q and k [B*T, Hl * (nope + rope)] (per head
// [nope ; rope], the rope part rotated at its position and scaled by the rope's attention factor;
// under rope_interleave the rope dims are first de-interleaved, as transformers does, for q and
// k alike), v [B*T, Hl * v_head_dim]; inv_rl [B] = 1 / rms of the latent (before
// kv_a_layernorm's gain) at each probe's position 0; k0 [B, Hl * (nope + rope)] = the keys at
// position 0.
void mla_project(const ModelConfig& c, const LayerWeights& L, const float* u, int64_t B, int64_t T,
                 int64_t Hl, const double* inv_freq, std::vector<float>& q, std::vector<float>& k,
                 std::vector<float>& v, std::vector<float>& inv_rl, std::vector<float>& k0);

// The attribution of C sources to this rank's Hl heads for one probe. src [(C + 1), D] holds
// gamma_in (.) delta_c for each source and, in row C, gamma_in (.) x[0] (the sum of every
// component's position-0 write); inv_rx, inv_rl: the frozen scales of position 0; qbar
// [Hl * (nope + rope)]: the mean rotated query over i >= 1. Writes attr[h * C + c] =
// scale * qbar_h . K_h(delta_c) and k0_sum [Hl * (nope + rope)] = K(row C) for the identity.
void mla_attribute(const ModelConfig& c, const LayerWeights& L, const float* src, int64_t C,
                   int64_t Hl, float inv_rx, float inv_rl, const float* qbar, float scale,
                   float* attr, float* k0_sum);

}  // namespace sinkscope::cpu

namespace sinkscope::cpu {

// DeepSeek-V3 routing of n rows of router logits [n, E]: scores s = sigmoid(logit); selection on
// s + bias: the topk_group groups (n_group equal groups of experts) with the largest sum of their
// two best corrected scores, the other groups' corrected scores set to 0 (as transformers'
// masked_fill), then the top_k corrected scores (ties to the lower index); weights s of the
// selected, divided by their sum + 1e-20 when norm_topk_prob, times routed_scaling_factor.
void route_sigmoid_groups(const ModelConfig& c, const float* logits, int64_t n, const float* bias,
                          int32_t* topk, float* weight);

}  // namespace sinkscope::cpu
