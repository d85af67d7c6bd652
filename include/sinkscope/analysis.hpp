// The in-memory form of one analysis file (INTERFACE.md "Analysis file"; every number is
// defined in docs/metrics.md, a copy of the METRICS.md contract).
#pragma once

#include <cstdint>
#include <string>

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
  // METRICS.md section 4's identity: max over probes, target layers and KV heads of
  // |k_0 - sum_c K(c[0])| / |k_0|.
  double circuit_identity_max_rel_err = 0;
  // SHA-256 of the file's content (docs/schema.md), set by read_analysis after it verified it;
  // empty for files that carry none. Writers compute their own and ignore this field.
  std::string content_sha256;
};

struct Analysis {
  AnalysisMeta meta;
  IntArray tokens;  // [N, T] "probe,position"

  // attention/
  FloatArray sink_score;    // [L, H]
  FloatArray sink_rate;     // [L]
  FloatArray p0_per_query;  // [N, L, H, T]; empty unless --per-query

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
  IntArray ablation_components;    // [K, 3]; empty unless --ablate
  FloatArray ablation_delta_sink;  // [K, L, H]; empty unless --ablate

  // profile/
  FloatArray layer_share;  // [L+1]
  float first2_share = 0;
  FloatArray norm_gain_share;  // [L]
  int32_t peak_layer = 0;
  float entropy = 0;
};

}  // namespace sinkscope
