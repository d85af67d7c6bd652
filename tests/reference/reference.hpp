// An independent float64 reference for sinkscope (tests only).
//
// A deliberately naive, loop-based re-implementation of the Qwen3-MoE forward pass and of every
// metric of docs/metrics.md sections 1-5, plus the mean-ablation of section 4 (causal version). It
// shares nothing with sinkscope's forward pass, kernels, recorder or reducer: only the checkpoint
// reader (Checkpoint::read_rows, so the same stored bf16/f16/f32 values are used) and the
// config.json parser. Weights are widened bf16 -> float -> double; everything after that is
// double with plain loops, each quantity computed literally as docs/metrics.md defines it (e.g.
// p0_cosine over all pairs n < m, attributions from K(c[0]) and K(cbar) separately).
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "sinkscope/analysis.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/ndarray.hpp"

namespace sinkscope::reference {

// A source component of the circuit map. Kind codes are those of the analysis file's
// circuit/ablation/components (0 head, 1 expert, 2 embedding) and 3 for a dense layer's MLP.
struct Component {
  enum Kind : int32_t { kHead = 0, kExpert = 1, kEmbedding = 2, kMlp = 3 };
  int32_t layer = 0;
  int32_t kind = kHead;
  int32_t index = 0;
};

struct ReferenceResult {
  // Every array of docs/metrics.md sections 1-5 (p0_per_query always filled), rounded to float at
  // the very end; the ablation arrays are empty.
  Analysis analysis;

  // The same quantities in double where tests want them unrounded.
  std::vector<double> sink_score;   // [L, H]
  std::vector<double> attr_embed;   // [L, H]
  std::vector<double> attr_head;    // [L, H, L, H]
  std::vector<double> attr_expert;  // [L, H, L, E]
  std::vector<double> attr_mlp;     // [L, H, L]

  // Routing counts (exact integers): probes whose position 0 routes to e, and (probe, i >= 1)
  // tokens routed to e, [L, E].
  std::vector<int64_t> p0_routed_count, rest_routed_count;

  // docs/metrics.md section 4 identity: max over (probe, layer t, KV head g) of
  // ||k_0 - sum_c K(c[0])|| / ||k_0||, k_0 being the model's key at position 0 after k_norm.
  double identity_max_rel_err = 0;

  // Diagnostics: the smallest router-logit gap r_(k) - r_(k+1) between the last chosen and the
  // first unchosen expert over all routed tokens whose gap is not exactly zero (a gap near fp32
  // rounding means the top-k set may legitimately differ in fp32), the number of tokens whose
  // top-k boundary is an exact tie (decided by "ties -> lower index" alone), and the smallest
  // |alpha - eps| over heads (sink_rate borderline).
  double min_routing_gap = std::numeric_limits<double>::infinity();
  int64_t exact_routing_ties = 0;
  double min_sink_eps_gap = std::numeric_limits<double>::infinity();
};

class ReferenceModel {
 public:
  // Opens the checkpoint folder and reads every weight into doubles.
  explicit ReferenceModel(const std::string& model_dir);
  ~ReferenceModel();
  ReferenceModel(ReferenceModel&&) noexcept;
  ReferenceModel& operator=(ReferenceModel&&) noexcept;

  const ModelConfig& config() const;

  // The clean analysis of `tokens` ([N, T], T >= 2) with sink-rate threshold `eps`.
  ReferenceResult analyze(const IntArray& tokens, double eps = 0.3) const;

  // alpha [L, H] (docs/metrics.md section 1) with `ablate` mean-ablated at position 0 (all of them
  // in the same run; empty = clean).
  std::vector<double> sink_scores(const IntArray& tokens,
                                  const std::vector<Component>& ablate) const;

  // Contract 1.2 `profile/causal_drop` [L+1] and, per probe, `causal_drop_per_probe` [N, L+1]:
  // for index 0 the embedding, for 1 + l every head and every expert (or the dense MLP) of layer l
  // mean-ablated at position 0 in one run; the drop sum_{t,h} alpha (alpha - alpha') / sum alpha,
  // alpha the clean scores of all probes. `part` 0 ablates the layer's heads only, 1 its MLP or
  // experts only, 2 both (index 0 always the embedding alone).
  std::vector<double> causal_drop(const IntArray& tokens, int part = 2,
                                  std::vector<double>* per_probe = nullptr) const;

  // circuit/ablation/delta_sink_score for one component: alpha(ablated) - alpha(clean), [L, H].
  std::vector<double> ablation_delta(const IntArray& tokens, const Component& c) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sinkscope::reference
