// Hook points of the instrumented forward pass. A backend (CPU or CUDA) calls
// the observer once per layer and micro-batch with rank-local, already-reduced position-zero
// summaries on the host, so the Recorder is the same for every backend. Arrays are row-major;
// `B` is the number of probes of the micro-batch on this rank's dp group, `probe0` the global
// index of its first probe. All pointers are valid only during the call.
#pragma once

#include <cstdint>

namespace sinkscope {

// The residual stream x_l (l = 0..L) at position zero, per probe.
struct ResidualTap {
  int64_t index;  // l: 0 = embeddings, l = after layer l-1
  int64_t B, T, D, probe0;
  const float* x0;                // [B, D]  x_l[0]
  const float* norm_p0;           // [B]     ||x_l[0]||
  const float* norm_rest_median;  // [B] median over i >= 1 of ||x_l[i]||
  const float* abs_median;        // [B]     median over all i, c of |x_l[i, c]| (Sun et al.)
};

// One layer's attention for the query heads this rank owns.
struct AttentionTap {
  int64_t layer, B, T, D, head_dim, probe0;
  int64_t head_begin, local_heads;  // global ids [head_begin, head_begin + local_heads)
  const float* a0_mean;             // [B, Hl]  mean over the sink queries i of A[i, 0]
  const float* a0;                  // [B, Hl, T] A[i, 0] for every query (always provided)
  const float* write_p0_norm;       // [B, Hl]  ||w^{l,h}[0]||
  const float* write_rest_norm;     // [B, Hl]  mean over i >= 1 of ||w^{l,h}[i]||
  // Circuit attributions of this layer's heads (targets) to every upstream component slot
  // c < count_before(layer) of the ComponentLayout (sinkscope/components.hpp), per probe:
  // [B, Hl, count_before(layer)].
  const float* attr;
  int64_t num_sources;
  // The identity check of docs/metrics.md section 4: the model's k_0 (after the k norm) and the
  // sum over all components of K(c[0]) plus the constant (bias) terms, per KV head this rank
  // holds: [B, KVl, head_dim] each.
  const float* k0_model;
  const float* k0_from_components;
  int64_t kv_begin, local_kv_heads;
  // Contract 1.4 (docs/metrics.md "Model families II: gpt-oss"). The sink queries: i =
  // 0..sink_queries-1, those that can see position 0 (T, or the sliding window of this layer when
  // shorter); a0_mean and sink_mass_mean average over them. Learned sinks (gpt-oss): the softmax
  // mass of each head's sink logit per query, [B, Hl, T], and its mean over the sink queries, [B,
  // Hl]; null without learned sinks.
  int64_t sink_queries = 0;
  const float* sink_mass = nullptr;
  const float* sink_mass_mean = nullptr;
};

// One layer's MoE block (or dense MLP) for the probes of the micro-batch, complete for the dp
// group (every tp rank of the group sees the same values).
struct MlpTap {
  int64_t layer, B, T, D, probe0;
  bool moe;
  int64_t num_experts;          // E (0 for a dense layer)
  const float* out_p0_norm;     // [B]  ||m_l[0]||
  const float* out_rest_norm;   // [B]  mean over i >= 1 of ||m_l[i]||
  const float* expert_p0_norm;  // [B, E] ||m^{l,e}[0]|| (0 where not routed)
  const float* p0_routed;       // [B, E] 1 where position 0 routes to e
  const float* rest_routed;     // [E]    count of (probe, i >= 1) tokens routed to e
};

class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  virtual void on_residual(const ResidualTap&) {}
  virtual void on_attention(const AttentionTap&) {}
  virtual void on_mlp(const MlpTap&) {}
};

}  // namespace sinkscope
