// Rank-local records of the position-zero quantities (docs/metrics.md sections 1-4) and the Reducer
// that assembles them into the global analysis on rank 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sinkscope/analysis.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/hooks.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {

// What one rank saw, in sums over its probes (so records add up) and rows of per-probe values.
// Travels to rank 0 as a versioned Boost.Serialization archive.
struct RankRecord {
  int64_t L = 0, H = 0, E = 0, T = 0, D = 0, C = 0;  // C: component slots (ComponentIndex)
  int64_t probes = 0;                                // probes seen by this rank's dp group
  // Heads this rank owns: sums over probes, [L, H] (zero outside owned heads).
  std::vector<double> sink_sum, head_p0_sum, head_rest_sum;
  // Attribution sums of the target heads this rank owns only, [L, head_count, C]: the records a
  // large job gathers stay proportional to what each rank owns.
  int64_t head_begin = 0, head_count = 0;
  std::vector<double> attr_sum;
  double identity_max_rel_err = 0;  // max over targets of |k0_model - sum_c K(c[0])| / |k0_model|
  // Per-probe rows, filled by tp rank 0 of each dp group: probe ids and [L+1] values each.
  std::vector<int64_t> probe_ids;
  std::vector<float> norm_p0, norm_rest_median;  // [rows, L+1]
  std::vector<double> unit_p0_sum;               // [L+1, D] sum over probes of x_l[0] / ||x_l[0]||
  std::vector<int32_t> massive_p0;               // [L+1], from the rank that holds probe 0
  bool has_probe0 = false;
  bool has_rows = false;  // this rank's norm_p0 / norm_rest_median rows are authoritative
  std::vector<double> moe_p0_sum, moe_rest_sum;               // [L]
  std::vector<double> expert_p0_sum, p0_routed, rest_routed;  // [L, E]
  // Optional per-query attention to P0 for owned (probe, head): [rows, L, H, T] (zeros elsewhere).
  std::vector<float> p0_per_query;
  // Per-probe values of the heads this rank owns (contract 1.2, for the sweep's bootstrap): every
  // rank records them, for the probes it saw. sink_rows [rows, L, head_count] = alpha of each
  // probe; attr_layer_rows [rows, L, head_count, L+1] = per probe, target head and source index
  // (0 embedding, 1 + l layer l) the sum of the components' attributions.
  std::vector<int64_t> own_probe_ids;
  std::vector<float> sink_rows, attr_layer_rows;
  // Contract 1.3, learned sinks (gpt-oss): sums over probes of the sink mass of owned heads [L, H],
  // and with per-query records its value per query [rows, L, H, T] (zeros elsewhere). Empty for
  // models without learned sinks.
  std::vector<double> learned_sink_sum;
  std::vector<float> sink_mass_per_query;

  template <class Archive>
  void serialize(Archive& ar, const unsigned int /*version*/) {
    ar& L& H& E& T& D& C& probes& sink_sum& head_p0_sum& head_rest_sum& head_begin& head_count&
        attr_sum;
    ar& identity_max_rel_err& probe_ids& norm_p0& norm_rest_median& unit_p0_sum& massive_p0&
        has_probe0;
    ar& has_rows;
    ar& moe_p0_sum& moe_rest_sum& expert_p0_sum& p0_routed& rest_routed& p0_per_query;
    ar& own_probe_ids& sink_rows& attr_layer_rows;
    ar& learned_sink_sum& sink_mass_per_query;
  }
};

std::string serialize_record(const RankRecord& r);
RankRecord deserialize_record(const std::string& bytes);

class Recorder final : public ForwardObserver {
 public:
  Recorder(const ModelConfig& cfg, const ShardPlan& plan, int64_t seq_len, bool per_query);
  void on_residual(const ResidualTap& t) override;
  void on_attention(const AttentionTap& t) override;
  void on_mlp(const MlpTap& t) override;
  // Called by the driver after each micro-batch with its probe count (dp group).
  void add_probes(int64_t n) { rec_.probes += n; }
  const RankRecord& record() const { return rec_; }

 private:
  int64_t row_of(int64_t probe);
  int64_t own_row_of(int64_t probe);
  ModelConfig cfg_;
  ShardPlan plan_;
  bool per_query_;
  bool records_rows_;  // tp rank 0 of its dp group records per-probe rows and MoE sums
  RankRecord rec_;
};

// Rank 0: assembles records of every rank into the analysis arrays of sections 1-4 (eps for
// sink_rate). `a.meta` must already carry the shape attributes.
void reduce_records(const std::vector<RankRecord>& records, const ModelConfig& cfg, double eps,
                    bool per_query, Analysis& a, double* identity_max_rel_err);

// Rank 0: alpha of every probe [N, L, H] from the records' own rows (contract 1.2).
FloatArray per_probe_sink(const std::vector<RankRecord>& records, int64_t num_probes);

// docs/metrics.md section 5 from the circuit map, sink scores and h-ratios already in `a`.
void compute_profile(Analysis& a);

// Contract 1.2: profile/causal_* from `a.causal_drop` (and a.causal_drop_per_probe left as is).
void compute_causal_profile(Analysis& a);

// Total-variation distance series and convergence step of docs/metrics.md section 6 (contract 1.0;
// kept for the `convergence/tv` dataset; the 1.2 outcome is `assess_convergence` in sweep.hpp).
void convergence(const std::vector<std::vector<float>>& layer_shares,
                 const std::vector<int64_t>& steps, double tau, std::vector<float>* tv,
                 int64_t* step);

}  // namespace sinkscope
