// The in-memory form of one analysis file (docs/schema.md "Analysis file"; every number is
// defined in docs/metrics.md).
#pragma once

#include <cstdint>
#include <string>

#include "sinkscope/components.hpp"
#include "sinkscope/ndarray.hpp"

namespace sinkscope {

struct AnalysisMeta {
  std::string sinkscope_version;
  std::string model_type;
  std::string checkpoint;  // path as given
  int64_t step = -1;       // -1 if unknown
  int64_t num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t num_experts = 0, top_k = 0, hidden_size = 0;
  int64_t num_probes = 0, seq_len = 0;
  double eps = 0.3;
  double sink_rate = 0;  // mean over layers of attention/sink_rate
  int64_t tp = 1, ep = 1, dp = 1, world_size = 1;
  std::string device = "cpu";
  std::string tokens_sha256;
  std::string created_utc;
  // sinkscope additions (docs/schema.md):
  std::string layout;  // the ShardPlan's one-line description
  int64_t etp = 1;     // expert tensor parallelism
  // docs/metrics.md section 4's identity: max over probes, target layers and KV heads of
  // |k_0 - sum_c K(c[0])| / |k_0|.
  double circuit_identity_max_rel_err = 0;
  // Provenance (format version 2; docs/schema.md "Provenance"). Files of format version 1 have
  // none of these: they read back empty (-1 for the numbers).
  int64_t format_version = 0;        // the writer stamps kFormatVersion when 0
  std::string git_commit;            // of the build that wrote the file
  std::string command_line;          // argv joined with spaces, as run
  std::string options;               // every option of the subcommand with its value (TOML lines)
  std::string probes;                // the token file, or "--probes SPEC"
  int64_t prepend_bos = -1;          // --prepend-bos, -1 when off
  std::string ablate;                // --ablate, "" when off
  int64_t batch = -1, threads = -1;  // --batch, --threads
  int64_t per_query = -1;            // --per-query (0 or 1)
  std::string checkpoint_headers_sha256;  // Checkpoint::headers_sha256()
  // SHA-256 of the file's content (docs/schema.md), set by read_analysis after it verified it;
  // empty for files that carry none. Writers compute their own and ignore this field.
  std::string content_sha256;
};

// The version of the file layout that this build writes (root attribute `format_version`).
// 1: the layout before the attribute existed. 2: dimension scales, coordinate variables,
// long_name/units/description on every dataset, provenance attributes (docs/schema.md).
inline constexpr int64_t kFormatVersion = 2;

struct Analysis {
  AnalysisMeta meta;
  IntArray tokens;  // [N, T] "probe,position"

  // attention/
  FloatArray sink_score;  // [L, H]
  FloatArray sink_rate;   // [L]
  // Contract 1.2: alpha^{l,h} of each probe (its mean over queries), what the sweep's bootstrap
  // resamples. Empty in files written before 1.2.
  FloatArray sink_score_per_probe;  // [N, L, H]
  FloatArray p0_per_query;          // [N, L, H, T]; empty unless --per-query
  // Contract 1.3, models with learned sinks (gpt-oss): the softmax mass on each head's sink logit,
  // averaged like sink_score; per query with --per-query. Empty otherwise.
  FloatArray learned_sink_mass;            // [L, H]
  FloatArray learned_sink_mass_per_query;  // [N, L, H, T]

  // residual/
  FloatArray norm_p0;           // [N, L+1]
  FloatArray norm_rest_median;  // [N, L+1]
  FloatArray h_ratio;           // [L+1]
  FloatArray p0_cosine;         // [L+1]
  IntArray massive_p0;          // [L+1]

  // writes/ and routing/
  FloatArray attn_head_p0, attn_head_rest;  // [L, H]
  FloatArray moe_p0, moe_rest;              // [L]
  FloatArray expert_p0;                     // [L, E]
  FloatArray p0_topk_freq, rest_topk_freq;  // [L, E]

  // circuit/
  FloatArray attr_embed;           // [L, H]
  FloatArray attr_head;            // [L, H, L, H]
  FloatArray attr_expert;          // [L, H, L, E]
  FloatArray attr_mlp;             // [L, H, L]
  FloatArray attr_shared_expert;   // [L, H, L]
  IntArray ablation_components;    // [K, 3]; empty unless --ablate
  FloatArray ablation_delta_sink;  // [K, L, H]; empty unless --ablate

  // The attribution dataset of a component kind (component_kinds()' `dataset`).
  FloatArray& attr_of(ComponentKind kind);
  const FloatArray& attr_of(ComponentKind kind) const;

  // profile/
  FloatArray layer_share;  // [L+1]
  float first2_share = 0;
  FloatArray norm_gain_share;  // [L]
  int32_t peak_layer = 0;
  float entropy = 0;
  // Contract 1.2 (docs/metrics.md "Scientific validity"): the per-probe, sink-weighted, signed
  // attribution of each source index (0 = embedding, 1 + l = layer l), whose probe mean is the
  // layer-level form of layer_share; the bootstrap's input for the attribution profile.
  FloatArray attr_layer_per_probe;  // [N, L+1]

  // Contract 1.2, --causal-profile: drops of the sink-weighted sink score when every component of
  // an index (the embedding, or all of layer l) is mean-ablated at position 0. Empty when off.
  FloatArray causal_drop;            // [L+1]
  FloatArray causal_drop_attention;  // [L]: the layer's heads only
  FloatArray causal_drop_ffn;        // [L]: the layer's MLP / experts / shared expert only
  FloatArray causal_drop_per_probe;  // [N, L+1]: per probe; its mean is causal_drop
  FloatArray causal_layer_share;     // [L+1]
  float causal_first2_share = 0;
  int32_t causal_peak_layer = 0;

  // Contract 1.2, --ablate search: the component ablations (circuit/ablation/*) are the
  // components of the opened layers ranked by causal effect; these say how they were chosen.
  FloatArray search_layer_drop;  // [L+1]: sink-weighted drop per index (as causal_drop)
  FloatArray search_effect;      // [K]: sink-weighted drop of each ablated component
  int32_t search_selected = 0;   // the smallest leading set reaching search_share of the drop
  float search_share = 0;        // the share asked for (0.9)

  bool has_causal_profile() const { return !causal_layer_share.empty(); }
};

// The sink-weighted sink score drop of docs/metrics.md 1.2: sum_{t,h} alpha (alpha - alpha') /
// sum alpha, with `alpha` the clean sink scores and `ablated` those under an ablation ([L, H]).
double sink_weighted_drop(const FloatArray& alpha, const float* ablated);

}  // namespace sinkscope
