// Which rank owns which heads, KV heads, experts, probes and MoE tokens (docs/parallel-layout.md).
//
// Layout (Megatron-Core style, no repeated work):
//   attention grid: world = dp x tp; rank r has tp_rank = r % tp, dp_rank = r / tp. The tp ranks of
//   a dp group split the query heads (and KV heads; replicated when tp > num_kv_heads) and hold the
//   same probes; dp groups take disjoint probes.
//   expert grid: the same ranks, world = edp x ep x etp (etp fastest): an expert group of ep x etp
//   consecutive ranks holds every expert once; rank r owns the experts of ep_rank = (r / etp) % ep
//   and, of each, the intermediate slice etp_rank = r % etp (expert tensor parallelism; etp = 1
//   keeps whole experts). For the MoE block each rank routes a 1/tp slice of its dp group's tokens
//   and sends each (token, expert) pair to the etp ranks holding that expert in its expert group
//   (all-to-all with counts); the partial outputs come back and are summed.
#pragma once

#include <cstdint>
#include <string>

namespace sinkscope {

struct ModelConfig;

struct ShardPlan {
  int world_size = 1, rank = 0;
  int tp = 1, ep = 1, dp = 1, etp = 1;
  int tp_rank = 0, dp_rank = 0, ep_rank = 0, ep_group = 0, etp_rank = 0;
  int64_t num_heads = 0, num_kv_heads = 0, num_experts = 0;
  int64_t head_begin = 0, head_end = 0;      // query heads [begin, end)
  int64_t kv_begin = 0, kv_end = 0;          // KV heads held [begin, end)
  int64_t expert_begin = 0, expert_end = 0;  // experts [begin, end)
  int64_t moe_inter = 0;                     // moe_intermediate_size of the model
  int64_t inter_begin = 0, inter_end = 0;    // this rank's slice of each expert's intermediate dim
  // Where the rank runs (include/sinkscope/placement.hpp; set after make()): its node, how many
  // nodes the job has, its index among its node's ranks (the CUDA backend's GPU), and the
  // placement's one-line summary, which describe() appends.
  int node = 0, num_nodes = 1, local_rank = 0;
  std::string placement;

  // Throws InputError with a one-line reason when the sizes do not fit. etp = 0 picks the
  // default: tp when the world holds tp x ep ranks per expert group and tp divides the expert
  // width (Megatron-Core's default), else 1.
  static ShardPlan make(int world_size, int rank, int tp, int ep, const ModelConfig& cfg,
                        int etp = 1);

  int64_t local_heads() const { return head_end - head_begin; }
  int64_t local_kv_heads() const { return kv_end - kv_begin; }
  int64_t local_experts() const { return expert_end - expert_begin; }
  // Probes [begin, end) of the dp group `dp_index` out of n (contiguous, sizes differ by <= 1).
  static void probe_range(int64_t n, int dp, int dp_index, int64_t* begin, int64_t* end);
  // Rank, inside this rank's expert group communicator, that holds slice `slice` (< etp) of expert
  // e.
  int expert_owner(int64_t e, int slice = 0) const;
  // Rank that owns query head h inside this rank's dp group.
  int head_owner(int64_t h) const;

  std::string describe() const;  // one line, logged at start and stored as the `layout` attribute

  bool operator==(const ShardPlan&) const = default;

  template <class Archive>
  void serialize(Archive& ar, const unsigned int version) {
    ar& world_size& rank& tp& ep& dp& tp_rank& dp_rank& ep_rank& ep_group;
    ar& etp& etp_rank& moe_inter& inter_begin& inter_end;
    ar& num_heads& num_kv_heads& num_experts;
    ar& head_begin& head_end& kv_begin& kv_end& expert_begin& expert_end;
    if (version >= 2) ar& node& num_nodes& local_rank& placement;
  }
};

// Boost.Serialization round trip (versioned archives), used to ship plans and in tests.
std::string serialize_plan(const ShardPlan& p);
ShardPlan deserialize_plan(const std::string& bytes);

}  // namespace sinkscope
